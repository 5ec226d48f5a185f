"""Joint compression (JD-Full / JD-Diag) against dense references on tiny shapes, float64."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.compress.jd import (
    JDConfig,
    compress_adapters,
    compress_module,
    fold_scaling,
    project_factors,
    project_onto_basis,
    reconstruct,
    reconstruction_errors,
)

F64 = torch.float64
D_OUT, D_IN, R = 24, 20, 3


def _orth(d, k, gen):
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=F64))[0]


def _random_factors(n, gen, r=R, spread=True):
    out = []
    for _ in range(n):
        scale = float(torch.exp(torch.randn(1, generator=gen, dtype=F64))) if spread else 1.0
        out.append((torch.randn(r, D_IN, generator=gen, dtype=F64),
                    torch.randn(D_OUT, r, generator=gen, dtype=F64) * scale))
    return out


def _shared_full(n, k0, gen, noise=0.0):
    """Adapters whose updates lie in span(U0) x span(V0) with full (non-diagonal) cores."""
    U0, V0 = _orth(D_OUT, k0, gen), _orth(D_IN, k0, gen)
    out = []
    for _ in range(n):
        A = torch.randn(R, k0, generator=gen, dtype=F64) @ V0.T
        B = U0 @ torch.randn(k0, R, generator=gen, dtype=F64)
        if noise:
            A = A + noise * torch.randn(A.shape, generator=gen, dtype=F64)
            B = B + noise * torch.randn(B.shape, generator=gen, dtype=F64)
        out.append((A, B))
    return out


def _shared_diag(n, k0, gen):
    """Updates U1 diag(d_i) V1^T with non-orthogonal U1, V1; adapter i uses entries i..i+R-1 mod k0."""
    U1 = torch.randn(D_OUT, k0, generator=gen, dtype=F64)
    V1 = torch.randn(D_IN, k0, generator=gen, dtype=F64)
    out = []
    for i in range(n):
        idx = torch.arange(i, i + R) % k0
        d = torch.randn(R, generator=gen, dtype=F64)
        out.append((V1[:, idx].T.clone(), U1[:, idx] * d))
    return out


def _dense_rel_errors(factors, mod):
    errs = []
    for i, (A, B) in enumerate(factors):
        full = B @ A
        errs.append(float(((full - mod.delta(i)) ** 2).sum() / (full**2).sum()))
    return torch.tensor(errs, dtype=F64)


def _objective(factors, errors):
    """sum_i ||B_i A_i - U S_i V^T||^2 (what transform='none' minimizes)."""
    norms = torch.tensor([float(((B @ A) ** 2).sum()) for A, B in factors], dtype=F64)
    return float((errors * norms).sum())


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_exact_when_k_covers_all_adapters(kind):
    gen = torch.Generator().manual_seed(0)
    factors = _random_factors(4, gen)
    mod = compress_module(factors, JDConfig(rank=4 * R, kind=kind), dtype=F64)
    assert mod.errors.max() < 1e-10
    for i, (A, B) in enumerate(factors):
        torch.testing.assert_close(mod.delta(i), B @ A, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("k", [8, 10])
def test_full_exact_on_shared_basis(k):
    gen = torch.Generator().manual_seed(1)
    factors = _shared_full(7, 8, gen)  # stacked rank 21 > k, shared rank 8 <= k
    mod = compress_module(factors, JDConfig(rank=k, kind="full"), dtype=F64)
    assert mod.converged and mod.errors.max() < 1e-10
    torch.testing.assert_close(mod.U.T @ mod.U, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(_dense_rel_errors(factors, mod), mod.errors, atol=1e-10, rtol=0)


def test_diag_exact_on_shared_diagonal_structure():
    gen = torch.Generator().manual_seed(2)
    factors = _shared_diag(8, 9, gen)
    mod = compress_module(factors, JDConfig(rank=9, kind="diag"), dtype=F64)
    assert mod.sigma.shape == (8, 9)
    assert mod.errors.max() < 1e-10
    for i, (A, B) in enumerate(factors):
        torch.testing.assert_close(mod.delta(i), B @ A, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_errors_from_factors_equal_dense(kind):
    gen = torch.Generator().manual_seed(3)
    factors = _random_factors(5, gen)
    k = 6
    U = torch.randn(D_OUT, k, generator=gen, dtype=F64)  # arbitrary, non-orthonormal
    V = torch.randn(D_IN, k, generator=gen, dtype=F64)
    shape = (5, k, k) if kind == "full" else (5, k)
    sigma = torch.randn(shape, generator=gen, dtype=F64)
    got = reconstruction_errors(factors, U, V, sigma)
    want = torch.tensor(
        [float(((B @ A - reconstruct(U, V, sigma[i])) ** 2).sum() / ((B @ A) ** 2).sum())
         for i, (A, B) in enumerate(factors)], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_fit_errors_match_dense_and_bounded_by_one(kind):
    gen = torch.Generator().manual_seed(4)
    factors = _shared_full(6, 6, gen, noise=0.3)
    mod = compress_module(factors, JDConfig(rank=5, kind=kind), dtype=F64)
    torch.testing.assert_close(_dense_rel_errors(factors, mod), mod.errors, atol=1e-9, rtol=1e-7)
    # Sigma is the least-squares core, so the error never exceeds the update itself.
    assert (mod.errors <= 1 + 1e-12).all()


def _dense_alternating_svd(factors, k, iters=300):
    """Reference JD-Full (9.4): alternate exact top-k singular vectors of dense stacks."""
    mats = [B @ A for A, B in factors]
    U = torch.linalg.svd(torch.cat(mats, 1), full_matrices=False)[0][:, :k]
    V = torch.linalg.svd(torch.cat([m.T for m in mats], 1), full_matrices=False)[0][:, :k]
    for _ in range(iters):
        U = torch.linalg.svd(torch.cat([m @ V for m in mats], 1), full_matrices=False)[0][:, :k]
        V = torch.linalg.svd(torch.cat([m.T @ U for m in mats], 1), full_matrices=False)[0][:, :k]
    return sum(float(((U.T @ m @ V) ** 2).sum()) for m in mats)


def test_full_reaches_dense_alternating_svd_objective():
    gen = torch.Generator().manual_seed(5)
    factors = _random_factors(6, gen, spread=False)
    k = 7
    mod = compress_module(factors, JDConfig(rank=k, kind="full", transform="none", max_iters=2000, tol=1e-9),
                          dtype=F64)
    captured = sum(float(((B @ A) ** 2).sum()) for A, B in factors) - _objective(factors, mod.errors)
    assert captured == pytest.approx(_dense_alternating_svd(factors, k), rel=1e-6)


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_error_weakly_decreases_with_rank(kind):
    gen = torch.Generator().manual_seed(6)
    factors = _shared_full(6, 8, gen, noise=0.2)
    objs = [
        _objective(factors, compress_module(factors, JDConfig(rank=k, kind=kind, transform="none", max_iters=60),
                                            dtype=F64).errors)
        for k in (2, 4, 8, 12)
    ]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objs, objs[1:])), objs
    assert objs[-1] < 0.5 * objs[0]


def test_diag_als_objective_never_increases():
    gen = torch.Generator().manual_seed(7)
    factors = _random_factors(5, gen, spread=False)
    objs = [
        _objective(factors, compress_module(factors, JDConfig(rank=6, kind="diag", transform="none",
                                                              max_iters=it, tol=1e-12), dtype=F64).errors)
        for it in (0, 1, 2, 5, 20, 60)
    ]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(objs, objs[1:])), objs
    assert objs[-1] < objs[0]


def test_diag_sigma_solves_hadamard_gram_system_not_diag_projection():
    gen = torch.Generator().manual_seed(8)
    factors = _random_factors(3, gen)
    U = torch.randn(D_OUT, 4, generator=gen, dtype=F64)
    V = torch.randn(D_IN, 4, generator=gen, dtype=F64)
    A, B = factors[0]
    sigma = project_onto_basis(A, B, U, V, "diag")
    # Reference: least squares over vec(U diag(s) V^T) = sum_j s_j vec(u_j v_j^T).
    design = torch.stack([torch.outer(U[:, j], V[:, j]).flatten() for j in range(4)], 1)
    want = torch.linalg.lstsq(design, (B @ A).flatten()).solution
    torch.testing.assert_close(sigma, want, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(sigma, torch.diagonal(U.T @ B @ A @ V), rtol=1e-3)


def test_projection_of_adapter_in_basis_is_exact():
    gen = torch.Generator().manual_seed(9)
    factors = _shared_full(8, 6, gen)
    mod = compress_module(factors[:6], JDConfig(rank=6), dtype=F64)
    A, B = factors[7]  # held out, same subspaces
    core = project_onto_basis(A, B, mod.U, mod.V, "full")
    torch.testing.assert_close(core, mod.U.T @ (B @ A) @ mod.V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reconstruct(mod.U, mod.V, core), B @ A, rtol=1e-8, atol=1e-10)
    sig, err = project_factors([factors[7]], mod.U, mod.V, "full")
    assert float(err[0]) < 1e-10
    torch.testing.assert_close(sig[0], core, rtol=1e-10, atol=1e-12)


def test_projection_diag_exact_for_diagonal_member():
    gen = torch.Generator().manual_seed(10)
    factors = _shared_diag(9, 9, gen)  # the first 8 adapters cover all 9 components
    mod = compress_module(factors[:8], JDConfig(rank=9, kind="diag"), dtype=F64)
    A, B = factors[8]
    s = project_onto_basis(A, B, mod.U, mod.V, "diag")
    torch.testing.assert_close(reconstruct(mod.U, mod.V, s), B @ A, rtol=1e-7, atol=1e-9)


def test_diag_exact_when_rank_exceeds_structure():
    gen = torch.Generator().manual_seed(18)
    factors = _shared_diag(6, 7, gen)  # 7 components used, fitted at k = 9
    mod = compress_module(factors, JDConfig(rank=9, kind="diag"), dtype=F64)
    assert mod.errors.max() < 1e-10
    assert torch.isfinite(mod.U).all() and torch.isfinite(mod.sigma).all()


def test_normalize_makes_fit_invariant_to_adapter_scale():
    gen = torch.Generator().manual_seed(11)
    factors = _shared_full(6, 8, gen, noise=0.3)
    scaled = [(A, B * (1000.0 if i == 0 else 1.0)) for i, (A, B) in enumerate(factors)]
    cfg = JDConfig(rank=4, transform="normalize")
    a, b = (compress_module(f, cfg, dtype=F64) for f in (factors, scaled))
    torch.testing.assert_close(a.errors, b.errors, rtol=1e-8, atol=1e-12)
    # The scale comes back in Sigma: reconstruction is in the original units.
    torch.testing.assert_close(b.delta(0), 1000.0 * a.delta(0), rtol=1e-8, atol=1e-8)
    # Without normalization the big adapter takes the basis and the others pay for it.
    c = compress_module(scaled, JDConfig(rank=4, transform="none"), dtype=F64)
    assert float(c.errors[0]) < float(b.errors[0])
    assert float(c.errors[1:].mean()) > float(b.errors[1:].mean())


def test_fit_does_not_depend_on_lora_gauge():
    gen = torch.Generator().manual_seed(12)
    factors = _shared_full(5, 7, gen, noise=0.2)
    regauged = []
    for A, B in factors:
        Rm = torch.randn(R, R, generator=gen, dtype=F64) + 3 * torch.eye(R, dtype=F64)
        regauged.append((Rm @ A, B @ torch.linalg.inv(Rm)))  # same update B A
    cfg = JDConfig(rank=5, transform="none")
    a, b = (compress_module(f, cfg, dtype=F64) for f in (factors, regauged))
    torch.testing.assert_close(a.errors, b.errors, rtol=1e-6, atol=1e-10)


def test_svd_init_alone_spans_a_shared_structure():
    gen = torch.Generator().manual_seed(19)
    factors = _shared_full(7, 6, gen)
    mod = compress_module(factors, JDConfig(rank=6, max_iters=0), dtype=F64)  # initialisation only
    assert mod.errors.max() < 1e-10


def test_warm_start_converges_immediately():
    gen = torch.Generator().manual_seed(13)
    factors = _shared_full(6, 8, gen, noise=0.1)
    cfg = JDConfig(rank=6, tol=1e-7, max_iters=500)
    cold = compress_module(factors, cfg, dtype=F64)
    warm = compress_module(factors, cfg, init=(cold.U, cold.V), dtype=F64)
    assert warm.iters <= 2
    torch.testing.assert_close(warm.errors, cold.errors, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_follow_dtype_and_cast_inputs(dtype):
    gen = torch.Generator().manual_seed(14)
    factors = [(A.float(), B.float()) for A, B in _shared_full(4, 5, gen)]
    mod = compress_module(factors, JDConfig(rank=5), dtype=dtype)
    assert mod.U.dtype == mod.V.dtype == mod.sigma.dtype == dtype
    assert mod.errors.dtype == F64
    assert float(mod.errors.max()) < (1e-9 if dtype == F64 else 1e-5)


def test_zero_update_is_kept_exact():
    gen = torch.Generator().manual_seed(15)
    factors = _random_factors(3, gen)
    factors[1] = (factors[1][0], torch.zeros(D_OUT, R, dtype=F64))  # untrained PEFT B
    mod = compress_module(factors, JDConfig(rank=2 * R), dtype=F64)
    assert float(mod.errors[1]) == 0.0 and float(mod.sigma[1].abs().max()) == 0.0
    assert mod.errors[[0, 2]].max() < 1e-10


def test_compress_adapters_per_module_and_fold_scaling():
    gen = torch.Generator().manual_seed(16)
    f1, f2 = _shared_full(4, 5, gen), _shared_full(4, 5, gen)
    adapters = [{(0, "q_proj"): fold_scaling(*f1[i], 2.0), (1, "q_proj"): f2[i]} for i in range(4)]
    out = compress_adapters(adapters, JDConfig(rank=5), dtype=F64)
    assert sorted(out) == [(0, "q_proj"), (1, "q_proj")]
    A, B = f1[2]
    torch.testing.assert_close(out[(0, "q_proj")].delta(2), 2.0 * B @ A, rtol=1e-8, atol=1e-10)


def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(17)
    good = _random_factors(2, gen)
    with pytest.raises(ValueError, match="empty"):
        compress_module([], JDConfig(rank=2))
    with pytest.raises(ValueError, match=r"adapter 1: update shape"):
        compress_module([good[0], (torch.randn(R, D_IN + 1, dtype=F64), good[1][1])], JDConfig(rank=2))
    with pytest.raises(ValueError, match=r"adapter 0: .* disagree on the LoRA rank"):
        compress_module([(good[0][0], good[0][1][:, :2])], JDConfig(rank=1))
    with pytest.raises(ValueError, match=r"min\(d_in, d_out\) = min\(20, 24\)"):
        compress_module(good, JDConfig(rank=21))
    with pytest.raises(ValueError, match=r"rank 7 exceeds the stacked rank 6"):
        compress_module(good, JDConfig(rank=7))
    nan = (good[0][0].clone(), good[0][1].clone())
    nan[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="adapter 1: A or B contains NaN"):
        compress_module([good[1], nan], JDConfig(rank=2))
    with pytest.raises(ValueError, match=r"adapter 1 targets different modules.*missing \[\(1, 'q_proj'\)\]"):
        compress_adapters([{(0, "q_proj"): good[0], (1, "q_proj"): good[1]}, {(0, "q_proj"): good[1]}],
                          JDConfig(rank=2))
    with pytest.raises(ValueError, match="kind"):
        JDConfig(kind="dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transform"):
        JDConfig(transform="normalize_BA")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not fit the basis"):
        project_onto_basis(*good[0], torch.zeros(D_OUT + 1, 2, dtype=F64), torch.zeros(D_IN, 2, dtype=F64), "full")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_cuda_fit_matches_cpu(kind):
    gen = torch.Generator().manual_seed(20)
    factors = _shared_full(6, 8, gen, noise=0.2)
    cfg = JDConfig(rank=6, kind=kind, max_iters=50)
    cpu = compress_module(factors, cfg, dtype=F64)
    gpu = compress_module(factors, cfg, device="cuda", dtype=F64)
    assert gpu.U.device.type == "cuda" and gpu.sigma.device.type == "cuda"
    torch.testing.assert_close(gpu.errors, cpu.errors, rtol=1e-5, atol=1e-9)
    core = project_onto_basis(*factors[0], gpu.U, gpu.V, kind)
    torch.testing.assert_close(core.cpu(), gpu.sigma[0].cpu() / 1.0, rtol=1e-6, atol=1e-8)
