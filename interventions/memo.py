"""Analysis results kept by content: a method's pass whose result is a function of a request's images and a few of
its parameters alone (VE masking's PGD attack) runs once per image, however many requests ask about that image.

The release of such a method computes the result once per image offline (VE masking's saves the attacked image),
so reusing it is the method as published, and the result is bit for bit what recomputing it gives (a request's
pass never depends on its batch-mates). vLLM keeps its vision encoder's outputs the same way (its multimodal
cache). Each engine holds one bounded cache (least recently used first out); a key names the method, the exact
input tensor's bytes and the parameters the result depends on.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import TypeVar

import torch

T = TypeVar("T")


def tensor_key(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    """A tensor's identity by content: dtype, shape and the SHA-256 of its bytes."""
    data = tensor.detach().cpu().contiguous()
    return str(data.dtype), tuple(data.shape), hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


class Memo:
    """A bounded, thread-safe map from keys to computed results (least recently used evicted first). Callers that
    ask for a key while another computes it wait for that result (the vLLM client admits each request in a thread
    of its own: a POPE run's questions about one image arrive together)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The result stored under ``key``, else ``compute()``, stored (a capacity of 0 stores nothing). A
        computation that fails is not stored; a caller waiting for it computes on its own."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]  # type: ignore[return-value]
            pending = self._pending.get(key)
            if pending is None:
                self.misses += 1
                self._pending[key] = mine = Future()
        if pending is not None:
            try:
                return pending.result()
            except Exception:  # noqa: BLE001 - the owner's failure is reported to the owner; try on our own
                return compute()
        try:
            value = compute()  # outside the lock: a long pass never blocks another key's lookup
        except BaseException as error:
            with self._lock:
                del self._pending[key]
            mine.set_exception(error)
            raise
        with self._lock:
            del self._pending[key]
            if self.capacity > 0:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        mine.set_result(value)
        return value
