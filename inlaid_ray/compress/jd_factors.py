"""Stacked LoRA factors and the factor-only algebra of joint compression (docs/algorithms.md 9.6, 9.7).

One module's n adapters (A_i [r_i, d_in], B_i [d_out, r_i], scaling folded into B) are padded to a
common rank and stacked so that every product is one batched GEMM. On a fixed basis U [d_out, k],
V [d_in, k] this module gives each adapter's best core (full: U^T B A V for orthonormal bases, else
least squares; diag: the Hadamard-Gram solve) and the relative squared error
||B A - U S V^T||^2 / ||B A||^2 from r x r and k x k Gram matrices, never forming B A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from inlaid_ray.lora.adapter import Kind, ModuleKey

# Factors of one module for n adapters: (A [r_i, d_in], B [d_out, r_i]), LoRA scaling folded into B.
Factors = Sequence[tuple[Tensor, Tensor]]
Transform = Literal["normalize", "none"]
# Per (layer, module) -- the unit every basis is fitted for (9.2) -- one adapter's factors.
AdapterFactors = Mapping[ModuleKey, tuple[Tensor, Tensor]]


def reconstruct(U: Tensor, V: Tensor, sigma: Tensor) -> Tensor:
    """Dense U Sigma V^T for one core: sigma [k, k] (full) or [k] (diag)."""
    core = sigma if sigma.dim() == 2 else torch.diag(sigma)
    return U @ core @ V.T


@dataclass
class StackedFactors:
    """Factors of n adapters zero-padded to the largest rank r (padding leaves B_i A_i unchanged)."""

    A: Tensor  # [n, r, d_in]
    Bt: Tensor  # [n, r, d_out]  (B_i^T, so both factors stack along rows)
    a_norm: Tensor  # float64 [n]: ||A_i||_F divided out by "normalize" (1 otherwise)
    b_norm: Tensor  # float64 [n]
    sq_norm: Tensor  # float64 [n]: ||B_i A_i||_F^2 of the (possibly normalized) factors
    ranks: list[int]

    @property
    def n(self) -> int:
        return self.A.shape[0]

    def select(self, idx: Sequence[int] | Tensor) -> "StackedFactors":
        """The stack of a subset of adapters (rows in the order of idx)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        dev = idx.to(self.A.device)
        return StackedFactors(
            self.A[dev], self.Bt[dev], self.a_norm[idx], self.b_norm[idx], self.sq_norm[idx],
            [self.ranks[i] for i in idx.tolist()],
        )

    @property
    def stacked_rank(self) -> int:
        return sum(self.ranks)


def validate_factors(factors: Factors, rank: int | None = None) -> tuple[int, int]:
    """Check one module's factor list; return (d_out, d_in). ValueError names the offending adapter."""
    if len(factors) == 0:
        raise ValueError("no adapters to compress: the factor list is empty")
    d_out = d_in = -1
    for i, pair in enumerate(factors):
        if len(pair) != 2:
            raise ValueError(f"adapter {i}: expected an (A, B) pair, got {len(pair)} items")
        A, B = pair
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"adapter {i}: A and B must be 2-D, got {tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"adapter {i}: A {tuple(A.shape)} and B {tuple(B.shape)} disagree on the LoRA rank")
        if i == 0:
            d_out, d_in = B.shape[0], A.shape[1]
        elif (B.shape[0], A.shape[1]) != (d_out, d_in):
            raise ValueError(
                f"adapter {i}: update shape (d_out, d_in) = {(B.shape[0], A.shape[1])} differs from "
                f"adapter 0's {(d_out, d_in)}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"adapter {i}: A or B contains NaN or Inf")
    if rank is not None:
        if rank > min(d_in, d_out):
            raise ValueError(f"rank {rank} exceeds min(d_in, d_out) = min({d_in}, {d_out})")
        stacked = sum(A.shape[0] for A, _ in factors)
        if rank > stacked:
            raise ValueError(
                f"rank {rank} exceeds the stacked rank {stacked} (sum of the LoRA ranks of "
                f"{len(factors)} adapters): the shared basis would have {rank - stacked} empty directions"
            )
    return d_out, d_in


def stack_factors(
    factors: Factors, normalize: bool, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> StackedFactors:
    """Pad and stack one module's (validated) factors; "normalize" divides A_i and B_i by their norms."""
    n, ranks = len(factors), [A.shape[0] for A, _ in factors]
    r, d_in, d_out = max(ranks), factors[0][0].shape[1], factors[0][1].shape[0]
    A3 = torch.zeros(n, r, d_in, device=device, dtype=dtype)
    Bt3 = torch.zeros(n, r, d_out, device=device, dtype=dtype)
    for i, (A, B) in enumerate(factors):
        A3[i, : A.shape[0]] = A.to(device=device, dtype=dtype)
        Bt3[i, : A.shape[0]] = B.T.to(device=device, dtype=dtype)
    a_norm = torch.linalg.vector_norm(A3.double(), dim=(1, 2)).cpu()
    b_norm = torch.linalg.vector_norm(Bt3.double(), dim=(1, 2)).cpu()
    if normalize:
        # Zero factors (an untrained PEFT B) stay as they are: their update is 0 and exact anyway.
        a_norm = torch.where(a_norm > 0, a_norm, torch.ones_like(a_norm))
        b_norm = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        A3 /= a_norm.to(device=device, dtype=dtype)[:, None, None]
        Bt3 /= b_norm.to(device=device, dtype=dtype)[:, None, None]
    else:
        a_norm, b_norm = torch.ones_like(a_norm), torch.ones_like(b_norm)
    # ||B A||_F^2 = tr((B^T B)(A A^T)) with r x r Grams.
    gb = torch.bmm(Bt3, Bt3.transpose(1, 2)).double()
    ga = torch.bmm(A3, A3.transpose(1, 2)).double()
    sq_norm = (gb * ga).sum(dim=(1, 2)).clamp_min(0).cpu()
    return StackedFactors(A3, Bt3, a_norm, b_norm, sq_norm, ranks)


def psd_sqrt_factor(W: Tensor) -> Tensor:
    """L [.., r, r] with L L^T = W for PSD W (eigh based: W may be singular)."""
    evals, evecs = torch.linalg.eigh(W.double())
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)).to(W.dtype)


