"""A budget for decoded images: the pixels of every request that is being decoded, waiting or running.

Images are decoded before a request joins the queue (the engine needs them to check it), so without a budget a
full queue of small PNGs that decode to 4096x4096 pixels each holds many gigabytes. Each request reserves its
images' decoded size (width x height x 3 bytes, read from the header before any pixel is decoded) and gives it back
when it ends; a request that would exceed the budget is a 503 with ``Retry-After``, like a full queue.
"""

from __future__ import annotations

import threading

from seeright.service.scheduler import QueueFull


class ImageMemory:
    """Bytes of decoded images held by requests, against a budget (thread-safe: images decode in worker threads)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._lock = threading.Lock()

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _take(self, nbytes: int) -> None:
        with self._lock:
            if self.held + nbytes > self.budget:
                raise QueueFull
            self.held += nbytes

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


class Reservation:
    """One request's share of the budget: ``take`` before decoding each image, ``release`` once when it ends."""

    def __init__(self, memory: ImageMemory) -> None:
        self.memory, self.nbytes = memory, 0

    def take(self, nbytes: int) -> None:
        self.memory._take(nbytes)
        self.nbytes += nbytes

    def release(self) -> None:
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes:
            self.memory._give(nbytes)
