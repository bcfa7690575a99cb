"""Trained models that ship inside the package, loadable by id with no download.

``seeright/shapes-llava`` is the small LLaVA trained on the shapes world (``training/shapes_llava.py``);
its weights live in ``service/models/shapes-llava``.
"""

from __future__ import annotations

from importlib import resources

PACKAGED_MODELS = {"seeright/shapes-llava": "shapes-llava"}


def resolve_model_path(model_id_or_path: str) -> str:
    """The shipped folder of a packaged model id; any other id or path unchanged."""
    folder = PACKAGED_MODELS.get(model_id_or_path)
    if folder is None:
        return model_id_or_path
    return str(resources.files("service") / "models" / folder)
