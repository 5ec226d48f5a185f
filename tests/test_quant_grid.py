"""QuantGrid: validation of settings and the min-max grid of docs/algorithms.md 2.4, checked against
a line-by-line transcription of the IST-DASLab `Quantizer.find_params` (plus fp16 scales)."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.quant import QuantGrid, quantize, quantize_codes


def _ist_find_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """IST-DASLab gptq/quant.py find_params (weight=True, perchannel), scale rounded to fp16."""
    maxq = 2**bits - 1
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = ((xmax - xmin) / maxq).half().float()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_find_params_matches_reference(bits: int, sym: bool) -> None:
    torch.manual_seed(bits)
    x = torch.randn(6, 40)
    x[1] = x[1].abs()  # all non-negative row
    x[2] = -x[2].abs()  # all non-positive row
    x[3] = 0.0  # all-zero row
    grid = QuantGrid(bits=bits, group_size=-1, sym=sym)
    scale, zero = grid.find_params(x)
    ref_scale, ref_zero = _ist_find_params(x.clone(), bits, sym)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    if sym:
        assert torch.all(zero == (grid.maxq + 1) / 2)
    assert torch.equal(scale.half().float(), scale)  # fp16-representable by construction


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_is_on_grid_and_codes_in_range(bits: int) -> None:
    torch.manual_seed(0)
    grid = QuantGrid(bits=bits, group_size=-1, sym=False)
    x = torch.randn(5, 64)
    scale, zero = grid.find_params(x)
    codes = quantize_codes(x, scale[:, None], zero[:, None], grid.maxq)
    q = quantize(x, scale[:, None], zero[:, None], grid.maxq)
    assert codes.min() >= 0 and codes.max() <= grid.maxq and torch.equal(codes, codes.round())
    assert torch.equal(q, scale[:, None] * (codes - zero[:, None]))
    # rounding to nearest is at most half a step off, plus the range lost to the fp16 rounding of
    # the scale (relative 2^-11, over maxq steps) at the clamped ends
    bound = scale[:, None] * (0.5 + grid.maxq * 2.0**-11)
    assert torch.all((x - q).abs() <= bound)


def test_all_zero_row_guard_quantizes_zero_exactly() -> None:
    grid = QuantGrid(bits=4, group_size=-1)
    x = torch.zeros(3, 16)
    scale, zero = grid.find_params(x)
    assert torch.all(scale > 0)
    assert torch.equal(quantize(x, scale[:, None], zero[:, None], grid.maxq), x)


@pytest.mark.parametrize("bits", [1, 5, 6, 16])
def test_bad_bits_rejected_naming_value(bits: int) -> None:
    with pytest.raises(ValueError, match=f"bits={bits}"):
        QuantGrid(bits=bits)


def test_bad_group_size_rejected() -> None:
    with pytest.raises(ValueError, match="group_size=0"):
        QuantGrid(group_size=0)
    grid = QuantGrid(group_size=48)
    with pytest.raises(ValueError, match=r"group_size=48.*d_in=128"):
        grid.group_width(128)
    assert grid.group_width(96) == 48 and QuantGrid(group_size=-1).group_width(96) == 96
