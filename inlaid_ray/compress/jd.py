"""Joint compression of many LoRA updates of one module into shared bases (Compress then Serve,
Brüel-Gabrielsson et al. 2025; docs/algorithms.md 9.2-9.5).

n adapters' updates `B_i A_i` (scaling folded into B_i) are approximated as `U Sigma_i V^T` with a
shared `U [d_out, k]`, `V [d_in, k]` and a per-adapter core: a full `k x k` matrix ("JD-Full",
alternating maximization over orthonormal U and V, 9.4) or a diagonal ("JD-Diag", alternating
least squares with the Hadamard-Gram solve, 9.5). Fits start from the stacked factors' SVD
(JD-Diag also tries a Jennrich joint-diagonalization start) and stop on subspace change or
objective stall, with an iteration cap. Everything is computed from the factors (see
jd_factors): a dense `B_i A_i` is never formed. Small solves run in float64 whatever
the compute dtype, so exact cases reach ~1e-12 relative squared error in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from inlaid_ray.compress.jd_factors import (  # noqa: F401  (re-exported: the public JD surface)
    AdapterFactors,
    Factors,
    Kind,
    ModuleKey,
    StackedFactors,
    Transform,
    project_factors,
    project_onto_basis,
    project_stacked,
    psd_sqrt_factor,
    reconstruct,
    reconstruction_errors,
    solve_spd,
    stack_factors,
    stacked_errors,
    unnormalize_cores,
    validate_adapters,
    validate_factors,
)


@dataclass(frozen=True)
class JDConfig:
    """Settings of one joint compression (docs/algorithms.md 9.4/9.5)."""

    rank: int = 32  # shared rank k of U and V
    kind: Kind = "full"  # "full": Sigma_i is k x k; "diag": Sigma_i is a k-vector
    transform: Transform = "normalize"  # "normalize": A_i/||A_i||, B_i/||B_i|| before fitting (9.2)
    max_iters: int = 100  # cap on outer iterations (0 = the initialisation only)
    tol: float = 1e-5  # stop: subspace change of U, V < tol (full) or relative objective gain < tol^2
    seed: int = 0  # random mixtures in the diagonal initialisation

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"JDConfig.rank must be >= 1, got {self.rank}")
        if self.kind not in ("full", "diag"):
            raise ValueError(f"JDConfig.kind must be 'full' or 'diag', got {self.kind!r}")
        if self.transform not in ("normalize", "none"):
            raise ValueError(f"JDConfig.transform must be 'normalize' or 'none', got {self.transform!r}")
        if self.max_iters < 0 or not self.tol > 0:
            raise ValueError(f"JDConfig needs max_iters >= 0 and tol > 0, got {self.max_iters}, {self.tol}")


@dataclass
class JDModule:
    """Shared basis of one module and the cores of its n adapters (original scale, scaling folded).

    U [d_out, k], V [d_in, k]; sigma [n, k, k] (full) or [n, k] (diag); delta_i = U Sigma_i V^T.
    errors: float64 [n] relative squared Frobenius error of each adapter (9.7).
    """

    U: Tensor
    V: Tensor
    sigma: Tensor
    errors: Tensor
    iters: int = 0
    converged: bool = True

    @property
    def kind(self) -> Kind:
        return "full" if self.sigma.dim() == 3 else "diag"

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def delta(self, i: int) -> Tensor:
        """Dense reconstruction U Sigma_i V^T [d_out, d_in] of adapter i (tests and evaluation)."""
        return reconstruct(self.U, self.V, self.sigma[i])


def _top_left_singular(X: Tensor, k: int) -> Tensor:
    """Orthonormal top-k left singular vectors of X [d, m] via the smaller Gram matrix (float64)."""
    d, m = X.shape
    Xd = X.double()
    if m >= d:
        U = torch.linalg.eigh(Xd @ Xd.T)[1][:, -k:].flip(-1)
    else:
        U = Xd @ torch.linalg.eigh(Xd.T @ Xd)[1][:, -k:].flip(-1)
        U = U / torch.linalg.vector_norm(U, dim=0).clamp_min(1e-300)
        # Directions with ~zero singular value are noise after the division: re-orthonormalize.
        U, _ = torch.linalg.qr(U)
    return U.to(X.dtype)


def _subspace_change(new: Tensor, old: Tensor) -> float:
    """||new - old old^T new||_F / sqrt(k) for orthonormal columns (0 = same subspace)."""
    resid = new - old @ (old.T @ new)
    return float(torch.linalg.vector_norm(resid) / math.sqrt(new.shape[1]))


def _orth(X: Tensor) -> Tensor:
    Q, _ = torch.linalg.qr(X.double())
    return Q.to(X.dtype)


def _init_svd(st: StackedFactors, k: int) -> tuple[Tensor, Tensor]:
    """U0, V0 = top-k singular subspaces of sum_i (B_i A_i)(B_i A_i)^T and of its transpose.

    Built from the stacked factors [B_i L_i] with L_i L_i^T = A_i A_i^T, so the result does not
    depend on how a LoRA splits its update between A and B. U0 is the exact U-step for V = I (the
    best U if V were unconstrained), and when the updates share a rank <= k structure it already
    spans it; random starts (the official code) need iterations to find it and can stall.
    """
    n, r, d_in = st.A.shape
    la = psd_sqrt_factor(torch.bmm(st.A, st.A.transpose(1, 2)))  # [n, r, r]
    lb = psd_sqrt_factor(torch.bmm(st.Bt, st.Bt.transpose(1, 2)))
    xu = torch.bmm(st.Bt.transpose(1, 2), la)  # B_i L_i: [n, d_out, r]
    xv = torch.bmm(st.A.transpose(1, 2), lb)  # A_i^T L'_i: [n, d_in, r]
    U0 = _top_left_singular(xu.permute(1, 0, 2).reshape(xu.shape[1], n * r), k)
    V0 = _top_left_singular(xv.permute(1, 0, 2).reshape(d_in, n * r), k)
    return U0, V0


def _stop(change: float, gain: float, residual: float, tol: float) -> bool:
    """Converged when the subspaces stop moving, the objective stops improving (relative gain
    below tol^2) or nothing is left to fit. The last two matter when k exceeds the structure's
    rank: the surplus directions carry no energy and may rotate forever."""
    return change < tol or gain < tol * tol or residual < 1e-13


def _fit_full(st: StackedFactors, U: Tensor, V: Tensor, cfg: JDConfig) -> tuple[Tensor, Tensor, int, bool]:
    """Alternating maximization of F(U, V) = sum_i ||U^T B_i A_i V||_F^2 for JD-Full (9.4).

    Each half-step is one orthogonal-iteration step on the exact step's Gram matrix,
    U <- qr(sum_i B_i A_i V Sigma_i^T) with Sigma_i = U^T B_i A_i V (the "eigenvalue iteration"
    form of 9.4; same fixed points as taking top-k singular vectors of M_U). It needs only
    matrix products and a d x k QR, where the SVD form needs an (n r)-sized eigensolver per step.
    """
    n, r, d_in = st.A.shape
    k = U.shape[1]
    A2, Bt2 = st.A.reshape(n * r, d_in), st.Bt.reshape(n * r, -1)  # stacked rows of A_i, B_i^T
    total = float(st.sq_norm.sum()) or 1.0
    Q = (A2 @ V).view(n, r, k)  # A_i V
    P = (Bt2 @ U).view(n, r, k)  # B_i^T U
    captured = float((torch.bmm(P.transpose(1, 2), Q).double() ** 2).sum())
    for it in range(1, cfg.max_iters + 1):
        core = torch.bmm(P.transpose(1, 2), Q)  # Sigma_i [n, k, k]
        U_new = _orth(Bt2.T @ torch.bmm(Q, core.transpose(1, 2)).reshape(n * r, k))
        P = (Bt2 @ U_new).view(n, r, k)
        core = torch.bmm(P.transpose(1, 2), Q)
        V_new = _orth(A2.T @ torch.bmm(P, core).reshape(n * r, k))
        Q = (A2 @ V_new).view(n, r, k)
        new_captured = float((torch.bmm(P.transpose(1, 2), Q).double() ** 2).sum())
        change = max(_subspace_change(U_new, U), _subspace_change(V_new, V))
        gain = (new_captured - captured) / total
        U, V, captured = U_new, V_new, new_captured
        if _stop(change, gain, (total - captured) / total, cfg.tol):
            return U, V, it, True
    return U, V, cfg.max_iters, cfg.max_iters == 0


def _balance_columns(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-norm columns for U and V; products change only by a per-column factor absorbed in sigma."""
    nu = torch.linalg.vector_norm(U, dim=0).clamp_min(torch.finfo(U.dtype).tiny)
    nv = torch.linalg.vector_norm(V, dim=0).clamp_min(torch.finfo(V.dtype).tiny)
    return U / nu, V / nv


