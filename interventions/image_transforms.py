"""RITUAL's six image transformations, with PIL and numpy (torchvision does not load beside a CPU torch).

Each follows the torchvision transform the release composes (``ritual_utils``), drawing its random
parameters the same way from a seeded ``random.Random`` instead of torch's global generator:

* ``horizontal_flip`` / ``vertical_flip``: ``RandomHorizontalFlip(p=1)`` / ``RandomVerticalFlip(p=1)``;
* ``rotation``: ``RandomRotation(180)``: angle ~ U(-180, 180), nearest neighbour, same size, black fill;
* ``color_jitter``: ``ColorJitter(1, 1, 1, 0.5)``: brightness, contrast, saturation factors ~ U(0, 2) and a
  hue shift ~ U(-0.5, 0.5), applied in a random order (PIL's ImageEnhance, as torchvision does on PIL images;
  hue as torchvision's PIL path: the H channel of HSV shifted by ``hue * 255`` with uint8 wrap-around);
* ``gaussian_blur``: ``GaussianBlur(13, sigma=(1.5, 2.0))``: a 13-tap separable kernel, reflect padding;
* ``resized_crop``: ``RandomResizedCrop(size=336)`` in the release (LLaVA-1.5): area scale ~ U(0.08, 1),
  log-aspect ~ U(log 3/4, log 4/3), ten tries, else a centre crop, resized bilinearly to a ``square x square``
  image, the square LLaVA's processor then takes whole (its centre crop cuts nothing). ``square`` is the processor's
  crop side (:attr:`ModelInfo.square_image`). Qwen2-VL's processor crops nothing and keeps the aspect ratio
  (dynamic resolution), so there the equivalent is the crop resized back to the image's own size: what the model
  sees is then the crop, whole, at the resolution the original would get.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def horizontal_flip(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(image)


def vertical_flip(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.flip(image)


def rotation(image: Image.Image, rng: random.Random) -> Image.Image:
    angle = rng.uniform(-180.0, 180.0)
    return image.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=(0,) * len(image.getbands()))


def _hue(image: Image.Image, shift: float) -> Image.Image:
    h, s, v = image.convert("HSV").split()
    moved = (np.asarray(h, dtype=np.uint8) + np.uint8(round(shift * 255) % 256)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(moved, "L"), s, v)).convert(image.mode)


def color_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    factors = {"brightness": rng.uniform(0, 2), "contrast": rng.uniform(0, 2), "saturation": rng.uniform(0, 2),
               "hue": rng.uniform(-0.5, 0.5)}
    order = list(factors)
    rng.shuffle(order)
    enhancers = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast, "saturation": ImageEnhance.Color}
    for name in order:
        image = _hue(image, factors[name]) if name == "hue" else enhancers[name](image).enhance(factors[name])
    return image


def gaussian_blur(image: Image.Image, rng: random.Random, size: int = 13) -> Image.Image:
    sigma = rng.uniform(1.5, 2.0)
    x = np.linspace(-(size // 2), size // 2, size)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    pixels = np.asarray(image, dtype=np.float64)
    pad = size // 2
    for axis in (0, 1):
        widths = [(0, 0)] * pixels.ndim
        widths[axis] = (pad, pad)
        padded = np.pad(pixels, widths, mode="reflect")
        pixels = sum(kernel[k] * np.take(padded, range(k, k + pixels.shape[axis]), axis=axis) for k in range(size))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), image.mode)


def crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params``: (left, top, w, h) of a crop of 8%..100% of the area at an aspect in
    [3/4, 4/3], ten tries, else a centre crop at the closest allowed aspect."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    ratio = width / height
    w, h = (width, round(width / (4 / 3))) if ratio > 4 / 3 else (round(height * 3 / 4), height) if ratio < 3 / 4 else (width, height)
    return (width - w) // 2, (height - h) // 2, w, h


def resized_crop(image: Image.Image, rng: random.Random, square: int | None = None) -> Image.Image:
    left, top, w, h = crop_box(*image.size, rng)
    size = (square, square) if square else image.size
    return image.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BILINEAR)


TRANSFORMS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "horizontal_flip": horizontal_flip, "vertical_flip": vertical_flip, "rotation": rotation,
    "color_jitter": color_jitter, "gaussian_blur": gaussian_blur, "resized_crop": resized_crop,
}


def random_transform(image: Image.Image, name: str, seed: int, square: int | None = None) -> tuple[str, Image.Image]:
    """``name`` (or, for "random", one of the six drawn uniformly) applied to ``image``, seeded by ``seed``; a crop
    comes out ``square x square`` where the model's processor takes square images (``resized_crop``)."""
    rng = random.Random(seed)
    chosen = rng.choice(sorted(TRANSFORMS)) if name == "random" else name
    if chosen == "resized_crop":
        return chosen, resized_crop(image.convert("RGB"), rng, square)
    return chosen, TRANSFORMS[chosen](image.convert("RGB"), rng)
