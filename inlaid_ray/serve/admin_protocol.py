"""Request bodies of the admin routes that are not vLLM's (tenants and their API keys)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TenantRequest(BaseModel):
    """The body of the admin routes that create a tenant or a key for one."""

    model_config = ConfigDict(extra="forbid")

    tenant: str
