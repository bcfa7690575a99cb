"""A key/value cache that grows in place: the transformers engine's cache for decoding.

transformers' ``DynamicCache`` appends each decode step's keys and values with ``torch.cat``, so every step copies
the whole cache of every layer (rows x cached tokens), a cost that grows with the batch and the context and that
the running rows pay at every token. Here each layer keeps its keys and values in buffers with room: ``spare``
token slots after the cached tokens and ``spare_rows`` rows along the batch (the running batch keeps two on a CPU,
where rows never written take no memory). ``keys`` and ``values`` are views of the buffers' first rows and of
their tokens from column ``start`` on; an update writes the new tokens into the room after them, and a copy
happens only when that room runs out (once per ``spare`` tokens). The attention reads the same numbers as from a
concatenated cache.

Dropping rows (:meth:`GrowingCache.rows`) keeps the buffers when the kept rows are the first ones: the padding no
row needs any more is trimmed by moving ``start``, and those columns become leading room. Joining rows to the
left-padded batch (:meth:`GrowingCache.with_rows`) writes the newcomers into the spare rows, and when their prompts
are longer than the batch's rows, widens the batch into its leading room (the running rows' new padding zeroed
there), without copying the running rows; only without enough room does it stack all rows into new buffers.

Memory a join writes to is made resident beforehand by :meth:`GrowingCache.reserve`, which an admission runs a layer
per slice: on a CPU, the first write to a fresh page costs a page fault, several times the copy itself, and a join's
copy lands between two decode steps of the running rows.

Code that replaces ``keys`` / ``values`` (a crop or a row selection by transformers, the batch's drops) stays
correct: an update checks that they are still views of the buffers' first rows from column ``start`` on, and
moves them into new buffers if not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

DEFAULT_SPARE = 128  # token slots of room per row: a regrowth (one copy of the layer) every 128 decode steps
DEFAULT_SPARE_ROWS = 2  # rows of room the running batch keeps on a CPU (service/batching.py)

Reserved = list[tuple[torch.Tensor, torch.Tensor] | None]  # per layer: zeroed buffers for a join, or None (in place)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` ``[B, H, T, D]`` are views of the first rows and of tokens
    ``start : start + T`` of buffers ``[B + row room, H, start + T + token room, D]``."""

    def __init__(self, spare: int = DEFAULT_SPARE, spare_rows: int = 0) -> None:
        super().__init__()
        self.spare, self.spare_rows = spare, spare_rows
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.start = 0  # the buffers' column of the first cached token

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states`` / ``value_states`` ``[B, H, q, D]`` after the cached tokens; return all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, length, new = key_states.shape[0], self.get_seq_length(), key_states.shape[-2]
        if (not self.in_buffers() or self.buffers[0].shape[2] < self.start + length + new
                or (length and self.keys.shape[0] != rows)):
            self._regrow(key_states, value_states, length)
        keys, values = self.buffers
        start, end = self.start, self.start + length
        keys[:rows, :, end : end + new].copy_(key_states)
        values[:rows, :, end : end + new].copy_(value_states)
        self.keys, self.values = keys[:rows, :, start : end + new], values[:rows, :, start : end + new]
        return self.keys, self.values

    def in_buffers(self) -> bool:
        """Whether ``keys`` / ``values`` are still views of the buffers' first rows from column ``start`` on
        (nothing replaced them since the last update)."""
        if self.buffers is None:
            return False
        for cached, buffer in zip((self.keys, self.values), self.buffers):
            if not cached.numel():
                continue
            if (cached.data_ptr() != buffer[:, :, self.start :].data_ptr() or cached.stride() != buffer.stride()
                    or cached.dtype != buffer.dtype or cached.shape[0] > buffer.shape[0] or cached.shape[1] != buffer.shape[1]):
                return False
        return True

    def hold(self, keys: torch.Tensor, values: torch.Tensor, rows: int, length: int, start: int = 0) -> None:
        """Take ``keys`` / ``values`` ``[capacity rows, H, capacity tokens, D]`` as the buffers, their first ``rows``
        rows and ``length`` tokens from column ``start`` on cached (no copy)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.buffers, self.start = (keys, values), start
        self.keys, self.values = keys[:rows, :, start : start + length], values[:rows, :, start : start + length]

    def _regrow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int) -> None:
        """New buffers with room holding the ``length`` cached tokens."""
        rows, new = key_states.shape[0], key_states.shape[2]
        buffers = []
        for cached, states in ((self.keys, key_states), (self.values, value_states)):
            _, h, _, d = states.shape
            buffer = states.new_empty((rows + self.spare_rows, h, length + new + self.spare, d))
            if length:
                buffer[:rows, :, :length].copy_(cached)
            buffers.append(buffer)
        self.buffers, self.start = (buffers[0], buffers[1]), 0

    def reset(self) -> None:
        self.buffers, self.start = None, 0
        super().reset()


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`GrowingLayer` s (created on the first update of each layer, as
    ``DynamicCache()`` creates its layers, or built by :meth:`with_rows` and :meth:`rows`)."""

    def __init__(self, spare: int = DEFAULT_SPARE, spare_rows: int = 0) -> None:
        super().__init__()
        self.spare, self.spare_rows = spare, spare_rows
        self.layer_class_to_replicate = self._layer

    def _layer(self) -> GrowingLayer:
        return GrowingLayer(self.spare, self.spare_rows)

    def reserve(self, more: int, width: int, between: Callable[[], None] = lambda: None) -> Reserved:
        """Make resident the memory that :meth:`with_rows` of ``more`` rows at ``width`` tokens will write: the
        spare rows of a layer they fit in (zeroed; no decode step reads or writes them), else new zeroed buffers of
        the joined size with room (returned for ``with_rows``). ``between`` runs before each layer (an admission's
        checkpoint: a layer's work per slice at most). Changes nothing a decode step sees."""
        reserved: Reserved = []
        for layer in self.layers:
            between()
            rows, (_, heads, length, dim) = layer.keys.shape[0], layer.keys.shape
            if _fits(layer, more, max(width - length, 0)):  # decode steps since the width was taken made it longer
                for buffer in layer.buffers:
                    buffer[rows : rows + more].zero_()
                reserved.append(None)
            else:
                shape = (rows + more + self.spare_rows, heads, width + self.spare, dim)
                reserved.append((layer.keys.new_zeros(shape), layer.values.new_zeros(shape)))
        return reserved

    def with_rows(self, new: DynamicCache, width: int, reserved: Reserved | None = None) -> GrowingCache:
        """This cache's rows, then ``new``'s, left-padded with zeros to ``width`` tokens (at least this cache's
        length). ``new``'s rows are written into this cache's spare rows when there are enough, and this cache's rows
        are widened into its leading room when ``width`` is longer (their new padding zeroed): this cache is then
        unchanged but shares its buffers with the result, which replaces it. Otherwise all rows are stacked into the
        layer's ``reserved`` buffers where they hold them (:meth:`reserve`), else into new buffers with room."""
        joined = GrowingCache(self.spare, self.spare_rows)
        for i, (old, added) in enumerate(zip(self.layers, new.layers)):
            layer = joined._layer()
            rows, more, wider = old.keys.shape[0], added.keys.shape[0], width - old.keys.shape[2]
            held = None if reserved is None else reserved[i]
            if _fits(old, more, wider):
                start = old.start - wider
                for buffer, part in zip(old.buffers, (added.keys, added.values)):
                    buffer[:rows, :, start : old.start].zero_()
                    _write_padded(buffer[rows : rows + more, :, start:], part, width, 2)
                layer.hold(*old.buffers, rows + more, width, start)
            elif held is not None and _holds(held[0], old.keys, rows + more, width):
                for buffer, first, second in zip(held, (old.keys, old.values), (added.keys, added.values)):
                    _stack_into(buffer, first, second, width, 2)
                layer.hold(*held, rows + more, width)
            else:
                layer.hold(stacked(old.keys, added.keys, width, 2, self.spare, self.spare_rows),
                           stacked(old.values, added.values, width, 2, self.spare, self.spare_rows), rows + more, width)
            joined.layers.append(layer)
        return joined

    def rows(self, index: torch.Tensor, start: int) -> GrowingCache:
        """A new cache of the rows ``index`` of this one, from token ``start`` on: none when it keeps this cache's
        first rows (the rows after them become room, and the tokens before ``start`` leading room; this cache then
        shares its buffers with the result, which replaces it), else one copy of what it keeps."""
        if self._first_rows_in_buffers(index):
            return self._first_rows(len(index), start)
        kept = GrowingCache(self.spare, self.spare_rows)
        for layer in self.layers:
            length = layer.keys.shape[2] - start
            buffers = []
            for cached in (layer.keys, layer.values):
                _, h, _, d = cached.shape
                buffer = cached.new_empty((len(index) + self.spare_rows, h, length + self.spare, d))
                torch.index_select(cached[:, :, start:], 0, index, out=buffer[: len(index), :, :length])
                buffers.append(buffer)
            held = kept._layer()
            held.hold(buffers[0], buffers[1], len(index), length)
            kept.layers.append(held)
        return kept

    def _first_rows_in_buffers(self, index: torch.Tensor) -> bool:
        """Whether ``index`` is ``0, 1, ..., k - 1`` and every layer still holds its rows in its buffers."""
        first = torch.equal(index, torch.arange(len(index), device=index.device))
        return first and all(isinstance(layer, GrowingLayer) and layer.in_buffers() for layer in self.layers)

    def _first_rows(self, count: int, trim: int) -> GrowingCache:
        """A cache of this one's first ``count`` rows without their first ``trim`` tokens, on the same buffers (no
        copy)."""
        kept = GrowingCache(self.spare, self.spare_rows)
        for layer in self.layers:
            held = kept._layer()
            held.hold(*layer.buffers, count, layer.keys.shape[2] - trim, layer.start + trim)
            kept.layers.append(held)
        return kept


