"""MCC (Jin et al., ECCV 2020, "Minimum Class Confusion for Versatile Domain Adaptation").

On the target predictions Y = softmax(C(f_t) / T) [B, K] (temperature T):

    v_i   = 1 + exp(-H(Y_i)),  W = diag(B v / sum(v))      (confident samples count more)
    C     = Y^T W Y                                        (class confusion, [K, K])
    C~_jk = C_jk / sum_k' C_jk'                            (category normalization: rows sum to 1)
    L_mcc = (sum_jk C~_jk - trace(C~)) / K  =  1 - trace(C~) / K

L_mcc is 0 when every prediction is one-hot (C diagonal) and (K - 1) / K when all are uniform;
scaling W changes nothing (row normalization), only the weights' ratios matter. As in
Transfer-Learning-Library, v is a constant (no gradient through the entropy).

Two methods: "mcc" (L = CE + mcc_weight * L_mcc) and "dann-mcc" (DANN's loss + mcc_weight * L_mcc).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from domadapt.distributions import LogUniform
from domadapt.errors import UserError
from domadapt.methods.base import (
    Method,
    Step,
    StepOutput,
    batch_accuracy,
    register_method,
    supervised_loss,
)
from domadapt.methods.dann import DANN, AdversarialHparams
from domadapt.nn.domains import concat_domains
from domadapt.nn.losses import certainty_weights
from domadapt.registry import hparam


@dataclass(frozen=True)
class MCCHparams:
    mcc_temperature: float = hparam(2.5, "MCC: temperature T of the target softmax")
    mcc_weight: float = hparam(1.0, "MCC: weight of the minimum-class-confusion loss",
                               search=LogUniform(0.1, 10.0))

    def __post_init__(self) -> None:
        if not self.mcc_temperature > 0:
            raise UserError(f"--mcc-temperature must be positive, got {self.mcc_temperature}")
        if not self.mcc_weight >= 0:
            raise UserError(f"--mcc-weight must be >= 0, got {self.mcc_weight}")


@dataclass(frozen=True)
class DannMCCHparams(MCCHparams, AdversarialHparams):
    """DANN's options and MCC's."""

    def __post_init__(self) -> None:
        AdversarialHparams.__post_init__(self)
        MCCHparams.__post_init__(self)


def class_confusion_loss(logits: Tensor, temperature: float = 2.5) -> Tensor:
    """L_mcc of target logits [B, K] (module docstring), in float32."""
    y = F.softmax(logits.float() / temperature, dim=1)
    v = certainty_weights(y)
    v = (v * (y.shape[0] / v.sum())).unsqueeze(1)
    confusion = (y * v).T @ y
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return 1.0 - torch.trace(confusion) / y.shape[1]


@register_method
class MCC(Method):
    """CE on the source + mcc_weight * L_mcc on the target. Source and target are forwarded
    concatenated (as in DANN: BN/BIN statistics of the mixed batch, the ones used at test time)."""

    name = "mcc"
    help = "minimum class confusion on the target predictions (Jin et al.)"
    Hparams = MCCHparams
    uses_target = True

    def forward(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None, step: Step) -> StepOutput:
        if x_t is None:
            raise ValueError("MCC needs a target batch")
        n_s = x_s.shape[0]
        logits, _ = self.model(*concat_domains(x_s, x_t))
        logits_s = logits[:n_s]
        cls_loss = supervised_loss(logits_s, y_s)
        mcc_loss = class_confusion_loss(logits[n_s:], self.hp.mcc_temperature)
        stats = {"cls_loss": cls_loss.detach(), "mcc_loss": mcc_loss.detach(),
                 "train_acc": batch_accuracy(logits_s.detach(), y_s)}
        return StepOutput(cls_loss + self.hp.mcc_weight * mcc_loss, stats)


@register_method
class DannMCC(DANN):
    """DANN + mcc_weight * L_mcc on the target logits of DANN's own (single, concatenated)
    forward pass, read with a forward hook so that DANN's loss is exactly DANN's."""

    name = "dann-mcc"
    help = "DANN plus the minimum-class-confusion loss on the target (Jin et al.)"
    Hparams = DannMCCHparams

    def forward(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None, step: Step) -> StepOutput:
        seen: list[tuple[Tensor, Tensor]] = []
        handle = self.model.register_forward_hook(lambda _m, _args, out: seen.append(out))
        try:
            loss, stats = super().forward(x_s, y_s, x_t, step)
        finally:
            handle.remove()
        ((logits, _),) = seen  # DANN forwards source + target once, concatenated
        mcc_loss = class_confusion_loss(logits[x_s.shape[0]:], self.hp.mcc_temperature)
        return StepOutput(loss + self.hp.mcc_weight * mcc_loss,
                          {**stats, "mcc_loss": mcc_loss.detach()})
