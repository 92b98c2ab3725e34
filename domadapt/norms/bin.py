"""Batch-Instance Normalization as a norm kind (Nam & Kim, NeurIPS 2018).

    y = (rho * BN(x) + (1 - rho) * IN(x)) * gamma + beta,   rho in [0, 1] per channel, init 1

The gates rho are the kind's special parameters: no weight decay, clamped to [0, 1] after every
optimizer step, and trained at a higher learning rate (official code: `lr * bin_lr`, bin_lr = 10,
the base learning rate whatever layer the gate sits in: `gate_lr_rule base`). `gate_lr_rule
layer` instead multiplies the learning rate of the layer the gate sits in (backbone 0.1x ->
gates 1x lr0), a defensible reading for fine-tuning a pretrained backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import nn

from domadapt.distributions import LogUniform
from domadapt.errors import UserError
from domadapt.nn.bin import (
    GATE_LOW,
    BatchInstanceNorm2d,
    gate_fraction_below,
    mean_gate,
)
from domadapt.norms.base import NormKind, SpecialParams, all_params, register_norm
from domadapt.registry import hparam

GATE_LR_RULES = ("base", "layer")


@dataclass(frozen=True)
class BINHparams:
    gate_lr_mult: float = hparam(10.0, "BIN gates: learning-rate multiplier (see --gate-lr-rule)",
                                 search=LogUniform(1.0, 100.0))
    gate_lr_rule: str = hparam(
        "base", "BIN gates' lr: base = gate-lr-mult x lr0 (official BIN code); layer = "
        "gate-lr-mult x the lr of the layer they sit in", choices=GATE_LR_RULES)

    def __post_init__(self) -> None:
        if self.gate_lr_mult < 0:
            raise UserError(f"--gate-lr-mult must be >= 0, got {self.gate_lr_mult}")


@register_norm
class BatchInstanceNorm(NormKind):
    name = "bin"
    layer_type = BatchInstanceNorm2d
    Hparams = BINHparams
    help = "Batch-Instance Normalization (gates rho = 1 at the start)"
    plot_marker, plot_shade = "s", 0.9

    def special_params(self, model: nn.Module, hp: Any) -> SpecialParams:
        return SpecialParams("gate", all_params([model], BatchInstanceNorm2d, "rho"),
                             lr_mult=hp.gate_lr_mult, relative=hp.gate_lr_rule == "layer",
                             clamp=(0.0, 1.0))

    def diagnostics(self, model: nn.Module) -> dict[str, float | None]:
        return {"mean_gate": mean_gate(model),
                f"gate_frac_below_{GATE_LOW}": gate_fraction_below(model)}

    def diagnostic_names(self) -> tuple[str, ...]:
        return ("mean_gate", f"gate_frac_below_{GATE_LOW}")

    def records(self, model: nn.Module) -> dict[str, pd.DataFrame]:
        from domadapt.norms.gates import RECORD, gate_summary

        return {RECORD: gate_summary(model)}
