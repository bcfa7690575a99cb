"""Shared fixtures: engines on the built-in tiny models, stock copies of them, and test images."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from seeright.model_zoo.tiny_random import TINY_MODELS
from seeright.service.engine import Engine

FAMILIES = ["tiny-random/llava", "tiny-random/qwen2-vl"]
QUESTIONS = [
    "Is there a red dog in the image?",
    "What color is the car next to the tree?",
    "Describe the picture.",
    "How many cats are sitting on the sofa?",
]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n``) the workers share the cores: each one's torch takes its share of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session", autouse=True)
def _records_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Measurement commands run by tests keep their records in a temporary folder, not in the repo's results/."""
    os.environ["SEERIGHT_RESULTS_DIR"] = str(tmp_path_factory.mktemp("results"))


def make_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [make_image(i) for i in range(4)]


@pytest.fixture(scope="session", params=FAMILIES)
def engine(request) -> Engine:
    return Engine.from_pretrained(request.param)


@pytest.fixture(scope="session")
def llava() -> Engine:
    return Engine.from_pretrained("tiny-random/llava")


@pytest.fixture(scope="session")
def stock_models() -> dict:
    """Untouched copies of the tiny models (stock SDPA), built from the same seed."""
    return {name: build()[0] for name, build in TINY_MODELS.items() if name.startswith("tiny-random/")}


@pytest.fixture(scope="session")
def shapes_bench(tmp_path_factory):
    """A small shapes benchmark (40 scenes) of a seed of its own, not the README's; each test writes its own runs."""
    from seeright.testbed import world as shapes

    out = tmp_path_factory.mktemp("shapes")
    shapes.write_benchmark(out, n_images=40, seed=2024)
    return out
