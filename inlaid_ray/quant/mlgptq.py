"""MLGPTQ model-level driver (LoRA-Inlaid section 3; docs/algorithms.md 5.5): each task's calibration
sequences run through the base WITH that task's LoRA adapter, a Hessian is accumulated per task
for every Linear input group of every block, the per-task Hessians are aggregated (element-wise
max for MLGPTQ, token-weighted mean for GPTQ-mixed, none for GPTQ-per-task) and GPTQ quantizes
the BASE weights W against the aggregate; the adapters stay in high precision (5.2).

Linear input groups (Linears that read the same input share one Hessian per task, 5.5):
`attn_in` = q/k/v, `attn_out` = o, `mlp_in` = gate/up, `mlp_out` = down. Hooks sit on
`AdaptedLinear.base`, so they record the base input only (11 item 8); the calibration batches are
flattened variable-length sequences, so there is no padding to mask (11 item 3).

Two activation sources (6.3):
- "fp16": every task's Hessians come from the unquantized base (+ its adapter), so they depend on
  nothing but (base, adapter, calibration tokens): they can be stored and aggregated later,
  which makes incremental quantization exact (`inlaid_ray.quant.incremental`).
- "quantized": GPTQ's sequential scheme; block l (and, with `true_sequential`, each sub-step
  [q,k,v] -> [o] -> [gate,up] -> [down]) sees the already quantized earlier weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from inlaid_ray.progress import Progress

from inlaid_ray.lora.adapter import LoRAAdapter
from inlaid_ray.lora.bank import AdapterBank
from inlaid_ray.model.attention import AttentionPlan
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig
from inlaid_ray.model.kv_cache import PagedKVCache
from inlaid_ray.model.layers import LoRAContext
from inlaid_ray.model.runner import build_prefill_batch
from inlaid_ray.model.transformer import Transformer
from inlaid_ray.quant.calibration import CalibrationSet
from inlaid_ray.quant.gptq import GPTQResult, gptq_quantize, rtn_quantize
from inlaid_ray.quantized_base.checkpoint import pack_gptq_result
from inlaid_ray.quant.hessian import (
    HessianAccumulator,
    channel_max_aggregate_hessians,
    eigenbasis_max_aggregate_hessians,
    max_aggregate_hessians,
    mix_aggregate_hessians,
    normalized_max_aggregate_hessians,
)
from inlaid_ray.quant.quantizer import QuantGrid

log = logging.getLogger(__name__)

Method = Literal["rtn", "gptq-mixed", "gptq-per-task", "mlgptq", "mlgptq-channel", "mlgptq-eigenbasis",
                 "mlgptq-normalized"]
METHODS: tuple[str, ...] = ("rtn", "gptq-mixed", "gptq-per-task", "mlgptq", "mlgptq-channel", "mlgptq-eigenbasis",
                            "mlgptq-normalized")
# The shared base every entry point makes by default (quantize CLI, onboarding, demo): the best
# shareable method of load_tests/results/quant_quality.md on mean eval loss and worst task at 4 bits.
# The paper's element-wise max (`mlgptq`) collapses there, and the channel max had 1.5x GPTQ-mixed's
# mean eval loss and one fewer right answer (of 20) on extract and rewrite.
DEFAULT_SHARED_METHOD: Method = "gptq-mixed"
GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj"),
    "mlp_out": ("down_proj",),
}
GROUP_OF: dict[str, str] = {m: g for g, ms in GROUPS.items() for m in ms}
# AutoGPTQ's true_sequential order for Llama blocks (docs/algorithms.md 2.5).
SEQUENTIAL_STEPS: tuple[tuple[str, ...], ...] = (("attn_in",), ("attn_out",), ("mlp_in",), ("mlp_out",))
LayerHessians = dict[str, torch.Tensor]  # group -> H [d_in, d_in] fp32
PackedLayers = dict[str, dict[str, torch.Tensor]]  # HF prefix -> GPTQ v1 tensors


@dataclass(frozen=True)
class MLGPTQConfig:
    """What to quantize how; `grid` holds the GPTQ settings (bits, group size, act-order, ...)."""

    method: Method = "mlgptq"
    grid: QuantGrid = QuantGrid(group_size=128)
    activation_source: Literal["fp16", "quantized"] = "fp16"
    calibrate_with_adapter: bool = True  # False = the MLGPTQ_no_target ablation (5.2)
    batch_tokens: int = 2048  # tokens per calibration forward chunk (whole sequences)
    block_size: int = 16  # KV block size of the calibration forward
    # Weight in H of each calibration sequence's first `sink_tokens` tokens: the attention sink and,
    # with more, a prefix every task shares such as a system prompt (docs/algorithms.md 5.4 item 6).
    sink_weight: float = 1.0
    sink_tokens: int = 1
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # dtype of the calibration forward and of the master weights
    gptq_threads: int | None = 1  # torch CPU threads in GPTQ's column loop (see gptq_threads); None = as is

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; expected one of {METHODS}")
        if self.activation_source not in ("fp16", "quantized"):
            raise ValueError(f"activation_source={self.activation_source!r}; expected 'fp16' or 'quantized'")
        if self.batch_tokens < 1 or self.block_size < 1:
            raise ValueError(f"batch_tokens={self.batch_tokens} and block_size={self.block_size} must be >= 1")
        if not self.sink_weight >= 0 or self.sink_tokens < 1:
            raise ValueError(f"sink_weight={self.sink_weight} must be >= 0 and sink_tokens={self.sink_tokens} >= 1")

    @property
    def aggregation(self) -> str:
        return {"mlgptq": "max", "mlgptq-channel": "channel max (max diagonal, pooled correlations)",
                "mlgptq-eigenbasis": "max energy per eigendirection of the pooled Hessian",
                "mlgptq-normalized": "max of Hessians normalised by their mean diagonal",
                "gptq-mixed": "token-weighted mean", "gptq-per-task": "none", "rtn": "none"}[
            self.method
        ]


@dataclass(frozen=True)
class CalibrationTask:
    """One task: its adapter (None = base only) and its calibration token sequences."""

    name: str
    adapter: LoRAAdapter | None
    calibration: CalibrationSet
    adapter_path: str = ""  # where the adapter was read (a statistics store reads it again to rebuild)

    @property
    def adapter_hash(self) -> str:
        return statistics_hash(self.adapter) if self.adapter is not None else ""


def statistics_hash(adapter: LoRAAdapter) -> str:
    """What a task's Hessians depend on in its adapter: the weights file's sha256 and every
    module's rank and scale (lora_alpha, rsLoRA and per-module patterns live in the config)."""
    h = hashlib.sha256(adapter.content_hash.encode())
    for (layer, module), f in sorted(adapter.weights.items()):
        h.update(f"{layer}.{module}:{f.rank}:{float(f.scale)!r};".encode())
    return h.hexdigest()


