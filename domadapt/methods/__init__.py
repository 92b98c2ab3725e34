"""Training methods: each is an `nn.Module` that owns the model (and any extra heads) and whose
`forward(x_s, y_s, x_t, p)` computes one iteration's loss.

Owning the model lets the trainer wrap a single module in DistributedDataParallel, so the
gradients of the model and of the discriminator are synchronized together.
"""

from __future__ import annotations

from domadapt.config import RunConfig
from domadapt.methods.dann import DANN
from domadapt.methods.source_only import SourceOnly, StepOutput
from domadapt.models import DomainAdaptModel

__all__ = ["DANN", "SourceOnly", "StepOutput", "build_method"]


def build_method(cfg: RunConfig, model: DomainAdaptModel) -> SourceOnly | DANN:
    """The method of `cfg` around `model`."""
    if cfg.method == "source-only":
        return SourceOnly(model)
    if cfg.method == "dann":
        return DANN(model, disc_hidden=cfg.disc_hidden, adv_weight=cfg.adv_weight)
    raise ValueError(f"no method {cfg.method!r}")  # RunConfig validates; unreachable