def _diag_objective(st: StackedFactors, U: Tensor, V: Tensor) -> tuple[Tensor, float]:
    """Optimal sigma [n, k] for (U, V) and the summed squared error of the stacked adapters."""
    sig, rel = project_stacked(st, U, V, "diag")
    return sig, float((rel * st.sq_norm).sum())


def _init_jennrich(st: StackedFactors, U0: Tensor, V0: Tensor, cfg: JDConfig) -> tuple[Tensor, Tensor] | None:
    """Joint-diagonalization start for JD-Diag: fit JD-Full, then diagonalize its cores.

    If Sigma_i = X D_i Y^T (a planted diagonal structure, or k = sum r_i), two random mixtures
    S_a, S_b of the cores give S_a S_b^{-1} = X (D_a D_b^{-1}) X^{-1}: eigenvectors recover X
    (Jennrich's algorithm), and ALS then starts at the exact answer. The cores are first reduced
    to their joint range (rank rho <= k), the k - rho unused directions are kept as they are.
    None if the mixture is singular on that range.
    """
    U, V, _, _ = _fit_full(st, U0, V0, cfg)
    core, _ = project_stacked(st, U, V, "full")
    core = core.double()  # [n, k, k]
    n, k, _ = core.shape
    # Column and row ranges of the cores: left singular vectors of [Sigma_1 .. Sigma_n] and of
    # [Sigma_1^T .. Sigma_n^T], both k x nk (thin SVD: only the k x k left factor is needed).
    left, sl, _ = torch.linalg.svd(core.transpose(0, 1).reshape(k, n * k), full_matrices=False)
    right, sr, _ = torch.linalg.svd(core.transpose(1, 2).transpose(0, 1).reshape(k, n * k), full_matrices=False)
    cut = n * k * torch.finfo(torch.float64).eps * float(max(sl[0], sr[0]))
    rho = min(int((sl > cut).sum()), int((sr > cut).sum()))
    if rho == 0:
        return None
    T = left[:, :rho].T @ core @ right[:, :rho]  # [n, rho, rho]
    gen = torch.Generator().manual_seed(cfg.seed)
    wa, wb = torch.randn(2, n, generator=gen, dtype=torch.float64).to(core.device)
    Sa, Sb = torch.einsum("n,nij->ij", wa, T), torch.einsum("n,nij->ij", wb, T)
    if torch.linalg.matrix_rank(Sb) < rho:
        return None
    evals, evecs = torch.linalg.eig(torch.linalg.solve(Sb.T, Sa.T).T)  # Sa Sb^{-1}
    # Complex pairs: their real and imaginary parts span the same real invariant plane.
    X = torch.where(evals.imag.unsqueeze(0) >= 0, evecs.real, evecs.imag)
    if not torch.isfinite(X).all() or torch.linalg.matrix_rank(X) < rho:
        return None
    Y = torch.linalg.solve(X, Sa).T  # Sa = X (D_a Y^T): rows of X^{-1} Sa are y_j scaled
    Xf = torch.cat([left[:, :rho] @ X, left[:, rho:]], dim=1)
    Yf = torch.cat([right[:, :rho] @ Y, right[:, rho:]], dim=1)
    return _balance_columns((U.double() @ Xf).to(U.dtype), (V.double() @ Yf).to(V.dtype))


