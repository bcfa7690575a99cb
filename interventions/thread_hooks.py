"""Hooks that act only in the thread that installed them.

The scheduler may pause a newcomer's admission between two blocks of the model and run a decode step of the
running rows in its own thread (:mod:`seeright.service.slicing`); the hooks that admission installed for its
own forward (its methods' context, an analysis pass's capture or early stop, VE masking's tower masks, its LoRA
rows) must not fire in that decode step. Every temporary hook is registered through :func:`this_thread_only`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, run only in the thread that wraps it; in any other thread's forward it returns ``None`` (the
    module's inputs or outputs unchanged)."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    return guarded
