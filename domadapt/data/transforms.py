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


def build_transform(
    image_size: int,
    resize_size: int,
    train: bool,
    *,
    flip: bool = True,
    crop_scale: tuple[float, float] = (0.5, 1.0),
) -> Transform:
    """PIL image -> normalised CHW float tensor.

    train: Resize(resize_size) (shorter side) -> RandomResizedCrop(image_size, crop_scale)
           -> RandomHorizontalFlip (only if `flip`; pass `spec.hflip`) -> ImageNet normalisation.
    eval:  Resize(resize_size) -> CenterCrop(image_size) -> ImageNet normalisation.
    Randomness comes from torch's global generator; `DomainDataset` seeds it per sample.
    """
    if not 0 < image_size <= resize_size:
        raise UserError(
            f"image size {image_size} must be positive and at most the resize size {resize_size}"
        )
    steps: list[Callable] = [T.Resize(resize_size)]
    if train:
        steps.append(T.RandomResizedCrop(image_size, scale=crop_scale))
        if flip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps.append(T.CenterCrop(image_size))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
