"""Tenants and API keys. A key is stored only as its SHA-256 (hex) mapped to the principal
it authenticates (tenant + admin flag), so one HGET answers "who is this?" and a leaked
registry dump reveals no usable keys. API keys are random high-entropy tokens, which is
why an unsalted fast hash is enough here (as for GitHub or Stripe tokens); passwords
chosen by people would need a slow salted KDF instead.

    ns:tenants   hash tenant name      -> Tenant JSON
    ns:api_keys  hash sha256(key) hex  -> Principal JSON
"""

from __future__ import annotations

import hashlib
import secrets

import redis

from inlaid_ray.registry.records import Principal, Tenant, check_name, from_json, to_json
from inlaid_ray.registry.transaction import text

CONFIGURED_KEY_LABEL = "bootstrap"  # keys that come from the configuration (INLAID_API_KEY, INLAID_ADMIN_KEY)


def hash_api_key(key: str) -> str:
    """Hex SHA-256 of an API key (what the registry stores instead of the key)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key(prefix: str = "ir") -> str:
    """A fresh random API key (256 bits), e.g. for `inlaid-ray` admin commands."""
    return f"{prefix}-{secrets.token_urlsafe(32)}"


class TenantKeysMixin:
    """Tenant and API-key methods of TaskRegistry (needs `client`, `_tenants_key`, `_api_keys_key`)."""

    client: redis.Redis
    _tenants_key: str
    _api_keys_key: str

    def add_tenant(self, name: str, admin: bool = False) -> Tenant:
        """Create a tenant; an existing tenant is returned unchanged (ValueError if admin differs)."""
        tenant = Tenant(name=check_name("tenant", name), admin=admin)
        if self.client.hsetnx(self._tenants_key, name, to_json(tenant)):
            return tenant
        stored = self.get_tenant(name)
        assert stored is not None, f"tenant {name!r} vanished between HSETNX and HGET"
        if stored.admin != admin:
            raise ValueError(f"tenant {name!r} exists with admin={stored.admin}, asked admin={admin}")
        return stored

    def get_tenant(self, name: str) -> Tenant | None:
        """The tenant `name`, or None."""
        raw = self.client.hget(self._tenants_key, name)
        return None if raw is None else from_json(Tenant, text(raw))

    def list_tenants(self) -> list[Tenant]:
        """All tenants, sorted by name."""
        return sorted((from_json(Tenant, text(v)) for v in self.client.hvals(self._tenants_key)), key=lambda t: t.name)

    def add_api_key(self, tenant: str, key: str, label: str = "") -> str:
        """Map `key` to an existing tenant; returns the stored hash. Re-adding the same key for
        the same tenant is a no-op; a key already used by another tenant raises ValueError."""
        if len(key) < 4:
            raise ValueError(f"API key for tenant {tenant!r} is too short ({len(key)} chars, need >= 4)")
        stored_tenant = self.get_tenant(tenant)
        if stored_tenant is None:
            raise ValueError(f"tenant {tenant!r} does not exist; add_tenant() first")
        digest = hash_api_key(key)
        principal = Principal(tenant=tenant, admin=stored_tenant.admin, label=label)
        if not self.client.hsetnx(self._api_keys_key, digest, to_json(principal)):
            existing = self.principal_for_key(key)
            if existing is None or existing.tenant != tenant:
                raise ValueError(f"this API key is already registered to another tenant (not {tenant!r})")
        return digest

    def revoke_api_key(self, key: str) -> bool:
        """Forget `key`; True if it was registered."""
        return self.revoke_key_hash(hash_api_key(key))

    def revoke_key_hash(self, digest: str) -> bool:
        """Forget the key whose sha256 is `digest` (what `list_api_keys` shows); True if it existed."""
        return bool(self.client.hdel(self._api_keys_key, digest))

    def list_api_keys(self, tenant: str | None = None) -> list[dict[str, object]]:
        """Registered keys as {key_hash, tenant, admin, label} (the keys themselves are never stored),
        sorted by tenant then hash; only `tenant`'s when given."""
        rows = []
        for digest, raw in self.client.hgetall(self._api_keys_key).items():
            p = from_json(Principal, text(raw))
            if tenant is None or p.tenant == tenant:
                rows.append({"key_hash": text(digest), "tenant": p.tenant, "admin": p.admin, "label": p.label})
        return sorted(rows, key=lambda r: (r["tenant"], r["key_hash"]))

    def principal_for_key(self, key: str | None) -> Principal | None:
        """Who `key` authenticates as, or None for a missing or unknown key."""
        if not key:
            return None
        raw = self.client.hget(self._api_keys_key, hash_api_key(key))
        return None if raw is None else from_json(Principal, text(raw))

    def tenant_for_key(self, key: str | None) -> str | None:
        """The tenant owning `key`, or None."""
        principal = self.principal_for_key(key)
        return None if principal is None else principal.tenant

    def is_admin_key(self, key: str | None) -> bool:
        """True if `key` belongs to an admin tenant."""
        principal = self.principal_for_key(key)
        return principal is not None and principal.admin

    def bootstrap_keys(self, api_key: str | None, admin_key: str | None = None, tenant: str = "default",
                       admin_tenant: str = "admin") -> list[str]:
        """Install the configured keys (Settings.api_key / Settings.admin_key): `tenant` with
        `api_key`, the admin tenant with `admin_key`. A configured key replaces the earlier
        configured key of its kind (user or admin), which stops working, so that rotating a key
        in the configuration takes effect at the next start; a kind left unconfigured keeps
        what it had (a process started without the environment must not lock everyone out).
        Keys added through the admin API or the CLI are never touched. Returns the revoked
        keys' hashes."""
        stale: list[str] = []
        for key, owner, admin in ((api_key, tenant, False), (admin_key, admin_tenant, True)):
            if not key:
                continue
            self.add_tenant(owner, admin=admin)
            digest = hash_api_key(key)
            current = self.principal_for_key(key)
            if current is not None and current.label == CONFIGURED_KEY_LABEL and current.tenant != owner:
                self.revoke_key_hash(digest)  # the same configured key, now another tenant's
            self.add_api_key(owner, key, label=CONFIGURED_KEY_LABEL)
            for row in self.list_api_keys():
                if row["label"] == CONFIGURED_KEY_LABEL and row["admin"] == admin and row["key_hash"] != digest:
                    stale.append(str(row["key_hash"]))
        if stale:
            self.client.hdel(self._api_keys_key, *stale)
        return stale
