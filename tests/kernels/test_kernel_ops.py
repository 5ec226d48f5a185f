"""The device selector `inlaid_ray.kernels.ops`: reference on CPU tensors, Triton on CUDA
tensors, no silent fallback; and the package imports without a GPU (and without Triton)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from inlaid_ray.kernels.compressed_lora_batch import CompressedLoRABatch
from inlaid_ray.kernels.compressed_lora import compressed_lora as compressed_lora_triton
from inlaid_ray.kernels.ops import compressed_lora, gptq_matmul, lora_shrink_expand
from inlaid_ray.kernels.reference import (
    compressed_lora_ref,
    gptq_matmul_ref,
    lora_shrink_expand_ref,
    pack_codes,
)
from inlaid_ray.model.forward_batch import LoRABatch


def gptq_inputs(device, bits=4):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 2**bits, (256, 64), generator=gen)
    z = torch.randint(0, 2**bits - 1, (2, 64), generator=gen)
    return (
        torch.randn(3, 256, generator=gen).half().to(device),
        pack_codes(q, bits, 0).contiguous().to(device),
        pack_codes(z, bits, 1).contiguous().to(device),
        (torch.rand(2, 64, generator=gen) / 100).half().to(device),
        (torch.arange(256) // 128).int().to(device),
    )


def lora_inputs(device):
    gen = torch.Generator().manual_seed(1)
    a = (torch.randn(4, 8, 64, generator=gen) / 8).half().to(device)
    b = (torch.randn(4, 32, 8, generator=gen) / 3).half().to(device)
    x = torch.randn(5, 64, generator=gen).half().to(device)
    batch = LoRABatch.from_token_slots(torch.tensor([3, -1, 0, 3, 1]).to(device))
    return x, a, b, batch


def compressed_inputs(device):
    gen = torch.Generator().manual_seed(2)
    v = (torch.randn(2, 64, 8, generator=gen) / 8).half().to(device)
    u = (torch.randn(2, 32, 8, generator=gen) / 3).half().to(device)
    sigma = torch.randn(2, 3, 8, generator=gen).half().to(device)
    batch = CompressedLoRABatch.from_ids(torch.tensor([1, -1, 0, 1]).to(device), torch.tensor([2, 0, 1, 0]).to(device))
    return torch.randn(4, 64, generator=gen).half().to(device), v, u, sigma, batch


def test_cpu_tensors_use_the_reference():
    x, qw, qz, sc, gi = gptq_inputs("cpu")
    assert torch.equal(gptq_matmul(x, qw, qz, sc, gi, 4, group_size=128), gptq_matmul_ref(x, qw, qz, sc, gi, 4))
    x, a, b, batch = lora_inputs("cpu")
    y1, y2 = torch.zeros(5, 32, dtype=torch.float16), torch.zeros(5, 32, dtype=torch.float16)
    lora_shrink_expand(y1, x, a, b, batch)
    lora_shrink_expand_ref(y2, x, a, b, batch)
    assert torch.equal(y1, y2)
    x, v, u, sigma, cbatch = compressed_inputs("cpu")
    y1, y2 = torch.zeros(4, 32, dtype=torch.float16), torch.zeros(4, 32, dtype=torch.float16)
    compressed_lora(y1, x, v, u, sigma, cbatch)
    compressed_lora_ref(y2, x, v, u, sigma, cbatch)
    assert torch.equal(y1, y2)


def test_cpu_reference_covers_3_bits():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 8, (256, 64), generator=gen)
    z = torch.randint(0, 7, (2, 64), generator=gen)
    qw, qz = pack_codes(q, 3, 0).contiguous(), pack_codes(z, 3, 1).contiguous()
    sc, gi = torch.full((2, 64), 0.01).half(), (torch.arange(256) // 128).int()
    x = torch.randn(2, 256, generator=gen).half()
    assert torch.equal(gptq_matmul(x, qw, qz, sc, gi, 3), gptq_matmul_ref(x, qw, qz, sc, gi, 3))


def _run_python(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_extra
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # two fresh Python processes
def test_package_import_does_not_import_triton_and_kernels_import_without_gpu():
    code = (
        "import sys, inlaid_ray.kernels\n"
        "assert 'triton' not in sys.modules, 'importing inlaid_ray.kernels imported triton'\n"
        "import inlaid_ray.kernels.gptq_gemm as g, inlaid_ray.kernels.lora_sgmv as l, inlaid_ray.kernels.compressed_lora as c\n"
        "print(type(g._gptq_gemm_kernel).__name__)\n"
    )
    proc = _run_python(code, {"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "JITFunction"  # compiled kernels, decorated without a GPU


@pytest.mark.gpu
def test_cuda_tensors_use_triton_and_fail_loudly(device):
    x, qw, qz, sc, gi = gptq_inputs(device)
    from inlaid_ray.kernels.gptq_gemm import gptq_matmul as kernel

    torch.testing.assert_close(gptq_matmul(x, qw, qz, sc, gi, 4), kernel(x, qw, qz, sc, gi, 4), atol=0, rtol=0)
    with pytest.raises(AssertionError, match="bits=3"):
        gptq_matmul(x, qw, qz, sc, gi, 3)  # no silent switch to the reference
    x, v, u, sigma, cbatch = compressed_inputs(device)
    y1, y2 = torch.zeros(4, 32, dtype=torch.float16, device=device), torch.zeros(4, 32, dtype=torch.float16, device=device)
    compressed_lora(y1, x, v, u, sigma, cbatch)
    compressed_lora_triton(y2, x, v, u, sigma, cbatch)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gather_limit", [0, 1 << 22], ids=["segments", "per-token-gather"])
@pytest.mark.parametrize("token_slots", [[3, -1, 0, 3, 1], [2, 2, -1, 2], [-1, -1], [0, 1, 2, 3, 3, 2, 1, 0]])
def test_reference_lora_paths_equal_a_float64_per_token_loop(monkeypatch, dtype, gather_limit, token_slots):
    from inlaid_ray.kernels import reference

    monkeypatch.setattr(reference, "GATHER_ELEMENTS_PER_SEGMENT", gather_limit)
    gen = torch.Generator().manual_seed(len(token_slots))
    a = (torch.randn(4, 8, 64, generator=gen) / 8).to(dtype)
    b = (torch.randn(4, 32, 8, generator=gen) / 3).to(dtype)
    x = torch.randn(len(token_slots), 64, generator=gen).to(dtype)
    y0 = torch.randn(len(token_slots), 32, generator=gen).to(dtype)
    expected = y0.double().clone()
    for t, s in enumerate(token_slots):  # the definition, token by token, in float64
        if s >= 0:
            expected[t] += b[s].double() @ (a[s].double() @ x[t].double())
    for batch in (LoRABatch.from_token_slots(torch.tensor(token_slots)), LoRABatch.from_host_slots(token_slots, "cpu")):
        y = y0.clone()
        reference.lora_shrink_expand_ref(y, x, a, b, batch)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
