"""The demo's seed manifest (`inlaid_ray.serve.seed`): the four demo tasks in two clusters (short
and long outputs), owned by the demo tenant, each with its committed adapter, calibration file,
output-length prior and SLO. `manifest.json` beside this file is committed; it is what this module
builds (`python -m inlaid_ray.demo.manifest` rewrites it; a test checks they agree). A manifest for
other adapter copies (tests) is written with `write_demo_manifest(path, adapters_dir)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from inlaid_ray.demo.data import task_length_stats
from inlaid_ray.demo.paths import DEMO_DIR, demo_adapter_dir, demo_data_path

DEMO_MANIFEST = DEMO_DIR / "manifest.json"
DEMO_TENANT = "demo"
DEMO_API_KEY = "demo"  # the demo tenant's key when INLAID_API_KEY is unset (demo mode only)
# Raw adapters are not compressed yet; the clusters group tasks of similar output length.
DEMO_CLUSTERS: dict[str, tuple[str, ...]] = {
    "demo-short": ("sentiment", "extract"),
    "demo-long": ("rewrite", "email"),
}
# Demo SLO: e2e deadline = TTFT budget + per-token budget * p90 output length (CPU-scale numbers).
SLO_TTFT_S = 2.0
SLO_PER_TOKEN_S = 0.1
DEMO_BANK_RANK = 16  # shared rank of a demo cluster's compressed bank


def build_demo_manifest(root: Path, adapters_dir: Path | None = None) -> dict[str, Any]:
    """The manifest with paths relative to `root` (the directory the manifest will be written to)."""
    def rel(p: Path) -> str:
        return os.path.relpath(p.resolve(), root.resolve())

    tasks = {}
    for names in DEMO_CLUSTERS.values():
        for name in names:
            completion = task_length_stats(name)["completion_tokens"]
            tasks[name] = {"adapter": rel(demo_adapter_dir(name, adapters_dir)),
                           "calibration": rel(demo_data_path(name, "calib")),
                           "expected_output_tokens": completion["p50"],
                           "slo_s": round(SLO_TTFT_S + SLO_PER_TOKEN_S * completion["p90"], 6)}
    return {"tenant": DEMO_TENANT, "bank_rank": DEMO_BANK_RANK,
            "clusters": {c: list(m) for c, m in DEMO_CLUSTERS.items()}, "tasks": tasks}


def write_demo_manifest(path: Path, adapters_dir: Path | None = None) -> Path:
    """Write the demo manifest (for adapters under `adapters_dir`, default the committed ones)."""
    path.write_text(json.dumps(build_demo_manifest(path.parent, adapters_dir), indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(write_demo_manifest(DEMO_MANIFEST))
