"""The GPTQ quantization grid: asymmetric/symmetric min-max uniform quantizer per output row
(or per group of input columns), as in the IST-DASLab `quant.py` (docs/algorithms.md section 2.4).

`QuantGrid` is the frozen config shared by GPTQ, RTN and the checkpoint writer;
`QuantGrid.find_params` computes (scale, zero) of one row block; `quantize_codes` / `quantize`
map values to integer codes and back. One deliberate deviation from the reference: scales are
rounded to fp16 (the dtype the GPTQ format stores them in) when they are computed, so the grid
GPTQ optimises over is exactly the grid that gets served and the packed checkpoint dequantizes
to the quantizer's values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16  # the GPTQ v1 format stores scales in fp16 (docs/algorithms.md section 3)
_MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal): a scale must never round to 0


@dataclass(frozen=True)
class QuantGrid:
    """GPTQ settings (AutoGPTQ `BaseQuantizeConfig` names); our defaults follow docs/algorithms.md 5.5."""

    bits: int = 4  # code width; one of SUPPORTED_BITS
    group_size: int = 128  # input columns sharing one (scale, zero); -1 = the whole row
    sym: bool = True  # symmetric grid, zero fixed at (maxq + 1) / 2
    desc_act: bool = False  # act-order: quantize columns by decreasing diag(H)
    static_groups: bool = False  # group params fixed from the original W before error feedback
    damp_percent: float = 0.01  # damping = damp_percent * mean(diag(H))
    blocksize: int = 128  # columns per lazy-update block
    true_sequential: bool = True  # driver: quantize q/k/v, o, gate/up, down one after another
    damp_max: float = 1.0  # on Cholesky failure damping doubles up to this, then the PSD repair
    # How a still-indefinite H (MLGPTQ's element-wise max) is made PSD after damping up to damp_max:
    # "clip" sets negative eigenvalues to a tiny floor; "shift" adds (-min eigenvalue) * I, which
    # keeps every direction's relative weight instead of declaring the clipped ones free (5.4 item 7).
    psd_repair: str = "clip"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; expected one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be -1 (whole row) or a positive integer")
        if not 0.0 < self.damp_percent <= self.damp_max:
            raise ValueError(f"damp_percent={self.damp_percent} must be in (0, damp_max={self.damp_max}]")
        if self.blocksize <= 0:
            raise ValueError(f"blocksize={self.blocksize} must be positive")
        if self.psd_repair not in ("clip", "shift"):
            raise ValueError(f"psd_repair={self.psd_repair!r}; expected 'clip' or 'shift'")

    @property
    def maxq(self) -> int:
        """Largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    def group_width(self, d_in: int) -> int:
        """Columns per group for a layer with `d_in` inputs; raises if group_size does not divide d_in."""
        if self.group_size == -1:
            return d_in
        if d_in % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide d_in={d_in}")
        return self.group_size

    def find_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (scale, zero) of `x [rows, cols]`; both fp32 [rows], zero integer-valued."""
        x = x.float()
        zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        xmin = torch.minimum(x.min(dim=1).values, zeros)  # the range always contains 0
        xmax = torch.maximum(x.max(dim=1).values, zeros)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            # As in the reference: only rows with a negative value get a mirrored minimum, so
            # an all-non-negative row keeps xmin = 0 (and uses half of its symmetric grid).
            xmin = torch.where(xmin < 0, -xmax, xmin)
        dead = (xmin == 0) & (xmax == 0)  # all-zero row: any non-degenerate grid will do
        xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
        xmax = torch.where(dead, torch.ones_like(xmax), xmax)
        scale = ((xmax - xmin) / self.maxq).clamp_min(_MIN_SCALE).to(SCALE_DTYPE).float()
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)  # clamp: fp16 scale rounding
        return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes `clamp(round(x / scale) + zero, 0, maxq)` (fp32, integer-valued); broadcasts."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Grid value of x: `scale * (code - zero)` (docs/algorithms.md 2.4), fp32."""
    return scale * (quantize_codes(x, scale, zero, maxq) - zero)
