"""The validator contract: what a validator is given (`EvalOutputs`), its declaration
(`Validator`) and the `VALIDATORS` registry (`register_validator`).

A validator scores one evaluation of a model WITHOUT target labels. It is declared once, in
its own module, by decorating the function that computes it:

    @register_validator("entropy", higher_is_better=False,
                        help="mean prediction entropy on the target")
    def val_entropy(ev: EvalOutputs) -> float | None:
        return prediction_entropy(ev.target_logits)

and from that one declaration every evaluation logs its score as the column `val_<name>`
(log.csv and metrics.json, in registry order), `--select <name>` picks each run's evaluation
with the best score (`domadapt.selection`), and the tables, their notes and the CLI's help and
completion name it. A score that cannot be computed for a run is None (an empty cell), never a
made-up value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from numpy.typing import ArrayLike
from torch import Tensor

from domadapt.registry import Registry

__all__ = ["HOLDOUT_HINT", "RULE_NAMES", "VALIDATORS", "EvalOutputs", "Holdout", "Validator", "accuracy",
           "register_validator"]

HOLDOUT_HINT = "train with --source-val-fraction > 0"  # for validators of the source hold-out
RULE_NAMES = ("last", "oracle")  # the selection rules that are no validator (domadapt.selection)
_NAME = re.compile(r"[a-z][a-z0-9_]*")


class Holdout(NamedTuple):
    """The model's outputs on the held-out source split (--source-val-fraction)."""

    logits: Tensor
    features: Tensor
    labels: Tensor


@dataclass(frozen=True)
class EvalOutputs:
    """What one evaluation gives a validator (float32 tensors on the CPU, model in eval mode):
    the logits and bottleneck features of the target images (the result domains pooled), the
    bottleneck features of the source training split (None when not evaluated), the source
    hold-out's outputs (None without --source-val-fraction) and the run's seed."""

    target_logits: Tensor
    target_features: Tensor
    source_features: Tensor | None = None
    holdout: Holdout | None = None
    seed: int = 0


@dataclass(frozen=True)
class Validator:
    """One registered validator (see the module docstring)."""

    name: str  # --select NAME; logged as `column`
    compute: Callable[[EvalOutputs], float | None]
    higher_is_better: bool
    help: str  # what the score is, a noun phrase: "the evaluation with the lowest <help>"
    hint: str = ""  # how to get it recorded where a run could not compute it
    reads_target: bool = True  # False: scores the source hold-out alone (usable in dg)

    @property
    def column(self) -> str:
        return f"val_{self.name}"


VALIDATORS: Registry[Validator] = Registry("validator")


def register_validator(name: str, *, higher_is_better: bool, help: str, hint: str = "",
                       reads_target: bool = True) -> Callable[[Callable[[EvalOutputs], float | None]],
                                     Callable[[EvalOutputs], float | None]]:
    """Decorator: register the function as the validator `name` (a lower-case identifier, not
    `last` or `oracle`; twice: ValueError). The function maps an `EvalOutputs` to a float, or
    None when this run cannot compute it. `reads_target` False declares that it never reads
    the target's outputs (a dg run, whose selection must not see the target, computes only
    those)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"validator name {name!r}: use lower-case letters, digits and _")
    if name in RULE_NAMES:
        raise ValueError(f"validator name {name!r} is the selection rule {name!r}: rename it")

    def add(fn: Callable[[EvalOutputs], float | None]) -> Callable[[EvalOutputs], float | None]:
        VALIDATORS.register(name, Validator(name, fn, higher_is_better, help, hint,
                                            reads_target))
        return fn

    return add


def accuracy(preds: Tensor, labels: Tensor) -> float:
    """Share of `preds` equal to `labels` (NaN without labels)."""
    return float((preds == labels).float().mean()) if len(labels) else float("nan")


def as_2d_float(x: Tensor | ArrayLike, name: str) -> Tensor:
    """`x` as a non-empty [N, K] float tensor (float64 kept), else ValueError naming `name`."""
    t = torch.as_tensor(x).detach()
    if t.dim() != 2 or t.size(0) == 0 or t.size(1) == 0:
        raise ValueError(f"{name}: expected a non-empty [N, K] array, got shape {tuple(t.shape)}")
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
