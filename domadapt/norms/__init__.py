"""Normalization kinds (bn, in, bin, ...): one module each, registered on import."""

from domadapt.norms.base import (
    NORMS,
    NormKind,
    SpecialParams,
    convert_norm,
    count_norm_layers,
    get_norm,
    norm_hparams,
    norm_names,
    register_norm,
)
from domadapt.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "NORMS", "NormKind", "SpecialParams", "convert_norm", "count_norm_layers", "get_norm",
    "norm_hparams", "norm_names", "register_norm",
]
