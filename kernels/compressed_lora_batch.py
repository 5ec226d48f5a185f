"""Per-step metadata of compressed LoRA serving (Compress then Serve, docs/algorithms.md 9.10): each
token carries (cluster, row), the cluster's shared bases and the row of its adapter's core
Sigma. Kept free of Triton so the PyTorch reference imports it anywhere.

Walk-through: token_clusters = [1, -1, 0, 1], token_rows = [5, 0, 2, 3]
    -> sorted_token_ids = [2, 0, 3], clusters = [0, 1], counts = [1, 2], offsets = [0, 1]:
    cluster 0 runs one shared V^T/U GEMM for token 2 (core row 2); cluster 1 one for tokens 0
    and 3 (rows 5 and 3); token 1 is base-only and touched by nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class CompressedLoRABatch:
    """Token -> (cluster, core row) mapping for one step, grouped by cluster once."""

    token_clusters: torch.Tensor  # [T] int64, -1 = no adapter
    token_rows: torch.Tensor  # [T] int64, row of the adapter's Sigma inside its cluster
    sorted_token_ids: torch.Tensor  # [T_lora] int64, token indices grouped by cluster
    clusters: torch.Tensor  # [C_active] int64, distinct clusters of this step (ascending)
    counts: torch.Tensor  # [C_active] int64
    offsets: torch.Tensor  # [C_active] int64
    clusters_list: list[int]  # host copies, for the reference and the launch grid
    counts_list: list[int]
    offsets_list: list[int]

    @classmethod
    def from_ids(cls, token_clusters: torch.Tensor, token_rows: torch.Tensor) -> "CompressedLoRABatch":
        """Group tokens by cluster (stable: token order inside a cluster is kept)."""
        assert token_clusters.shape == token_rows.shape, (token_clusters.shape, token_rows.shape)
        token_clusters = token_clusters.to(torch.int64)
        active = torch.nonzero(token_clusters >= 0, as_tuple=False).flatten()
        order = torch.argsort(token_clusters[active], stable=True)
        sorted_token_ids = active[order]
        clusters, counts = torch.unique_consecutive(token_clusters[sorted_token_ids], return_counts=True)
        return cls(
            token_clusters=token_clusters,
            token_rows=token_rows.to(torch.int64),
            sorted_token_ids=sorted_token_ids,
            clusters=clusters,
            counts=counts,
            offsets=torch.cumsum(counts, 0) - counts,
            clusters_list=clusters.tolist(),
            counts_list=(counts_list := counts.tolist()),
            offsets_list=[0, *itertools.accumulate(counts_list)][:-1],
        )

    @property
    def num_active_clusters(self) -> int:
        return len(self.clusters_list)

    @property
    def num_lora_tokens(self) -> int:
        return int(self.sorted_token_ids.shape[0])