def hessian_weight(calibration: CalibrationSet, cfg: MLGPTQConfig) -> float | None:
    """Sum of token weights of a task's Hessian under `cfg`'s sink weighting (None: unweighted,
    the token count); what aggregates weigh the task by, so the mix stays the union of the data."""
    if cfg.sink_weight == 1.0:
        return None
    k, w = cfg.sink_tokens, cfg.sink_weight
    return float(sum(len(s) - min(k, len(s)) + w * min(k, len(s)) for s in calibration.sequences))


def check_grid_fits(model_config: ModelConfig, grid: QuantGrid) -> None:
    """Fail before any work if the grid cannot quantize or pack some projection of this model."""
    for module in LINEAR_MODULES:
        d_out, d_in = model_config.module_shape(module)
        if grid.group_size != -1 and d_in % grid.group_size:
            raise ValueError(f"group_size={grid.group_size} does not divide the input dim d_in={d_in} of {module} "
                             f"({model_config.name_or_path or 'model'}); choose a divisor of {d_in} or -1")
        if (d_in * grid.bits) % 32 or (d_out * grid.bits) % 32:
            raise ValueError(f"{grid.bits}-bit GPTQ packing needs d_in*bits and d_out*bits divisible by 32; "
                             f"{module} has d_in={d_in}, d_out={d_out}")


def proj(model: Transformer, layer: int, module: str) -> nn.Module:
    """The AdaptedLinear `module` of decoder layer `layer`."""
    block = model.model.layers[layer]
    return getattr(block.self_attn if module in GROUPS["attn_in"] + GROUPS["attn_out"] else block.mlp, module)


def hf_prefix(layer: int, module: str) -> str:
    kind = "self_attn" if module in GROUPS["attn_in"] + GROUPS["attn_out"] else "mlp"
    return f"model.layers.{layer}.{kind}.{module}"


