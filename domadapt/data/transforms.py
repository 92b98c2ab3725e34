"""Image transforms: train-time augmentation and the deterministic eval pipeline."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from domadapt.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


RESIZE_MODES = ("shorter", "square")
INTERPOLATIONS: dict[str, T.InterpolationMode] = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "box": T.InterpolationMode.BOX,
    "hamming": T.InterpolationMode.HAMMING,
    "lanczos": T.InterpolationMode.LANCZOS,
}


def check_transform_options(
    resize_mode: str = "shorter",
    interpolation: str = "bilinear",
    crop_scale: tuple[float, float] = (0.5, 1.0),
) -> None:
    """Raise UserError with one line naming the first option out of range."""
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"unknown --resize-mode {resize_mode!r}; choose from {', '.join(RESIZE_MODES)}")
    if interpolation not in INTERPOLATIONS:
        raise UserError(
            f"unknown --interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}"
        )
    try:
        low, high = (float(v) for v in crop_scale)
    except (TypeError, ValueError):
        raise UserError(f"--crop-scale takes two numbers MIN MAX, got {crop_scale!r}") from None
    if not 0.0 < low <= high <= 1.0:
        raise UserError(f"--crop-scale-min/--crop-scale-max must satisfy 0 < MIN <= MAX <= 1, "
                        f"got {low} {high}")


def build_transform(
    image_size: int,
    resize_size: int,
    train: bool,
    *,
    flip: bool = True,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    resize_mode: str = "shorter",
    interpolation: str = "bilinear",
) -> Transform:
    """PIL image -> normalised CHW float tensor.

    train: resize -> RandomResizedCrop(image_size, crop_scale, bilinear) -> RandomHorizontalFlip
           (only if `flip`; pass `spec.hflip`) -> ImageNet normalisation.
    eval:  resize -> CenterCrop(image_size) -> ImageNet normalisation.
    resize: "shorter" scales the shorter side to `resize_size`, keeping the aspect ratio;
            "square" scales to resize_size x resize_size, not keeping it (Transfer-Learning-
            Library's ResizeImage). `interpolation` is the filter of this step only; the random
            crop always resamples bilinearly (torchvision's default, also TLL's).
    The defaults are the original pipeline. Randomness comes from torch's global generator;
    `DomainDataset` seeds it per sample.
    """
    check_transform_options(resize_mode, interpolation, crop_scale)
    if not 0 < image_size <= resize_size:
        raise UserError(
            f"image size {image_size} must be positive and at most the resize size {resize_size}"
        )
    size = resize_size if resize_mode == "shorter" else (resize_size, resize_size)
    steps: list[Callable] = [T.Resize(size, interpolation=INTERPOLATIONS[interpolation])]
    if train:
        steps.append(T.RandomResizedCrop(image_size, scale=tuple(float(v) for v in crop_scale)))
        if flip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps.append(T.CenterCrop(image_size))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
