"""Continuous batching over a paged KV cache (Orca's iteration-level scheduling, vLLM's
PagedAttention block tables and recompute preemption) with multi-LoRA requests.

One `step()`: the scheduler picks requests under a `SchedulingPolicy` (new ones are
prefilled whole, running ones decode one token, prefill and decode mix in one batch),
the model runs one forward over the flattened batch, each request samples its next token,
and the detokenizer turns it into a text delta. No Ray, HTTP or threads here:
`AsyncLLMEngine` wraps this class for streaming.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from inlaid_ray.engine.adapters import AdapterCommand, apply_adapter_command
from inlaid_ray.engine.batch import build_step_batch
from inlaid_ray.engine.block_allocator import BlockAllocator, blocks_for
from inlaid_ray.engine.config import EngineConfig, EngineStats
from inlaid_ray.engine.cuda_graphs import DecodeGraphs
from inlaid_ray.engine.detokenizer import IncrementalDetokenizer
from inlaid_ray.engine.limits import check_prompt, resolve_max_model_len
from inlaid_ray.engine.logits_processors import adjust_logits, token_logprobs
from inlaid_ray.engine.request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams, TokenLogprob
from inlaid_ray.engine.sampling import GREEDY_EPS, sample
from inlaid_ray.engine.scheduler import Scheduler, SchedulerLimits
from inlaid_ray.engine.static_decode import StaticDecodeInputs
from inlaid_ray.engine.structured_output import StructuredOutputManager
from inlaid_ray.errors import InvalidRequest, TaskNotFound
from inlaid_ray.model.kv_cache import PagedKVCache
from inlaid_ray.sched.policy import SchedulingPolicy, make_replica_policy

log = logging.getLogger(__name__)


class LLMEngine:
    """Continuous-batching engine over one model; not thread-safe (AsyncLLMEngine serialises)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None,
        config: EngineConfig = EngineConfig(),
        adapter_bank: Any | None = None,
        policy: SchedulingPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.config = config
        self.clock = clock
        self.adapter_bank = self._attach_bank(model, adapter_bank)
        self.device = torch.device(config.device) if config.device else model.device
        self.dtype = config.dtype or model.dtype
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.model_config.max_position_embeddings,
                                                   config.max_num_batched_tokens)
        static = config.static_decode if config.static_decode is not None else config.cuda_graphs
        num_blocks = config.num_kv_blocks or self._blocks_from_memory(static)
        min_blocks = blocks_for(self.max_model_len, config.block_size)
        if static:
            min_blocks += 1  # the scratch block padding rows write to
        if num_blocks < min_blocks:
            raise ValueError(
                f"num_kv_blocks={num_blocks} of {config.block_size} tokens cannot hold one sequence of "
                f"max_model_len={self.max_model_len} (needs {min_blocks}); lower max_model_len or add memory"
            )
        self.kv_cache = PagedKVCache(self.model_config, num_blocks, config.block_size, self.dtype, self.device)
        # The last block is the static decode path's scratch block, never handed out.
        self.allocator = BlockAllocator(num_blocks - 1 if static else num_blocks)
        self.static_decode = StaticDecodeInputs(
            config.max_num_seqs, blocks_for(self.max_model_len, config.block_size), config.block_size, num_blocks - 1,
            self.device, self.adapter_bank.max_slots if self.adapter_bank is not None else None,
        ) if static else None
        self.decode_graphs = (DecodeGraphs(model, self.kv_cache, self.adapter_bank)
                              if static and config.cuda_graphs and self.device.type == "cuda" else None)
        self.policy = policy if policy is not None else make_replica_policy(config.policy, config.step_cost_model, config.policy_options)
        limits = SchedulerLimits(
            config.max_num_seqs, config.max_num_batched_tokens, config.block_size,
            watermark_blocks=int(config.kv_watermark * num_blocks),
        )
        self.scheduler = Scheduler(self.policy, self.allocator, limits)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.structured_output = (StructuredOutputManager(tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                                          config.max_num_seqs) if tokenizer is not None else None)
        self._requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._num_steps = self._num_finished = 0
        self._last_step = (0, 0, 0)  # seqs, tokens, adapters

    # ----------------------------------------------------------------- requests
    def make_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        task: str | None = None,
        request_id: str | None = None,
        predicted_output_len: float | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and build a request without queueing it (raises InvalidRequest / TaskNotFound)."""
        params = params if params is not None else SamplingParams()
        params.validate(self.max_model_len)
        if isinstance(prompt_token_ids, (str, bytes)):
            raise InvalidRequest("the prompt must be token ids; tokenize text first")
        try:
            prompt = [int(t) for t in prompt_token_ids]
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"the prompt must be a sequence of integer token ids: {exc}") from exc
        if not prompt:
            raise InvalidRequest("the prompt is empty; at least one token is needed")
        check_prompt(prompt, self.model_config.vocab_size, self.max_model_len)
        vocab = self.model_config.vocab_size
        out_of_vocab = [t for t, _ in params.logit_bias if t >= vocab] + [t for t in params.stop_token_ids if t >= vocab]
        if out_of_vocab:
            raise InvalidRequest(f"token ids {out_of_vocab[:5]} in logit_bias / stop_token_ids are outside the "
                                 f"vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise InvalidRequest(f"stop strings {params.stop!r} need a tokenizer; this engine has none")
        grammar = None
        if params.structured_output is not None:
            if self.structured_output is None:
                raise InvalidRequest("structured output needs a tokenizer; this engine has none")
            grammar = self.structured_output.matcher(params.structured_output)
        self._slot_of(task)  # unknown task -> TaskNotFound now, not in the middle of a step
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        now = self.clock()
        sample_seed = None
        if params.temperature >= GREEDY_EPS:
            sample_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.stop) if self.tokenizer is not None else None
        return Request(
            request_id=request_id,
            task=task,
            prompt_token_ids=prompt,
            params=params,
            arrival_time=now if arrival_time is None else arrival_time,
            wait_start=now,
            predicted_output_len=predicted_output_len,
            sample_seed=sample_seed,
            detokenizer=detok,
            grammar=grammar,
        )

    def add(self, request: Request) -> str:
        """Queue a request built by `make_request`."""
        if request.request_id in self._requests:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        self.scheduler.add(request)
        return request.request_id

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        task: str | None = None,
        request_id: str | None = None,
        predicted_output_len: float | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Validate and queue a request; returns its id."""
        req = self.make_request(prompt_token_ids, params, task, request_id, predicted_output_len, arrival_time)
        return self.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; its final output (None if it is not in flight)."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        self._finish(req, "abort", self.clock())
        return self._output(req, "", ())

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request in flight (shutdown, or recovery after a failed step)."""
        return [out for rid in list(self._requests) if (out := self.abort(rid)) is not None]

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ----------------------------------------------------------------- adapters
    def apply_adapter_command(self, command: AdapterCommand) -> int | None:
        """Load or evict an adapter between steps (engine/adapters.py); the slot a load used."""
        if self.adapter_bank is None:
            raise TaskNotFound("this engine serves the base model only; it has no adapter bank")
        in_use = frozenset(r.task for r in self._requests.values() if r.task is not None)
        return apply_adapter_command(self.adapter_bank, command, in_use)

    # ----------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample one token per scheduled request; their deltas."""
        now = self.clock()
        scheduled, budget = self.scheduler.schedule(now)
        self.policy.on_step(scheduled, budget)
        outputs: list[RequestOutput] = []
        # The bank's lock spans slot lookup and forward: a step sees an adapter's old or new version.
        with getattr(self.adapter_bank, "lock", None) or contextlib.nullcontext():
            scheduled, slots = self._resolve_slots(scheduled, outputs, now)
            for req in scheduled:
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
            if not scheduled:
                self._last_step = (0, 0, 0)
                return outputs
            if self._fixed_shape_step(scheduled):
                input_ids, batch = self.static_decode.fill(scheduled, slots)
                if self.decode_graphs is not None:
                    logits = self.decode_graphs.forward(input_ids, batch)
                else:
                    logits = self.model(input_ids, batch, self.kv_cache)
                logits = logits[: len(scheduled)]  # drop the padding rows
            else:
                input_ids, batch = build_step_batch(
                    scheduled, slots, self.config.block_size, self.device, with_lora=self.adapter_bank is not None
                )
                logits = self.model(input_ids, batch, self.kv_cache)  # [S, vocab] fp32
        adjusted = adjust_logits(logits, scheduled, self.eos_token_ids)
        if self.structured_output is not None:
            adjusted = self.structured_output.mask(adjusted, scheduled)
        tokens = sample(adjusted, [r.params for r in scheduled], [r.sample_seed for r in scheduled],
                        [r.num_output_tokens for r in scheduled])
        logprobs = token_logprobs(logits, tokens, scheduled)
        self._num_steps += 1
        self._last_step = (len(scheduled), sum(r.num_tokens - r.num_computed_tokens for r in scheduled),
                           len({r.task for r in scheduled if r.task is not None}))
        now = self.clock()
        return outputs + [self._append_token(req, tok, lp, now) for req, tok, lp in zip(scheduled, tokens, logprobs)]

    def _fixed_shape_step(self, scheduled: list[Request]) -> bool:
        """Whether this step runs through the static decode buffers: every request decodes one
        token, the batch fits a bucket, and no compressed adapter is resident (their per-cluster
        split is still sized per step)."""
        if self.static_decode is None or len(scheduled) > self.static_decode.buckets[-1]:
            return False
        bank = self.adapter_bank
        if bank is not None and bank.view.compressed:
            return False
        return all(r.num_tokens - r.num_computed_tokens == 1 for r in scheduled)

    def _resolve_slots(
        self, scheduled: list[Request], outputs: list[RequestOutput], now: float
    ) -> tuple[list[Request], list[int]]:
        """Adapter slot per request; one whose adapter was removed meanwhile is aborted alone."""
        kept, slots = [], []
        for req in scheduled:
            try:
                slots.append(self._slot_of(req.task))
                kept.append(req)
            except TaskNotFound as exc:
                log.warning("aborting %s: %s", req.request_id, exc)
                self._finish(req, "abort", now)
                outputs.append(self._output(req, "", ()))
        return kept, slots

    def _append_token(self, req: Request, token: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        """Record a sampled token, detokenize, and finish the request if it should stop."""
        grammar_done = False
        if req.grammar is not None:
            try:
                grammar_done = StructuredOutputManager.advance(req, token)
            except RuntimeError as exc:  # a failed matcher: this request ends, its token unsent
                log.error("aborting %s: %s", req.request_id, exc)
                self._finish(req, "abort", now)
                return self._output(req, "", ())
        req.num_computed_tokens = req.num_tokens
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        p = req.params
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        # A complete grammar ends the request: nothing else may follow.
        reason: FinishReason | None = "stop" if stop_token or grammar_done else None
        if reason is None and (req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len):
            reason = "length"
        delta = ""
        if req.detokenizer is not None:
            # The stop token itself is not part of the text.
            # Stop strings apply from min_tokens output tokens on (vLLM's rule), like EOS and stop ids.
            delta, hit_stop = req.detokenizer.update([] if stop_token else [token], final=reason is not None,
                                                     check_stop=req.num_output_tokens >= p.min_tokens)
            if hit_stop:
                reason = "stop"
        if reason is not None:
            self._finish(req, reason, now)
        return self._output(req, delta, (token,), (logprob,) if logprob is not None else ())

    def _finish(self, req: Request, reason: FinishReason, now: float) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        self.scheduler.remove(req)
        del self._requests[req.request_id]
        self._num_finished += 1
        self.policy.on_finished(req, now)

    def _output(self, req: Request, delta: str, token_ids: tuple[int, ...],
                logprobs: tuple[TokenLogprob, ...] = ()) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            text=delta,
            token_ids=token_ids,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_completion_tokens=req.num_output_tokens,
            task=req.task,
            arrival_time=req.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            logprobs=logprobs,
            finish_time=req.finish_time,
        )

    # ----------------------------------------------------------------- convenience
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        tasks: Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; one output per prompt (in order) holding the whole completion.

        Outputs of requests added by others meanwhile are dropped (they still advance).
        """
        n = len(prompts)
        params_list = list(params) if isinstance(params, Sequence) else [params] * n
        tasks_list = list(tasks) if tasks is not None else [None] * n
        if len(params_list) != n or len(tasks_list) != n:
            raise InvalidRequest(f"{n} prompts but {len(params_list)} params and {len(tasks_list)} tasks")
        reqs = [self.make_request(p, sp, t) for p, sp, t in zip(prompts, params_list, tasks_list)]
        for req in reqs:
            self.add(req)
        texts: dict[str, list[str]] = {r.request_id: [] for r in reqs}
        logprobs: dict[str, list[TokenLogprob]] = {r.request_id: [] for r in reqs}
        done: set[str] = set()
        while len(done) < n:
            outputs = self.step()
            if not outputs:
                raise RuntimeError(f"the scheduler made no progress with requests in flight: {self.stats()}")
            for out in outputs:
                if out.request_id in texts:
                    texts[out.request_id].append(out.text)
                    logprobs[out.request_id].extend(out.logprobs)
                    if out.finished:
                        done.add(out.request_id)
        # Each request is finished: its whole completion as one output (the stop token is not in the text).
        return [self._output(req, "".join(texts[req.request_id]), tuple(req.output_token_ids),
                             tuple(logprobs[req.request_id])) for req in reqs]

    def stats(self) -> EngineStats:
        seqs, tokens, adapters = self._last_step
        view = self.adapter_bank.view if self.adapter_bank is not None else None
        running_adapters, waiting_adapters = self.scheduler.adapters()
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_paused=self.scheduler.num_paused,
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=self.allocator.num_blocks,
            num_free_blocks=self.allocator.num_free,
            kv_usage=self.allocator.usage,
            num_steps=self._num_steps,
            num_preemptions=self.scheduler.num_preemptions,
            num_finished=self._num_finished,
            last_step_num_seqs=seqs,
            last_step_num_tokens=tokens,
            last_step_num_adapters=adapters,
            num_adapters_resident=len(view.raw) + len(view.compressed) if view is not None else 0,
            num_adapters_compressed=len(view.compressed) if view is not None else 0,
            running_adapters=running_adapters,
            waiting_adapters=waiting_adapters,
        )

    # ----------------------------------------------------------------- set-up helpers
    def _slot_of(self, task: str | None) -> int:
        if task is None:
            return -1
        if self.adapter_bank is None:
            raise TaskNotFound(f"task {task!r} is unknown: this engine serves the base model only")
        try:
            return int(self.adapter_bank.slot_of(task))
        except TaskNotFound:
            raise
        except KeyError as exc:
            raise TaskNotFound(f"task {task!r} is not loaded in the adapter bank") from exc

    @staticmethod
    def _attach_bank(model: Any, adapter_bank: Any | None) -> Any | None:
        """One bank for the engine (slots) and the model (deltas); the model's if none is given."""
        model_bank = getattr(model, "adapter_bank", None)
        if adapter_bank is None:
            return model_bank
        if model_bank is None:
            model.adapter_bank = adapter_bank
        elif model_bank is not adapter_bank:
            raise ValueError("the engine and the model were given different adapter banks")
        return adapter_bank

    def _blocks_from_memory(self, static_decode: bool) -> int:
        cfg = self.config
        per_block = PagedKVCache.bytes_per_block(self.model_config, cfg.block_size, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        useful = cfg.max_num_seqs * blocks_for(self.max_model_len, cfg.block_size)  # more is never used
        useful += int(static_decode)  # the static decode path's scratch block
        num_blocks = min(int(free * cfg.kv_memory_fraction) // per_block, useful)
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, cfg.block_size, num_blocks * per_block / 2**20)
        return num_blocks
