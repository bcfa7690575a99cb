"""The running batch's key/value cache (``seeright.service.growing_cache``): it holds what transformers'
``DynamicCache`` holds after any sequence of updates, crops and row selections, and a decode step writes into
its room instead of copying the cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from seeright.service.growing_cache import GrowingCache


def _states(rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 4, generator=g), torch.randn(rows, 2, tokens, 4, generator=g)


def _same(growing: GrowingCache, dynamic: DynamicCache) -> bool:
    return all(
        torch.equal(g.keys, d.keys) and torch.equal(g.values, d.values) for g, d in zip(growing.layers, dynamic.layers, strict=True)
    )


def test_updates_crops_and_row_selections_hold_what_a_dynamic_cache_holds():
    growing, dynamic = GrowingCache(spare=3), DynamicCache()
    steps = [("update", 3, 5), ("update", 3, 1), ("update", 3, 1), ("update", 3, 1), ("update", 3, 1), ("crop", -2),
             ("update", 3, 2), ("select", [0, 2]), ("update", 2, 1), ("update", 2, 4)]
    for seed, step in enumerate(steps):
        for layer in range(2):
            if step[0] == "update":
                keys, values = _states(step[1], step[2], seed * 2 + layer)
                got, want = growing.update(keys, values, layer), dynamic.update(keys, values, layer)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
        if step[0] == "crop":
            growing.crop(step[1]), dynamic.crop(step[1])
        if step[0] == "select":
            index = torch.tensor(step[1])
            growing.batch_select_indices(index), dynamic.batch_select_indices(index)
        assert _same(growing, dynamic), step


def test_a_decode_step_writes_into_the_room_and_regrows_only_when_it_runs_out():
    cache = GrowingCache(spare=2)
    cache.update(*_states(2, 6, 0), 0)
    buffer = cache.layers[0].keys.data_ptr()
    cache.update(*_states(2, 1, 1), 0)
    cache.update(*_states(2, 1, 2), 0)
    assert cache.layers[0].keys.data_ptr() == buffer and cache.get_seq_length() == 8  # in place: no copy
    cache.update(*_states(2, 1, 3), 0)
    assert cache.layers[0].keys.data_ptr() != buffer and cache.get_seq_length() == 9  # out of room: one copy


def test_appended_buffers_and_selected_rows_are_the_cache_without_copies_of_the_rest():
    keys, values = _states(3, 7, 0)
    cache = GrowingCache(spare=4)
    cache.append(keys, values, 5)  # buffers of 7 tokens, 5 cached: room for 2
    assert torch.equal(cache.layers[0].keys, keys[:, :, :5]) and cache.layers[0].keys.data_ptr() == keys.data_ptr()
    cache.update(*_states(3, 1, 1), 0)
    assert cache.layers[0].keys.data_ptr() == keys.data_ptr()  # the appended room took the step
    kept = cache.rows(torch.tensor([2, 0]), start=1)
    assert torch.equal(kept.layers[0].keys, cache.layers[0].keys[[2, 0], :, 1:])
    assert torch.equal(kept.layers[0].values, cache.layers[0].values[[2, 0], :, 1:])
    assert kept.layers[0]._buffers[0].shape == (2, 2, 5 + 4, 4)  # only the kept rows, with the spare room