def make_adapter_bank(model: Transformer, tasks: Sequence[CalibrationTask]) -> tuple[AdapterBank | None, dict[str, int]]:
    """A bank holding every task's adapter (in the model's dtype and device) and task -> slot."""
    adapters = [t.adapter for t in tasks if t.adapter is not None]
    if not adapters:
        return None, {}
    bank = AdapterBank(model.config, max_slots=len(adapters), max_rank=max(a.max_rank for a in adapters),
                       dtype=model.dtype, device=model.device)
    slots = {}
    for t in tasks:
        if t.adapter is not None:
            slots[t.name] = bank.add(dataclasses.replace(t.adapter, name=t.name))  # AdapterError if it does not fit
    return bank, slots


class _Chunk:
    """Whole sequences run together: their metadata (built once, reused by every layer) and x."""

    def __init__(self, model: Transformer, lens: list[int], ids: list[int], slot: int, block_size: int,
                 sink_weight: float, sink_tokens: int) -> None:
        device = model.device
        self.batch = build_prefill_batch(lens, block_size, [slot] * len(lens) if slot >= 0 else None, device)
        self.token_weights = None  # [T] weight of each token in the Hessians; None = all 1
        if sink_weight != 1.0:
            weights = [1.0] * sum(lens)
            start = 0
            for n in lens:
                weights[start : start + min(n, sink_tokens)] = [sink_weight] * min(n, sink_tokens)
                start += n
            self.token_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self.plan = AttentionPlan.build(self.batch, model.config.sliding_window)
        self.rotary = model.rotary.for_positions(self.batch.positions)
        self.cache = _one_layer_cache(model, lens, block_size)
        self.x = model.model.embed_tokens(torch.tensor(ids, dtype=torch.int64, device=device))  # [T, hidden]


class _TaskActivations:
    """One task's hidden states between blocks, in chunks of whole sequences (no padding)."""

    def __init__(self, model: Transformer, task: CalibrationTask, slot: int, cfg: MLGPTQConfig) -> None:
        self.task, self.slot = task, slot
        self.current: _Chunk | None = None  # the chunk being run (its token weights feed the hooks)
        vocab = model.config.vocab_size
        ids_all = [t for seq in task.calibration.sequences for t in seq]
        if not ids_all or max(ids_all) >= vocab or min(ids_all) < 0:
            raise ValueError(f"task {task.name!r}: calibration token ids must be non-empty and inside [0, {vocab})")
        self.chunks: list[_Chunk] = []
        lens: list[int] = []
        ids: list[int] = []
        for seq in task.calibration.sequences:
            if lens and sum(lens) + len(seq) > cfg.batch_tokens:
                self.chunks.append(_Chunk(model, lens, ids, slot, cfg.block_size, cfg.sink_weight, cfg.sink_tokens))
                lens, ids = [], []
            lens.append(len(seq))
            ids.extend(seq)
        self.chunks.append(_Chunk(model, lens, ids, slot, cfg.block_size, cfg.sink_weight, cfg.sink_tokens))

    @property
    def num_tokens(self) -> int:
        return sum(c.x.shape[0] for c in self.chunks)

    def run_layer(self, model: Transformer, layer: int, bank: AdapterBank | None, update: bool) -> None:
        """Run decoder layer `layer` over every chunk (hooks fire); replace the activations if `update`."""
        block = model.model.layers[layer]
        for c in self.chunks:
            self.current = c
            lora = LoRAContext(bank, c.batch.lora) if bank is not None and c.batch.lora is not None else None
            y = block(c.x, c.batch, c.cache, c.rotary, lora, c.plan)
            if update:
                c.x = y