def _fit_diag(st: StackedFactors, U: Tensor, V: Tensor, cfg: JDConfig) -> tuple[Tensor, Tensor, int, bool]:
    """ALS for U diag(sigma_i) V^T with free (non-orthonormal) U, V (9.5); each step is exact LS."""
    n, r, d_in = st.A.shape
    k = U.shape[1]
    U, V = _balance_columns(U, V)
    sig, obj = _diag_objective(st, U, V)
    total = float(st.sq_norm.sum()) or 1.0
    for it in range(1, cfg.max_iters + 1):
        gram_sig = sig.T @ sig  # sum_i sigma_i sigma_i^T, float64 [k, k]
        # U-step: U = (sum_i B_i A_i V S_i)(sum_i S_i V^T V S_i)^{-1}.
        Q = (st.A.reshape(n * r, d_in) @ V).view(n, r, k)
        num = st.Bt.reshape(n * r, -1).T @ (Q * sig.to(Q.dtype)[:, None, :]).reshape(n * r, k)
        U = solve_spd((V.T @ V).double() * gram_sig, num.double().T).T.to(U.dtype)
        # V-step: V = (sum_i A_i^T B_i^T U S_i)(sum_i S_i U^T U S_i)^{-1}.
        P = (st.Bt.reshape(n * r, -1) @ U).view(n, r, k)
        num = st.A.reshape(n * r, d_in).T @ (P * sig.to(P.dtype)[:, None, :]).reshape(n * r, k)
        V = solve_spd((U.T @ U).double() * gram_sig, num.double().T).T.to(V.dtype)
        U, V = _balance_columns(U, V)
        sig, new_obj = _diag_objective(st, U, V)
        # No subspace test here: with k = rank of the data span(U) is fixed while the columns
        # (the rank-1 components) still move, so only the objective tells progress.
        gain, obj = (obj - new_obj) / total, new_obj
        if _stop(math.inf, gain, obj / total, cfg.tol):
            return U, V, it, True
    return U, V, cfg.max_iters, cfg.max_iters == 0