def hadamard_gram(U: Tensor, V: Tensor) -> Tensor:
    """M = (U^T U) o (V^T V), float64 [k, k] (the JD-Diag normal matrix)."""
    return (U.T @ U).double() * (V.T @ V).double()


def solve_spd(M: Tensor, rhs: Tensor) -> Tensor:
    """Solve M X = rhs for symmetric PSD M [k, k] (float64), with a tiny ridge if M is singular."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        ridge = 1e-12 * float(M.diagonal().abs().mean().clamp_min(1e-300))
        L = torch.linalg.cholesky(M + ridge * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
    return torch.cholesky_solve(rhs, L)


def project_stacked(st: StackedFactors, U: Tensor, V: Tensor, kind: Kind) -> tuple[Tensor, Tensor]:
    """Best cores of the stacked (normalized) adapters on a fixed basis, and their relative errors.

    Returns sigma (compute dtype; [n, k, k] or [n, k]) and errors float64 [n].
    """
    n, r, _ = st.A.shape
    k = U.shape[1]
    P = (st.Bt.reshape(n * r, -1) @ U).view(n, r, k)  # rows of B_i^T U
    Q = (st.A.reshape(n * r, -1) @ V).view(n, r, k)  # rows of A_i V
    if kind == "full":
        core = torch.bmm(P.transpose(1, 2), Q).double()  # U^T B_i A_i V
        GU, GV = (U.T @ U).double(), (V.T @ V).double()
        # Full LS core for a non-orthonormal basis: GU Sigma GV = U^T B A V.
        orthonormal = torch.allclose(GU, torch.eye(k, dtype=GU.dtype, device=GU.device), atol=1e-6) and (
            torch.allclose(GV, torch.eye(k, dtype=GV.dtype, device=GV.device), atol=1e-6)
        )
        if orthonormal:  # the JD-Full case: error = ||B A||^2 - ||U^T B A V||^2
            sig = core
            cross = recon = (core * core).sum(dim=(1, 2))
        else:
            sig = solve_spd(GU, solve_spd(GV, core.transpose(1, 2)).transpose(1, 2))
            cross = (sig * core).sum(dim=(1, 2))
            recon = (torch.matmul(GU, sig) * torch.matmul(sig, GV)).sum(dim=(1, 2))
    else:
        b = (P * Q).sum(dim=1).double()  # b_i[j] = (U^T B_i A_i V)[j, j]
        M = hadamard_gram(U, V)
        sig = solve_spd(M, b.T).T
        cross = (sig * b).sum(dim=1)
        recon = ((sig @ M) * sig).sum(dim=1)
    err = (st.sq_norm.to(cross.device) - 2 * cross + recon).clamp_min(0).cpu()
    rel = torch.where(st.sq_norm > 0, err / st.sq_norm.clamp_min(1e-300), torch.zeros_like(err))
    return sig.to(U.dtype), rel


def unnormalize_cores(sig: Tensor, st: StackedFactors) -> Tensor:
    """Cores of the normalized factors -> cores of the original adapters (norms multiplied back)."""
    scale = (st.a_norm * st.b_norm).to(device=sig.device, dtype=sig.dtype)
    return sig * scale.view(-1, *([1] * (sig.dim() - 1)))


def project_onto_basis(A: Tensor, B: Tensor, U: Tensor, V: Tensor, kind: Kind) -> Tensor:
    """Core of one adapter (A [r, d_in], B [d_out, r], scaling folded) on a fixed basis (9.6).

    full: Sigma = U^T B A V [k, k] (least squares if U, V are not orthonormal); diag: sigma [k]
    solving ((U^T U) o (V^T V)) sigma = diag(U^T B A V). Output dtype and device follow U.
    """
    validate_factors([(A, B)])
    if (B.shape[0], A.shape[1]) != (U.shape[0], V.shape[0]) or U.shape[1] != V.shape[1]:
        raise ValueError(
            f"adapter update {(B.shape[0], A.shape[1])} does not fit the basis U {tuple(U.shape)}, V {tuple(V.shape)}"
        )
    st = stack_factors([(A, B)], normalize=False, device=U.device, dtype=U.dtype)
    sig, _ = project_stacked(st, U, V, kind)
    return sig[0]


def project_factors(
    factors: Factors, U: Tensor, V: Tensor, kind: Kind, transform: Transform = "normalize"
) -> tuple[Tensor, Tensor]:
    """Cores (original scale) and relative squared errors float64 [n] of n adapters on a basis."""
    d_out, d_in = validate_factors(factors)
    if (d_out, d_in) != (U.shape[0], V.shape[0]):
        raise ValueError(f"updates {(d_out, d_in)} do not fit the basis U {tuple(U.shape)}, V {tuple(V.shape)}")
    st = stack_factors(factors, transform == "normalize", U.device, U.dtype)
    sig, rel = project_stacked(st, U, V, kind)
    return unnormalize_cores(sig, st), rel


def stacked_errors(st: StackedFactors, U: Tensor, V: Tensor, sigma: Tensor) -> Tensor:
    """float64 [n] relative squared errors of given cores (for the stacked, possibly normalized,
    factors), with every product in float64: the trace formula subtracts nearly equal numbers
    when the fit is good, which float32 products would blur."""
    n, r, _ = st.A.shape
    k = U.shape[1]
    U, V, sig = U.double(), V.double(), sigma.to(U.device).double()
    P = (st.Bt.reshape(n * r, -1).double() @ U).view(n, r, k)
    Q = (st.A.reshape(n * r, -1).double() @ V).view(n, r, k)
    GU, GV = U.T @ U, V.T @ V
    if sig.dim() == 3:
        cross = (sig * torch.bmm(P.transpose(1, 2), Q)).sum(dim=(1, 2))
        recon = (torch.matmul(GU, sig) * torch.matmul(sig, GV)).sum(dim=(1, 2))
    else:
        cross = (sig * (P * Q).sum(dim=1)).sum(dim=1)
        recon = ((sig @ (GU * GV)) * sig).sum(dim=1)
    err = (st.sq_norm.to(cross.device) - 2 * cross + recon).clamp_min(0).cpu()
    # A zero update is exact when its reconstruction is zero too, and infinitely wrong otherwise.
    zero_case = torch.where(err > 0, torch.full_like(err, math.inf), torch.zeros_like(err))
    return torch.where(st.sq_norm > 0, err / st.sq_norm.clamp_min(1e-300), zero_case)


def reconstruction_errors(factors: Factors, U: Tensor, V: Tensor, sigma: Tensor) -> Tensor:
    """Relative squared error ||B_i A_i - U Sigma_i V^T||^2 / ||B_i A_i||^2 float64 [n] (9.7), from factors."""
    validate_factors(factors)
    if sigma.shape[0] != len(factors):
        raise ValueError(f"sigma has {sigma.shape[0]} cores for {len(factors)} adapters")
    return stacked_errors(stack_factors(factors, False, U.device, U.dtype), U, V, sigma)


def validate_adapters(adapters: Sequence[AdapterFactors]) -> list[ModuleKey]:
    """Check that every adapter targets the same (layer, module) set; return it sorted."""
    if len(adapters) == 0:
        raise ValueError("no adapters to compress: the adapter list is empty")
    keys = sorted(adapters[0])
    if not keys:
        raise ValueError("adapter 0 has no modules")
    for i, ad in enumerate(adapters[1:], start=1):
        if set(ad) != set(keys):
            missing = sorted(set(keys) - set(ad))[:4]
            extra = sorted(set(ad) - set(keys))[:4]
            raise ValueError(
                f"adapter {i} targets different modules than adapter 0: missing {missing}, extra {extra}"
            )
    return keys
