"""LoRABatch built from the engine's host list equals the grouping torch computes on the device."""

from __future__ import annotations

import pytest
import torch

from inlaid_ray.model.forward_batch import LoRABatch


@pytest.mark.parametrize("seed", range(6))
def test_host_grouping_equals_device_grouping(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=gen))
    token_slots = torch.randint(-1, 5, (n,), generator=gen).tolist()
    host = LoRABatch.from_host_slots(token_slots, "cpu")
    ref = LoRABatch.from_token_slots(torch.tensor(token_slots))
    for field in ("token_slots", "sorted_token_ids", "slots", "counts", "offsets"):
        assert getattr(host, field).tolist() == getattr(ref, field).tolist(), field
    assert (host.slots_list, host.counts_list, host.offsets_list) == (ref.slots_list, ref.counts_list, ref.offsets_list)


def test_all_base_tokens_give_an_empty_grouping():
    host = LoRABatch.from_host_slots([-1, -1, -1], "cpu")
    assert host.num_active_slots == 0 and host.sorted_token_ids.numel() == 0
