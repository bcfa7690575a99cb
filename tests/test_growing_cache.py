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
    growing, dynamic = GrowingCache(spare=3, spare_rows=1), DynamicCache()
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


def _stacked_reference(first: torch.Tensor, second: torch.Tensor, width: int) -> torch.Tensor:
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))  # noqa: E731 - left-pad the tokens
    return torch.cat([pad(first), pad(second)])


def test_joining_rows_writes_them_into_the_spare_rows_when_they_fit_and_stacks_all_rows_when_not():
    running = GrowingCache(spare=4, spare_rows=2)
    running.update(*_states(2, 6, 0), 0)
    running.update(*_states(2, 1, 1), 0)  # 7 tokens
    newcomer = GrowingCache()
    newcomer.update(*_states(1, 5, 2), 0)
    joined = running.with_rows(newcomer, 7)
    old, layer = running.layers[0], joined.layers[0]
    assert torch.equal(layer.keys, _stacked_reference(old.keys, newcomer.layers[0].keys, 7))
    assert torch.equal(layer.values, _stacked_reference(old.values, newcomer.layers[0].values, 7))
    assert layer.keys.data_ptr() == old.keys.data_ptr()  # the running rows were not copied
    keys, values = _states(3, 1, 3)
    assert torch.equal(joined.update(keys, values, 0)[0][:, :, -1:], keys)  # and it decodes on in place

    longer = GrowingCache()
    longer.update(*_states(1, 10, 4), 0)
    restacked = joined.with_rows(longer, 10)
    assert torch.equal(restacked.layers[0].keys, _stacked_reference(joined.layers[0].keys, longer.layers[0].keys, 10))
    assert restacked.layers[0].keys.data_ptr() != joined.layers[0].keys.data_ptr()


def test_selected_rows_are_copied_once_with_room():
    cache = GrowingCache(spare=4, spare_rows=1)
    cache.update(*_states(3, 7, 0), 0)
    kept = cache.rows(torch.tensor([2, 0]), start=1)
    assert torch.equal(kept.layers[0].keys, cache.layers[0].keys[[2, 0], :, 1:])
    assert torch.equal(kept.layers[0].values, cache.layers[0].values[[2, 0], :, 1:])
    assert kept.layers[0].buffers[0].shape == (2 + 1, 2, 6 + 4, 4)  # the kept rows and tokens, with the room


def test_keeping_the_first_rows_whole_copies_nothing_and_their_old_rows_take_the_next_newcomer():
    cache = GrowingCache(spare=4, spare_rows=0)
    cache.update(*_states(3, 7, 0), 0)
    keys, values = cache.layers[0].keys.clone(), cache.layers[0].values.clone()
    kept = cache.rows(torch.tensor([0, 1]), start=0)
    assert torch.equal(kept.layers[0].keys, keys[:2]) and torch.equal(kept.layers[0].values, values[:2])
    assert kept.layers[0].keys.data_ptr() == cache.layers[0].keys.data_ptr()  # no copy
    step = _states(2, 1, 1)
    assert torch.equal(kept.update(*step, 0)[0], torch.cat([keys[:2], step[0]], dim=2))  # decodes on in place
    newcomer = GrowingCache()
    newcomer.update(*_states(1, 6, 2), 0)
    joined = kept.with_rows(newcomer, 8)
    assert joined.layers[0].keys.data_ptr() == cache.layers[0].keys.data_ptr()  # into the dropped row: no copy
    assert torch.equal(joined.layers[0].keys, _stacked_reference(kept.layers[0].keys, newcomer.layers[0].keys, 8))
    reordered = cache.rows(torch.tensor([1, 0]), start=0)  # not the first rows in order: copied
    assert reordered.layers[0].keys.data_ptr() != cache.layers[0].keys.data_ptr()


