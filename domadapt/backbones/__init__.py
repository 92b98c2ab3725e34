"""Backbones: torchvision BN classification models by name, `digitnet`, and `timm:<name>`
(optional extra); one module each, registered on import."""

from domadapt.backbones.base import (
    BACKBONES,
    FAMILIES,
    build_backbone,
    check_backbone,
    check_image_size,
    is_backbone,
    register_backbone,
    register_family,
)
from domadapt.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "BACKBONES", "FAMILIES", "build_backbone", "check_backbone", "check_image_size",
    "is_backbone",
    "register_backbone", "register_family",
]