def _fits(layer: DynamicLayer, more: int, wider: int) -> bool:
    """Whether ``more`` rows join ``layer`` in place: into its spare rows, its rows widened by ``wider`` tokens into
    its leading room."""
    return (isinstance(layer, GrowingLayer) and layer.in_buffers() and 0 <= wider <= layer.start
            and layer.buffers[0].shape[0] >= layer.keys.shape[0] + more)


def _holds(buffer: torch.Tensor, like: torch.Tensor, rows: int, width: int) -> bool:
    """Whether ``buffer`` has ``rows`` rows and ``width`` tokens of ``like``'s heads, size and type."""
    return (buffer.shape[0] >= rows and buffer.shape[2] >= width and buffer.shape[1] == like.shape[1]
            and buffer.shape[3] == like.shape[3] and buffer.dtype == like.dtype and buffer.device == like.device)


def stacked(first: torch.Tensor, second: torch.Tensor, width: int, dim: int, room: int = 0, row_room: int = 0) -> torch.Tensor:
    """``first`` and ``second`` stacked along dim 0, each left-padded with zeros to ``width`` along ``dim``, written
    once into one new tensor with ``room`` more (unwritten) slots after them along ``dim`` and ``row_room`` more
    (unwritten) rows."""
    shape = list(first.shape)
    shape[0], shape[dim] = first.shape[0] + second.shape[0] + row_room, width + room
    out = torch.empty(shape, dtype=first.dtype, device=first.device)
    _stack_into(out, first, second, width, dim)
    return out


def _stack_into(out: torch.Tensor, first: torch.Tensor, second: torch.Tensor, width: int, dim: int) -> None:
    """Write ``first``'s rows, then ``second``'s, into ``out``'s first rows, each left-padded with zeros to ``width``
    along ``dim``."""
    _write_padded(out[: first.shape[0]], first, width, dim)
    _write_padded(out[first.shape[0] : first.shape[0] + second.shape[0]], second, width, dim)


def _write_padded(target: torch.Tensor, part: torch.Tensor, width: int, dim: int) -> None:
    """Write ``part`` into the first ``width`` slots of ``target`` along ``dim``, left-padded with zeros."""
    pad = width - part.shape[dim]
    target.narrow(dim, 0, pad).zero_()
    target.narrow(dim, pad, part.shape[dim]).copy_(part)
