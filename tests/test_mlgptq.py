"""MLGPTQ through the model (docs/algorithms.md 5.2-5.5) on a tiny random Llama with PEFT adapters:
per-task Hessians equal those of transformers + peft with the task's adapter, the aggregate is
the element-wise max of the per-task statistics and does not depend on task order, GPTQ-mixed is
GPTQ on the union of the data, per-task checkpoints are single-task runs, every GPTQ variant beats
RTN on every task's layer objective, and the sequential (quantized-activation) mode starts from
the same statistics."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from safetensors.torch import load_file

from inlaid_ray.kernels.reference import gptq_dequantize_ref
from inlaid_ray.model import load_model, load_tokenizer
from inlaid_ray.model.config import LINEAR_MODULES
from inlaid_ray.quant.calibration import CalibrationConfig, CalibrationSet
from inlaid_ray.quant.gptq import rtn_quantize
from inlaid_ray.quantized_base.checkpoint import split_layers
from inlaid_ray.quant.incremental import checkpoints_identical, load_tasks, quantize_base
from inlaid_ray.quant.mlgptq import (
    GROUP_OF,
    GROUPS,
    CalibrationTask,
    MLGPTQConfig,
    collect_task_hessians,
    hessian_weight,
    hf_prefix,
    make_adapter_bank,
)
from inlaid_ray.quant.quantizer import QuantGrid
from inlaid_ray.quant.stats_store import StatsStore
from test_mlgptq_setup import GROUP_SIZE, make_task_sources, write_tiny_base

CFG = MLGPTQConfig(grid=QuantGrid(bits=4, group_size=GROUP_SIZE), batch_tokens=96)
CALIB = CalibrationConfig(tokens_per_task=150)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlgptq")
    base = write_tiny_base(root / "base")
    return root, base, make_task_sources(root, base)


@pytest.fixture(scope="module")
def full_run(setup):
    root, base, sources = setup
    report = quantize_base(base, sources, root / "ml", CFG, CALIB, root / "stats", progress=False,
                           keep_task_hessians=True)
    return report, StatsStore.open(root / "stats")


def _tasks(base, sources, calibrate_budget=CALIB.tokens_per_task):
    model = load_model(base)
    return model, load_tasks(sources, load_tokenizer(base), model.config, CALIB, calibrate_budget)


def _our_hessians(model, task, cfg=CFG):
    bank, slots = make_adapter_bank(model, [task])
    out = {}
    collect_task_hessians(model, bank, slots.get(task.name, -1), task, cfg, lambda l, hs: out.__setitem__(l, hs))
    return out


def _peft_hessians(base, task, with_adapter=True, sink_weight=1.0, sink_tokens=1):
    """Reference: 2/N sum x x^T (fp64) of the inputs of each group's first base Linear in transformers
    (+ PeftModel with the task's adapter), one unpadded sequence at a time; with `sink_weight`,
    each sequence's first `sink_tokens` tokens weigh that much (2 sum w x x^T / sum w)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if with_adapter:
        model = PeftModel.from_pretrained(model, task.adapter.source).eval()
    sums, n = {}, 0
    handles = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if parts[-1] == "base_layer":
            parts = parts[:-1]
        elif hasattr(mod, "base_layer") or not isinstance(mod, torch.nn.Linear):
            continue
        if parts[-1] not in LINEAR_MODULES or GROUPS[GROUP_OF[parts[-1]]][0] != parts[-1]:
            continue
        key = (int(parts[parts.index("layers") + 1]), GROUP_OF[parts[-1]])

        def hook(_m, args, key=key):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            w = torch.ones(x.shape[0], dtype=torch.float64)
            w[:sink_tokens] = sink_weight
            sums[key] = sums.get(key, 0) + 2 * (x * w[:, None]).t() @ x

        handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for seq in task.calibration.sequences:
            model(torch.tensor([seq]))
            k = min(sink_tokens, len(seq))
            n += len(seq) - k + k * sink_weight
    for h in handles:
        h.remove()
    return {k: v / n for k, v in sums.items()}


def test_task_hessians_equal_transformers_peft_forward(setup):
    root, base, sources = setup
    model, tasks = _tasks(base, sources)
    for task in tasks:
        ours = _our_hessians(model, task)
        ref = _peft_hessians(base, task)
        assert set(ref) == {(l, g) for l in ours for g in ours[l]}
        for (layer, group), h in ref.items():
            torch.testing.assert_close(ours[layer][group].double(), h, rtol=2e-5, atol=2e-5 * float(h.abs().max()))


@pytest.mark.parametrize("sink_tokens", [1, 3])
def test_sink_weight_weighs_each_sequences_first_tokens(setup, sink_tokens):
    """sink_weight=w: every calibration sequence's first `sink_tokens` tokens count w times in each
    Hessian, against the weighted transformers + peft reference (chunks hold several sequences)."""
    root, base, sources = setup
    model, tasks = _tasks(base, sources)
    task = tasks[1]
    cfg = dataclasses.replace(CFG, sink_weight=0.125, sink_tokens=sink_tokens)
    ours = _our_hessians(model, task, cfg)
    lens = [len(seq) for seq in task.calibration.sequences]  # the normaliser aggregates weigh the task by
    assert hessian_weight(task.calibration, cfg) == pytest.approx(
        sum(n - min(sink_tokens, n) * (1 - 0.125) for n in lens))
    for (layer, group), h in _peft_hessians(base, task, sink_weight=0.125, sink_tokens=sink_tokens).items():
        torch.testing.assert_close(ours[layer][group].double(), h, rtol=2e-5, atol=2e-5 * float(h.abs().max()))
    assert not torch.allclose(ours[0]["attn_in"], _our_hessians(model, task)[0]["attn_in"], rtol=1e-3)


def test_no_target_ablation_uses_the_base_forward(setup):
    """calibrate_with_adapter=False (MLGPTQ_no_target) equals the plain base model's statistics and
    differs from the adapter-aware ones wherever an earlier adapted module feeds the input."""
    root, base, sources = setup
    model, tasks = _tasks(base, sources)
    task = tasks[1]  # adapts every projection
    plain = _our_hessians(model, task, dataclasses.replace(CFG, calibrate_with_adapter=False))
    for (layer, group), h in _peft_hessians(base, task, with_adapter=False).items():
        torch.testing.assert_close(plain[layer][group].double(), h, rtol=2e-5, atol=2e-5 * float(h.abs().max()))
    adapted = _our_hessians(model, task)
    assert torch.equal(adapted[0]["attn_in"], plain[0]["attn_in"])  # nothing adapted before q/k/v of block 0
    for layer, group in [(0, "attn_out"), (0, "mlp_in"), (0, "mlp_out"), (1, "attn_in")]:
        assert not torch.allclose(adapted[layer][group], plain[layer][group], rtol=1e-3), (layer, group)


def test_aggregate_is_elementwise_max_and_task_order_invariant(setup, full_run):
    root, base, sources = setup
    report, store = full_run
    assert report["tasks"] == sorted(s.name for s in sources)
    for layer in range(store.num_layers):
        agg = store.method_hessians("mlgptq", layer)
        per_task = [store.task_layer(t, layer) for t in report["tasks"]]
        for g, h in agg.items():
            stacked = torch.stack([p[g] for p in per_task])
            assert torch.equal(h, stacked.amax(dim=0))
            assert not all(torch.equal(h, p[g]) for p in per_task)  # no single task dominates everywhere
    for order in itertools.islice(itertools.permutations(sources), 1, 3):
        out = root / f"perm_{'_'.join(s.name for s in order)}"
        quantize_base(base, list(order), out, CFG, CALIB, progress=False)
        same, diffs = checkpoints_identical(root / "ml", out)
        assert same, diffs


def test_quantized_weights_use_the_max_aggregate(setup, full_run):
    """The checkpoint's codes are what GPTQ gives for (fp16 W, max-aggregated H): re-derive one layer."""
    from inlaid_ray.quant.gptq import gptq_quantize
    from inlaid_ray.quantized_base.checkpoint import pack_gptq_result

    root, base, _ = setup
    _, store = full_run
    model = load_model(base)
    tensors = load_file(str(root / "ml" / "model.safetensors"))
    agg = store.method_hessians("mlgptq", 1)
    for module in ("k_proj", "down_proj"):
        prefix = hf_prefix(1, module)
        w = load_file(str(base / "model.safetensors"))[f"{prefix}.weight"]
        expected = pack_gptq_result(gptq_quantize(w, agg[GROUP_OF[module]], CFG.grid))
        for name, t in expected.items():
            assert torch.equal(tensors[f"{prefix}.{name}"], t), (prefix, name)
    assert model.config.num_layers == store.num_layers


def test_gptq_mixed_is_gptq_on_the_union_of_the_data(setup):
    """Without adapters, the token-weighted mean of per-task Hessians equals the Hessian of one
    task holding every task's sequences (GPTQ_tweaked, docs/algorithms.md 5.1)."""
    root, base, sources = setup
    model, tasks = _tasks(base, sources)
    cfg = dataclasses.replace(CFG, calibrate_with_adapter=False)
    from inlaid_ray.quant.mlgptq import aggregate_hessians

    per_task = [_our_hessians(model, t, cfg) for t in tasks]
    counts = [t.calibration.num_tokens for t in tasks]
    union = CalibrationTask("union", None, CalibrationSet(
        "union", tuple(s for t in tasks for s in t.calibration.sequences)))
    ref = _our_hessians(model, union, cfg)
    for layer in ref:
        for g in GROUPS:
            mixed = aggregate_hessians("gptq-mixed", [p[layer][g] for p in per_task], counts)
            torch.testing.assert_close(mixed, ref[layer][g], rtol=1e-5, atol=1e-6 * float(ref[layer][g].abs().max()))


def test_per_task_checkpoints_are_single_task_runs(setup):
    root, base, sources = setup
    rep = quantize_base(base, sources, root / "pt", dataclasses.replace(CFG, method="gptq-per-task"), CALIB,
                        progress=False)
    assert sorted(rep["out_dirs"]) == sorted(s.name for s in sources)
    for s in sources[:2]:
        single = quantize_base(base, [s], root / f"single_{s.name}", CFG, CALIB, progress=False)
        same, diffs = checkpoints_identical(root / "pt" / s.name, single["out_dirs"]["shared"])
        # identical tensors; only the recorded method differs
        assert diffs == ["quantize_config.json", "config.json"], diffs


def _task_objective(ckpt, base, store, task):
    """sum over layers/modules of tr((W - Q) H_t (W - Q)^T): task t's layer-output error proxy."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    dense = load_file(str(base / "model.safetensors"))
    total = 0.0
    for prefix, layer in split_layers(tensors).items():
        Q = gptq_dequantize_ref(layer["qweight"], layer["qzeros"], layer["scales"].float(), layer["g_idx"], 4)
        dW = dense[f"{prefix}.weight"] - Q
        idx, module = int(prefix.split(".")[2]), prefix.rsplit(".", 1)[1]
        H = store.task_layer(task, idx)[GROUP_OF[module]]
        total += float(torch.einsum("oi,ij,oj->", dW.double(), H.double(), dW.double()))
    return total


def test_every_gptq_variant_beats_rtn_on_every_task(setup, full_run):
    root, base, sources = setup
    _, store = full_run
    quantize_base(base, [], root / "rtn", dataclasses.replace(CFG, method="rtn"), CALIB, progress=False)
    quantize_base(base, sources, root / "mix", dataclasses.replace(CFG, method="gptq-mixed"), CALIB,
                  progress=False)
    rep = quantize_base(base, sources, root / "channel", dataclasses.replace(CFG, method="mlgptq-channel"), CALIB,
                        progress=False)
    assert not any(i["eig_clipped"] for i in rep["layers"]["shared"].values())  # PSD by construction
    if not (root / "pt").exists():
        quantize_base(base, sources, root / "pt", dataclasses.replace(CFG, method="gptq-per-task"), CALIB,
                      progress=False)
    for s in sources:
        rtn = _task_objective(root / "rtn", base, store, s.name)
        for ckpt in (root / "ml", root / "mix", root / "channel", root / "pt" / s.name):
            assert _task_objective(ckpt, base, store, s.name) < rtn, (ckpt.name, s.name)


def test_rtn_checkpoint_is_round_to_nearest_of_every_weight(setup):
    root, base, _ = setup
    out = root / "rtn_only"
    quantize_base(base, [], out, dataclasses.replace(CFG, method="rtn"), progress=False)
    tensors = load_file(str(out / "model.safetensors"))
    dense = load_file(str(base / "model.safetensors"))
    layers = split_layers(tensors)
    assert len(layers) == 2 * len(LINEAR_MODULES)
    for prefix, layer in layers.items():
        Q = gptq_dequantize_ref(layer["qweight"], layer["qzeros"], layer["scales"].float(), layer["g_idx"], 4)
        assert torch.equal(Q, rtn_quantize(dense[f"{prefix}.weight"], CFG.grid).Q)


def test_sequential_mode_starts_from_the_same_statistics(setup):
    """activation_source="quantized": the first sub-step (q/k/v of block 0) sees no quantized weight,
    so it quantizes exactly like the fp16 mode; later modules see quantized inputs and differ."""
    root, base, sources = setup
    cfg = dataclasses.replace(CFG, activation_source="quantized")
    quantize_base(base, sources, root / "seq", cfg, CALIB, progress=False)
    quantize_base(base, sources, root / "seq_block", dataclasses.replace(
        cfg, grid=dataclasses.replace(cfg.grid, true_sequential=False)), CALIB, progress=False)
    if not (root / "ml").exists():
        quantize_base(base, sources, root / "ml", CFG, CALIB, progress=False)
    seq, ml = load_file(str(root / "seq" / "model.safetensors")), load_file(str(root / "ml" / "model.safetensors"))
    blk = load_file(str(root / "seq_block" / "model.safetensors"))
    for module in GROUPS["attn_in"]:
        name = f"{hf_prefix(0, module)}.qweight"
        assert torch.equal(seq[name], ml[name]) and torch.equal(blk[name], ml[name])
    later = [f"{hf_prefix(l, m)}.qweight" for l in range(2) for m in LINEAR_MODULES][3:]
    assert any(not torch.equal(seq[n], ml[n]) for n in later)
    assert any(not torch.equal(seq[n], blk[n]) for n in later)  # true_sequential changes the inputs
    with pytest.raises(ValueError, match="activation_source='fp16'"):
        quantize_base(base, sources, root / "x", cfg, CALIB, stats_dir=root / "s_seq", progress=False)
