"""vLLM's runtime adapter endpoints (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`),
admin key only, over the task registry: loading validates the adapter by the onboarding rule
(`lora.validation`) and registers it live, served raw in a cluster of its own, WITHOUT
re-quantizing the base (onboarding does that; docs/onboarding.md); unloading retires the task
(requests in flight finish). Bodies are vLLM's; `tenant` (default: the default tenant) is this
server's addition, because every task has an owner. Blocking registry and file work: call
from a worker thread.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from inlaid_ray.errors import AdapterError
from inlaid_ray.lora.validation import AdapterLimits, validate_adapter
from inlaid_ray.model import ModelConfig
from inlaid_ray.registry import TaskRecord, TaskRegistry
from inlaid_ray.registry.records import check_name
from inlaid_ray.serve.http_errors import OpenAIHTTPError
from inlaid_ray.serve.seed import DEFAULT_TENANT, adapter_ready, adapter_sha256


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    tenant: str = DEFAULT_TENANT


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str


def load_adapter(registry: TaskRegistry, req: LoadLoRAAdapterRequest, model_config: ModelConfig,
                 limits: AdapterLimits, base_model_id: str, model_dir: str) -> TaskRecord:
    """Validate and register `req` live; OpenAIHTTPError (4xx naming the field) on bad input."""
    try:
        check_name("task", req.lora_name)
    except ValueError as exc:
        raise OpenAIHTTPError(400, str(exc), param="lora_name") from None
    if req.lora_name == base_model_id:
        raise OpenAIHTTPError(400, f"lora_name {req.lora_name!r} is the base model's id", param="lora_name")
    old = registry.get_task(req.lora_name)
    if old is not None and old.status != "retired":
        raise OpenAIHTTPError(400, f"an adapter named {req.lora_name!r} is already loaded ({old.status}); unload it "
                                   "first", code="adapter_exists", param="lora_name")
    if registry.get_tenant(req.tenant) is None:
        raise OpenAIHTTPError(404, f"the tenant {req.tenant!r} does not exist", code="tenant_not_found", param="tenant")
    path = Path(req.lora_path)
    if not adapter_ready(path):
        raise OpenAIHTTPError(400, f"{req.lora_path} is not a PEFT adapter directory (adapter_config.json and "
                                   "adapter_model.safetensors)", param="lora_path")
    digest = adapter_sha256(path)
    try:
        adapter = validate_adapter(path, model_config, limits, name=req.lora_name, base_dir=model_dir)
    except AdapterError as exc:
        raise OpenAIHTTPError(400, str(exc), param="lora_path") from None
    # Replicas load only a file with the registered digest: the one that was validated.
    if adapter_sha256(path) != digest:
        raise OpenAIHTTPError(409, f"{req.lora_path} changed while it was being validated; send the request again",
                              code="adapter_changed", param="lora_path")
    record = TaskRecord(
        name=req.lora_name, tenant=req.tenant, adapter_uri=str(path.resolve()), base_model=base_model_id,
        rank=adapter.max_rank, target_modules=tuple(sorted({m for _, m in adapter.weights})), cluster=None,
        version=1, status="live", adapter_sha256=digest, extra={"source": "load_lora_adapter"},
    )
    created = registry.create_task(record)  # atomic: a concurrent load or onboarding of the name wins once
    if created is None:
        raise OpenAIHTTPError(400, f"an adapter named {req.lora_name!r} is already loaded; unload it first",
                              code="adapter_exists", param="lora_name")
    return created
