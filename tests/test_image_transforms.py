"""RITUAL's transformations (``seeright.interventions.image_transforms``), each against what its torchvision
counterpart does, written out differently here; and each draw repeats for a seed."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from seeright.interventions import image_transforms as tf

IMAGE = make_image(2, (48, 40))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int32)


@pytest.mark.parametrize("name", sorted(tf.TRANSFORMS))
def test_each_transform_keeps_the_size_and_repeats_for_a_seed(name):
    first, again, other = (tf.random_transform(IMAGE, name, seed)[1] for seed in (5, 5, 6))
    assert first.size == IMAGE.size and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(IMAGE))  # it changes the image
    if name not in ("horizontal_flip", "vertical_flip"):
        assert not np.array_equal(pixels(first), pixels(other))  # its random parameters come from the seed


def test_random_draws_every_transform_uniformly():
    drawn = [tf.random_transform(IMAGE, "random", seed)[0] for seed in range(600)]
    counts = {name: drawn.count(name) for name in tf.TRANSFORMS}
    assert all(60 < c < 140 for c in counts.values()), counts


def test_flips_are_numpy_flips():
    assert np.array_equal(pixels(tf.horizontal_flip(IMAGE, random.Random(0))), pixels(IMAGE)[:, ::-1])
    assert np.array_equal(pixels(tf.vertical_flip(IMAGE, random.Random(0))), pixels(IMAGE)[::-1])


def test_gaussian_blur_is_a_13_tap_reflect_padded_convolution():
    """Against a direct 2-D sum over the 13x13 outer-product kernel (not separable passes)."""
    rng_a, rng_b = random.Random(3), random.Random(3)
    blurred = pixels(tf.gaussian_blur(IMAGE, rng_a))
    sigma = rng_b.uniform(1.5, 2.0)
    taps = np.exp(-0.5 * (np.arange(-6, 7) / sigma) ** 2)
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    padded = np.pad(pixels(IMAGE).astype(np.float64), ((6, 6), (6, 6), (0, 0)), mode="reflect")
    h, w = IMAGE.size[1], IMAGE.size[0]
    expected = np.zeros((h, w, 3))
    for dy in range(13):
        for dx in range(13):
            expected += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    assert np.abs(blurred - np.rint(expected)).max() <= 1  # rounding of the two summation orders


def test_rotation_angle_and_resized_crop_box_follow_torchvision_ranges():
    rng = random.Random(9)
    angle = rng.uniform(-180, 180)
    rotated = IMAGE.rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0))
    assert np.array_equal(pixels(tf.rotation(IMAGE, random.Random(9))), pixels(rotated))
    width, height = IMAGE.size
    for seed in range(200):  # every crop covers 8%..100% of the area at an aspect in [3/4, 4/3], inside the image
        left, top, w, h = tf.crop_box(width, height, random.Random(seed))
        assert 0.08 * width * height * 0.9 <= w * h <= width * height and 0.7 <= w / h <= 1.4
        assert 0 <= left <= width - w and 0 <= top <= height - h
    left, top, w, h = tf.crop_box(width, height, random.Random(4))
    expected = IMAGE.crop((left, top, left + w, top + h)).resize(IMAGE.size, Image.Resampling.BILINEAR)
    assert np.array_equal(pixels(tf.resized_crop(IMAGE, random.Random(4))), pixels(expected))


def test_color_jitter_applies_four_adjustments_in_a_drawn_order():
    outs = {tuple(pixels(tf.color_jitter(IMAGE, random.Random(s))).ravel()[:30]) for s in range(8)}
    assert len(outs) == 8
    grey = Image.new("RGB", (8, 8), (128, 128, 128))
    jittered = pixels(tf.color_jitter(grey, random.Random(1)))
    assert (jittered == jittered[0, 0]).all()  # a flat image stays flat: only global adjustments