def _one_layer_cache(model: Transformer, lens: list[int], block_size: int) -> PagedKVCache:
    """A paged cache whose every layer entry is the same one-layer pool: the calibration forward
    runs one layer at a time and each layer writes its K/V before reading them."""
    num_blocks = sum(-(-n // block_size) for n in lens)
    cfg = dataclasses.replace(model.config, num_layers=1)
    cache = PagedKVCache(cfg, num_blocks, block_size, model.dtype, model.device)
    cache.key_caches = cache.key_caches * model.config.num_layers
    cache.value_caches = cache.value_caches * model.config.num_layers
    return cache


class _Hooks:
    """Forward pre-hooks on the base Linear of the first module of each group of one layer; token
    weights (the sink weight) come from the chunk `acts` is running."""

    def __init__(self, model: Transformer, layer: int, groups: Sequence[str], acts: "_TaskActivations") -> None:
        self.accs = {g: HessianAccumulator(proj(model, layer, GROUPS[g][0]).in_features, model.device) for g in groups}
        self.acts = acts
        self.handles = [proj(model, layer, GROUPS[g][0]).base.register_forward_pre_hook(self._hook(self.accs[g]))
                        for g in groups]

    def _hook(self, acc: HessianAccumulator) -> Callable[[nn.Module, tuple], None]:
        def record(module: nn.Module, args: tuple) -> None:
            chunk = self.acts.current
            acc.add_batch(args[0].detach(), weights=chunk.token_weights if chunk is not None else None)
        return record

    def remove(self) -> LayerHessians:
        for h in self.handles:
            h.remove()
        return {g: acc.H for g, acc in self.accs.items()}


def collect_task_hessians(
    model: Transformer,
    bank: AdapterBank | None,
    slot: int,
    task: CalibrationTask,
    cfg: MLGPTQConfig,
    on_layer: Callable[[int, LayerHessians], None],
    progress: Progress | None = None,
) -> int:
    """activation_source="fp16": per-layer Hessians of one task from the unquantized base (+ its
    adapter when `cfg.calibrate_with_adapter`), handed to `on_layer(layer, {group: H})` block by
    block; returns the number of calibration tokens (the normaliser of every H)."""
    with torch.inference_mode():
        acts = _TaskActivations(model, task, slot if cfg.calibrate_with_adapter else -1, cfg)
        for layer in range(model.config.num_layers):
            hooks = _Hooks(model, layer, list(GROUPS), acts)
            try:
                acts.run_layer(model, layer, bank, update=True)
            finally:
                hs = hooks.remove()
            on_layer(layer, hs)
            if progress is not None:
                progress.update(1)
    return acts.num_tokens


def aggregate_hessians(method: str, hs: Sequence[torch.Tensor], token_counts: Sequence[int]) -> torch.Tensor:
    """MLGPTQ: element-wise max; MLGPTQ-channel: max diagonal with pooled correlations (PSD);
    GPTQ-mixed: token-weighted mean (= GPTQ on the union of the data)."""
    if method == "mlgptq":
        return max_aggregate_hessians(hs)
    if method == "mlgptq-channel":
        return channel_max_aggregate_hessians(hs, token_counts)
    if method == "mlgptq-eigenbasis":
        return eigenbasis_max_aggregate_hessians(hs, token_counts)
    if method == "mlgptq-normalized":
        return normalized_max_aggregate_hessians(hs)
    if method == "gptq-mixed":
        return mix_aggregate_hessians(hs, token_counts)
    if len(hs) != 1:
        raise ValueError(f"method {method!r} quantizes against one task's Hessian, got {len(hs)}")
    return hs[0].float()


def _split_rows(result: GPTQResult, sizes: Sequence[int]) -> list[GPTQResult]:
    """Per-module results of one GPTQ call on row-stacked weights (rows are independent in GPTQ)."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(dataclasses.replace(result, codes=result.codes[rows], Q=result.Q[rows],
                                       scales=result.scales[:, rows], zeros=result.zeros[:, rows]))
        start += n
    return out


def quantize_layer(
    model: Transformer,
    layer: int,
    hessians: Mapping[str, torch.Tensor] | None,
    grid: QuantGrid,
    modules: Sequence[str] = LINEAR_MODULES,
    write_back: bool = False,
) -> tuple[PackedLayers, dict[str, dict[str, Any]]]:
    """GPTQ (RTN if `hessians` is None) of `modules` of one layer from the model's current base
    weights; returns packed GPTQ v1 tensors and per-module info (group loss, damping, clipping).

    Linears sharing an input (q/k/v, gate/up) are quantized in ONE call on their row-stacked
    weights: GPTQ treats output rows independently given H (same Hinv, per-row grid), so this is
    the per-module result while factorising H once and running the column loop once.
    `write_back` replaces the base weights by the dequantized values (sequential GPTQ)."""
    packed: PackedLayers = {}
    info: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(GROUP_OF[m] for m in modules):
        members = [m for m in GROUPS[group] if m in modules]
        bases = [proj(model, layer, m).base for m in members]
        W = torch.cat([b.weight.detach() for b in bases])  # [sum d_out, d_in]
        if hessians is None:
            result = rtn_quantize(W, grid)
        else:
            result = gptq_quantize(W, hessians[group].to(W.device, torch.float32), grid)
        for module, base, part in zip(members, bases, _split_rows(result, [b.out_features for b in bases])):
            prefix = hf_prefix(layer, module)
            packed[prefix] = {k: v.cpu() for k, v in pack_gptq_result(part, getattr(base, "bias", None)).items()}
            info[prefix] = {"group": group, "group_loss": result.loss, "damp_used": result.damp_used,
                            "eig_clipped": result.eig_clipped}
            if write_back:
                with torch.no_grad():
                    base.weight.copy_(part.Q.to(base.weight.dtype))
    return packed, info


@contextlib.contextmanager
def gptq_threads(device: str | torch.device, threads: int | None) -> Iterator[None]:
    """Limit torch's CPU threads around GPTQ's column loop: its ops are a few thousand elements,
    and on a busy CPU the thread hand-offs cost more than the work (measured 30x on 2 shared
    cores). Process-global while active; CUDA runs are untouched."""
    if threads is None or torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize_from_hessians(
    model: Transformer,
    hessians_for: Callable[[int], Mapping[str, torch.Tensor]] | None,
    grid: QuantGrid,
    progress: bool = True,
    desc: str = "quantize",
    threads: int | None = None,
) -> tuple[PackedLayers, dict[str, dict[str, Any]]]:
    """Quantize every layer from the model's (unquantized) weights with `hessians_for(layer)`."""
    packed: PackedLayers = {}
    info: dict[str, dict[str, Any]] = {}
    for layer in Progress(range(model.config.num_layers), desc=desc, unit="layer", disable=not progress):
        hs = hessians_for(layer) if hessians_for is not None else None
        with gptq_threads(model.device, threads):
            p, i = quantize_layer(model, layer, hs, grid)
        packed.update(p)
        info.update(i)
    return packed, info


def sequential_quantize(
    model: Transformer,
    tasks: Sequence[CalibrationTask],
    cfg: MLGPTQConfig,
    progress: bool = True,
) -> tuple[PackedLayers, dict[str, dict[str, Any]]]:
    """activation_source="quantized": GPTQ's layer-by-layer scheme over all `tasks` at once, each
    step's Hessians taken with the earlier weights already quantized. MODIFIES `model`: its base
    weights end up as the dequantized values. One quantized base (aggregate of `tasks`)."""
    bank, slots = make_adapter_bank(model, tasks) if cfg.calibrate_with_adapter else (None, {})
    steps = SEQUENTIAL_STEPS if cfg.grid.true_sequential else (tuple(GROUPS),)
    packed: PackedLayers = {}
    info: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        acts = [_TaskActivations(model, t, slots.get(t.name, -1), cfg) for t in tasks]
        counts = [hessian_weight(t.calibration, cfg) or a.num_tokens for t, a in zip(tasks, acts)]
        bar = Progress(total=model.config.num_layers * len(steps), desc="sequential gptq", unit="step",
                   disable=not progress)
        for layer in range(model.config.num_layers):
            for step in steps:
                per_task: list[LayerHessians] = []
                for a in acts:
                    hooks = _Hooks(model, layer, step, a)
                    try:
                        a.run_layer(model, layer, bank, update=False)
                    finally:
                        per_task.append(hooks.remove())
                agg = {g: aggregate_hessians(cfg.method, [h[g] for h in per_task], counts) for g in step}
                modules = [m for g in step for m in GROUPS[g]]
                with gptq_threads(model.device, cfg.gptq_threads):
                    p, i = quantize_layer(model, layer, agg, cfg.grid, modules, write_back=True)
                packed.update(p)
                info.update(i)
                bar.update(1)
            for a in acts:  # the next block's inputs come from the quantized block
                a.run_layer(model, layer, bank, update=True)
        bar.close()
    return packed, info


def unquantized_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Everything but the projection weights, under HF names (embeddings, norms, untied lm_head)."""
    out = {}
    for name, t in model.state_dict().items():
        if ".base." in name:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: the reader re-creates it from the embeddings
        out[name] = t
    return out