def test_padding_dropped_with_the_last_rows_becomes_room_a_longer_newcomer_widens_the_batch_into_without_a_copy():
    cache = GrowingCache(spare=4, spare_rows=0)
    cache.update(*_states(3, 7, 0), 0)
    keys = cache.layers[0].keys.clone()
    kept = cache.rows(torch.tensor([0, 1]), start=3)
    assert torch.equal(kept.layers[0].keys, keys[:2, :, 3:])
    assert kept.layers[0].buffers[0] is cache.layers[0].buffers[0] and kept.layers[0].start == 3  # no copy
    step = _states(2, 1, 1)
    assert torch.equal(kept.update(*step, 0)[0], torch.cat([keys[:2, :, 3:], step[0]], dim=2))  # decodes on in place
    before = kept.layers[0].keys.clone()  # 5 tokens from column 3
    newcomer = GrowingCache()
    newcomer.update(*_states(1, 7, 2), 0)  # 2 tokens longer: the rows widen into the trimmed columns
    joined = kept.with_rows(newcomer, 7)
    layer = joined.layers[0]
    assert layer.buffers[0] is cache.layers[0].buffers[0] and layer.start == 1
    assert torch.equal(layer.keys, _stacked_reference(before, newcomer.layers[0].keys, 7))
    assert torch.equal(kept.layers[0].keys, before)  # the kept cache is unchanged until the joined one replaces it

    wider = GrowingCache()
    wider.update(*_states(1, 9, 3), 0)  # 2 tokens wider, 1 column of room left (and no spare row): stacked anew
    restacked = joined.with_rows(wider, 9)
    assert restacked.layers[0].buffers[0] is not layer.buffers[0]
    assert torch.equal(restacked.layers[0].keys, _stacked_reference(layer.keys, wider.layers[0].keys, 9))


def _fill_nan(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer`` filled with NaN, so that a test sees what a reservation zeroed (fresh memory may hold anything)."""
    return buffer.fill_(float("nan"))


def test_a_reservation_zeroes_only_the_spare_rows_a_join_fits_in_and_the_join_writes_there():
    running = GrowingCache(spare=4, spare_rows=2)
    running.update(*_states(2, 6, 0), 0)
    running.update(*_states(2, 6, 1), 1)
    for layer in running.layers:
        for buffer in layer.buffers:
            _fill_nan(buffer[2:])
    keys = [layer.keys.clone() for layer in running.layers]
    layers = []
    reserved = running.reserve(1, 6, between=lambda: layers.append(len(layers)))
    assert reserved == [None, None] and layers == [0, 1]  # in place, a checkpoint before each layer
    assert running.reserve(1, 5) == [None, None]  # a width taken before decode steps made the rows longer: in place
    for layer, before in zip(running.layers, keys):
        assert torch.equal(layer.keys, before)  # the running rows untouched
        assert all(torch.equal(buffer[2:3], torch.zeros_like(buffer[2:3])) for buffer in layer.buffers)
    newcomer = GrowingCache()
    newcomer.update(*_states(1, 4, 2), 0)
    newcomer.update(*_states(1, 4, 3), 1)
    joined = running.with_rows(newcomer, 6, reserved)
    for i, layer in enumerate(joined.layers):
        assert layer.buffers[0] is running.layers[i].buffers[0]
        assert torch.equal(layer.keys, _stacked_reference(keys[i], newcomer.layers[i].keys, 6))


def test_a_join_that_needs_new_buffers_takes_the_reserved_ones_even_after_decode_steps_and_falls_back_when_they_are_short():
    running = GrowingCache(spare=4, spare_rows=0)
    running.update(*_states(2, 6, 0), 0)
    newcomer = GrowingCache()
    newcomer.update(*_states(1, 8, 1), 0)  # wider than the running rows, and no spare row: new buffers
    reserved = running.reserve(1, 8)
    assert reserved[0] is not None and torch.count_nonzero(reserved[0][0]) == 0
    running.update(*_states(2, 1, 2), 0)  # a decode step between the reservation and the join
    joined = running.with_rows(newcomer, 8, reserved)
    assert joined.layers[0].buffers[0] is reserved[0][0]
    assert torch.equal(joined.layers[0].keys, _stacked_reference(running.layers[0].keys, newcomer.layers[0].keys, 8))
    assert torch.equal(joined.layers[0].values, _stacked_reference(running.layers[0].values, newcomer.layers[0].values, 8))
    keys, values = _states(3, 1, 3)
    assert torch.equal(joined.update(keys, values, 0)[0][:, :, -1:], keys)  # it decodes on in the reserved room

    longest = GrowingCache()
    longest.update(*_states(1, 20, 4), 0)  # wider than the reservation's room: stacked anew
    fallback = running.with_rows(longest, 20, reserved)
    assert fallback.layers[0].buffers[0] is not reserved[0][0]
    assert torch.equal(fallback.layers[0].keys, _stacked_reference(running.layers[0].keys, longest.layers[0].keys, 20))
