"""Training methods (source-only, DANN, ...): one module each, registered on import."""

from domadapt.methods.base import (
    METHODS,
    Method,
    Step,
    StepOutput,
    batch_accuracy,
    build_method,
    get_method,
    method_hparams,
    register_method,
)
from domadapt.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "METHODS", "Method", "Step", "StepOutput", "batch_accuracy", "build_method", "get_method",
    "method_hparams", "register_method",
]
