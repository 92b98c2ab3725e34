"""build_transform: the defaults are the original pipeline; resize mode, interpolation and crop
scale change what they say; bad options end in one line naming the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from domadapt.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    build_transform,
    check_transform_options,
)
from domadapt.errors import UserError

RESIZE, CROP = 32, 28


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A 48 x 30 (w x h) noise image: not square, so the resize modes differ."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(30, 48, 3), dtype=np.uint8), "RGB")


def _normalise(img: Image.Image) -> torch.Tensor:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img))


def _run(transform, img: Image.Image, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(img)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_train_transform_is_the_original_pipeline(image, seed):
    original = T.Compose([T.Resize(RESIZE), T.RandomResizedCrop(CROP, scale=(0.5, 1.0)),
                          T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ours = build_transform(CROP, RESIZE, train=True)
    assert torch.equal(_run(ours, image, seed), _run(original, image, seed))


def test_default_eval_transform_is_the_original_pipeline(image):
    original = T.Compose([T.Resize(RESIZE), T.CenterCrop(CROP), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.equal(build_transform(CROP, RESIZE, train=False)(image), original(image))


def test_shorter_keeps_the_aspect_ratio_and_square_does_not(image):
    # image_size == resize_size: the centre crop shows what the resize produced
    shorter = build_transform(RESIZE, RESIZE, train=False, resize_mode="shorter")(image)
    square = build_transform(RESIZE, RESIZE, train=False, resize_mode="square")(image)
    assert shorter.shape == square.shape == (3, RESIZE, RESIZE)
    # shorter side: 48 x 30 -> 51 x 32; CenterCrop keeps columns round(19 / 2) = 10 .. 41
    wide = image.resize((51, 32), Image.Resampling.BILINEAR)
    assert torch.equal(shorter, _normalise(wide.crop((10, 0, 42, 32))))
    assert torch.equal(square, _normalise(image.resize((32, 32), Image.Resampling.BILINEAR)))


def test_square_bicubic_eval_is_tll_resize_then_centre_crop(image):
    """TLL's ResizeImage(256) is `img.resize((256, 256))`, i.e. Pillow's default filter."""
    ours = build_transform(CROP, RESIZE, train=False, resize_mode="square",
                           interpolation="bicubic")(image)
    tll = T.CenterCrop(CROP)(image.resize((RESIZE, RESIZE)))  # Pillow >= 7: bicubic by default
    assert torch.equal(ours, _normalise(tll))


@pytest.mark.parametrize("seed", [0, 5])
def test_square_train_transform_matches_resize_then_crop(image, seed):
    ours = build_transform(CROP, RESIZE, train=True, resize_mode="square", interpolation="bicubic",
                           crop_scale=(0.08, 1.0))
    tll = T.Compose([T.Lambda(lambda im: im.resize((RESIZE, RESIZE))),
                     T.RandomResizedCrop(CROP, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                     T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.equal(_run(ours, image, seed), _run(tll, image, seed))


@pytest.mark.parametrize("name", sorted(INTERPOLATIONS))
def test_interpolation_is_the_resize_filter(image, name):
    out = build_transform(CROP, RESIZE, train=False, resize_mode="square", interpolation=name)(image)
    pil_filter = getattr(Image.Resampling, name.upper())
    expected = T.CenterCrop(CROP)(image.resize((RESIZE, RESIZE), pil_filter))
    assert torch.equal(out, _normalise(expected))


def test_crop_scale_changes_the_crop(image):
    wide = build_transform(CROP, RESIZE, train=True, flip=False, crop_scale=(0.9, 1.0))
    small = build_transform(CROP, RESIZE, train=True, flip=False, crop_scale=(0.08, 0.1))
    assert not torch.equal(_run(wide, image, 0), _run(small, image, 0))
    crop = next(t for t in small.transforms if isinstance(t, T.RandomResizedCrop))
    assert crop.scale == (0.08, 0.1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"resize_mode": "no-such-mode"}, "unknown --resize-mode 'no-such-mode'; choose from shorter, square"),
    ({"interpolation": "no-such-filter"}, "unknown --interpolation 'no-such-filter'; choose from nearest,"),
    ({"crop_scale": (0.0, 1.0)}, "--crop-scale-min/--crop-scale-max must satisfy 0 < MIN <= MAX <= 1, got 0.0 1.0"),
    ({"crop_scale": (0.5, 1.2)}, "--crop-scale-min/--crop-scale-max must satisfy 0 < MIN <= MAX <= 1, got 0.5 1.2"),
    ({"crop_scale": (0.8, 0.5)}, "--crop-scale-min/--crop-scale-max must satisfy 0 < MIN <= MAX <= 1, got 0.8 0.5"),
    ({"crop_scale": (-0.1, 0.5)}, "--crop-scale-min/--crop-scale-max must satisfy 0 < MIN <= MAX <= 1, got -0.1 0.5"),
    ({"crop_scale": (0.5,)}, "--crop-scale takes two numbers MIN MAX, got (0.5,)"),
    ({"crop_scale": (float("nan"), 1.0)}, "--crop-scale-min/--crop-scale-max must satisfy 0 < MIN <= MAX <= 1"),
])
def test_bad_options_give_one_line_naming_the_option(kwargs, message):
    for call in (lambda: check_transform_options(**kwargs),
                 lambda: build_transform(CROP, RESIZE, train=True, **kwargs)):
        with pytest.raises(UserError) as info:
            call()
        assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_crop_scale_bounds_are_inclusive():
    check_transform_options(crop_scale=(1.0, 1.0))
    check_transform_options(crop_scale=(0.08, 1.0))