def fit_stacked(
    st: StackedFactors, config: JDConfig, init: tuple[Tensor, Tensor] | None = None
) -> JDModule:
    """Fit one module's stacked factors (rank checked by the caller); see compress_module."""
    k = config.rank
    if init is not None and tuple(init[0].shape[1:]) == (k,) and tuple(init[1].shape[1:]) == (k,):
        U0, V0 = (t.to(device=st.A.device, dtype=st.A.dtype) for t in init)
        if config.kind == "full":
            U0, V0 = _orth(U0), _orth(V0)
    else:
        U0, V0 = _init_svd(st, k)
        if config.kind == "diag" and config.max_iters > 0:
            jen = _init_jennrich(st, U0, V0, config)
            if jen is not None and _diag_objective(st, *jen)[1] < _diag_objective(st, U0, V0)[1]:
                U0, V0 = jen
    fit = _fit_full if config.kind == "full" else _fit_diag
    U, V, iters, converged = fit(st, U0, V0, config)
    sig, _ = project_stacked(st, U, V, config.kind)
    # Errors of the cores as stored (compute dtype), evaluated in float64.
    return JDModule(U, V, unnormalize_cores(sig, st), stacked_errors(st, U, V, sig), iters, converged)


def compress_module(
    factors: Factors,
    config: JDConfig,
    *,
    init: tuple[Tensor, Tensor] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> JDModule:
    """Jointly compress one module of n adapters into U [d_out, k], V [d_in, k] and cores.

    init: a warm start (U, V) of rank k, e.g. the cluster's previous basis; otherwise the stacked
    factors' SVD (see _init_svd), plus for JD-Diag a Jennrich start, keeping the better one.
    """
    validate_factors(factors, config.rank)
    return fit_stacked(stack_factors(factors, config.transform == "normalize", device, dtype), config, init)


def compress_adapters(
    adapters: Sequence[AdapterFactors],
    config: JDConfig,
    *,
    init: Mapping[ModuleKey, tuple[Tensor, Tensor]] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[ModuleKey, JDModule]:
    """Compress every module of a set of whole adapters independently (one basis per module, 9.2)."""
    keys = validate_adapters(adapters)
    out = {}
    for key in keys:
        factors = [ad[key] for ad in adapters]
        try:
            out[key] = compress_module(
                factors, config, init=(init or {}).get(key), device=device, dtype=dtype
            )
        except ValueError as exc:
            raise ValueError(f"module {key}: {exc}") from exc
    return out


def fold_scaling(A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(A, scale * B): the PEFT update s B A as a plain factor pair (9.2: scaling folded into B)."""
    return A, B * scale
