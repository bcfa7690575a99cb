"""Models that load by id with no download: random test models built in code and trained models that ship
inside the package.

* ``tiny-random/llava``, ``tiny-random/qwen2-vl``, ``bench-random/llava``: random weights with planted
  sinks, built in code (:mod:`seeright.model_zoo.tiny_random`); what tests, demos and benchmarks use offline.
  ``bench-random/llava-7b``: the same at LLaVA-1.5-7B's shapes, for timing runs on a GPU.
* ``seeright/shapes-llava``: the small LLaVA trained on the shapes world (``testbed/train.py``); its
  weights live in ``model_zoo/shapes-llava``.
* ``seeright/shapes-smol``: SmolLM2-135M-Instruct with a vision tower trained on the shapes world
  (``testbed/train_smol.py``), assembled at load time (:mod:`seeright.model_zoo.shapes_smol`) from the GGUF language
  model and what was trained, which lives in ``model_zoo/shapes-smol``.
* ``seeright/smollm2-135m-instruct``: that language model alone, text-only, as a transformers folder in the
  cache (what the vLLM engine path runs on a CPU, where vLLM takes no vision-language model).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

PACKAGED_MODELS = {"seeright/shapes-llava": "shapes-llava", "seeright/shapes-smol": "shapes-smol"}
ASSEMBLED_MODELS = {"seeright/shapes-smol"}  # built from parts at load time, not a transformers folder
CACHED_MODELS = {"seeright/smollm2-135m-instruct"}  # a transformers folder made in the cache on first use


def builtin_model(model_id: str, device: str = "cpu") -> tuple[Any, Any, Any] | None:
    """``(model, tokenizer, image_processor)`` of a model built in code, or ``None`` for any other id. Random
    models are drawn on ``device``; an assembled model is built on the CPU."""
    from seeright.model_zoo.tiny_random import TINY_MODELS

    if model_id in ASSEMBLED_MODELS:
        from seeright.model_zoo import shapes_smol

        return shapes_smol.build(Path(resolve_model_path(model_id)))
    build = TINY_MODELS.get(model_id)
    return None if build is None else build(device=device)


def built_in(model_id: str) -> bool:
    """Whether seeright builds ``model_id`` in code or assembles it at load time (no transformers folder of its own)."""
    from seeright.model_zoo.tiny_random import TINY_MODELS

    return model_id in ASSEMBLED_MODELS or model_id in TINY_MODELS


def export_dir(model_id: str) -> Path:
    """Where a built-in model's exported folder lives in the cache (``SEERIGHT_CACHE``, default ``~/.cache/seeright``)."""
    root = Path(os.environ.get("SEERIGHT_CACHE", "~/.cache/seeright")).expanduser()
    return root / "exports" / model_id.replace("/", "--")


def resolve_model_path(model_id_or_path: str) -> str:
    """The shipped (or cached) folder of a packaged model id; any other id or path unchanged."""
    if model_id_or_path in CACHED_MODELS:
        from seeright.model_zoo.shapes_smol import text_model_folder

        return str(text_model_folder())
    folder = PACKAGED_MODELS.get(model_id_or_path)
    if folder is None:
        return model_id_or_path
    return str(resources.files("seeright.model_zoo") / folder)
