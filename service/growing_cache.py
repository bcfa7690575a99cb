"""A key/value cache that grows in place: the running batch's cache on the transformers engine.

transformers' ``DynamicCache`` appends each decode step's keys and values with ``torch.cat``, so every step copies
the whole cache of every layer (rows x cached tokens), a cost that grows with the batch and the context and that
the running rows pay at every token. Here each layer keeps its keys and values in buffers with ``spare`` token
slots of room along the sequence; ``keys`` and ``values`` are prefix views of them, and an update writes the new
tokens into the room. A step copies only when the room runs out (once per ``spare`` tokens). The attention reads
the same numbers as from a concatenated cache (a prefix view of the same values).

Code that replaces ``keys`` / ``values`` (a crop or a row selection by transformers, the batch's merges and drops)
stays correct: an update checks that they are still a prefix of its buffers and moves them into new ones if not.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

DEFAULT_SPARE = 128  # token slots of room per row: a regrowth (one copy of the layer) every 128 decode steps


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` ``[B, H, T, D]`` are prefix views of buffers
    ``[B, H, T + room, D]``."""

    def __init__(self, spare: int = DEFAULT_SPARE) -> None:
        super().__init__()
        self.spare = spare
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states`` / ``value_states`` ``[B, H, q, D]`` after the cached tokens; return all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._holds(key_states, length + new):
            self._regrow(key_states, value_states, length, length + new + self.spare)
        keys, values = self._buffers
        keys[:, :, length : length + new].copy_(key_states)
        values[:, :, length : length + new].copy_(value_states)
        self.keys, self.values = keys[:, :, : length + new], values[:, :, : length + new]
        return self.keys, self.values

    def _holds(self, key_states: torch.Tensor, needed: int) -> bool:
        """Whether ``keys`` / ``values`` are still prefix views of the buffers and the buffers have room for
        ``needed`` tokens of rows shaped like ``key_states``."""
        if self._buffers is None:
            return False
        buffers = self._buffers
        for cached, buffer in zip((self.keys, self.values), buffers):
            if cached.numel() and (cached.data_ptr() != buffer.data_ptr() or cached.stride() != buffer.stride()
                                   or cached.shape[:2] != buffer.shape[:2]):
                return False
        return buffers[0].shape[2] >= needed and buffers[0].shape[:2] == key_states.shape[:2] and buffers[0].dtype == key_states.dtype

    def _regrow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, capacity: int) -> None:
        """New buffers of ``capacity`` tokens holding the ``length`` cached ones."""
        buffers = []
        for cached, states in ((self.keys, key_states), (self.values, value_states)):
            b, h, _, d = states.shape
            buffer = states.new_empty((b, h, capacity, d))
            if length:
                buffer[:, :, :length].copy_(cached)
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])

    def reset(self) -> None:
        self._buffers = None
        super().reset()


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`GrowingLayer` s (created on the first update of each layer, as
    ``DynamicCache()`` creates its layers, or added with their buffers by :meth:`append`)."""

    def __init__(self, spare: int = DEFAULT_SPARE) -> None:
        super().__init__()
        self.spare = spare
        self.layer_class_to_replicate = lambda: GrowingLayer(spare)

    def append(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Add a layer that holds ``keys`` / ``values`` ``[B, H, capacity, D]`` as its buffers, their first
        ``length`` tokens cached (no copy)."""
        layer = GrowingLayer(self.spare)
        layer.lazy_initialization(keys, values)
        layer._buffers = (keys, values)
        layer.keys, layer.values = keys[:, :, :length], values[:, :, :length]
        self.layers.append(layer)

    def rows(self, index: torch.Tensor, start: int) -> GrowingCache:
        """A new cache of the rows ``index`` of this one, from token ``start`` on (one copy of what it keeps)."""
        kept = GrowingCache(self.spare)
        for layer in self.layers:
            length = layer.keys.shape[2] - start
            buffers = []
            for cached in (layer.keys, layer.values):
                _, h, _, d = cached.shape
                buffer = cached.new_empty((len(index), h, length + self.spare, d))
                torch.index_select(cached[:, :, start:], 0, index, out=buffer[:, :, :length])
                buffers.append(buffer)
            kept.append(buffers[0], buffers[1], length)
        return kept
