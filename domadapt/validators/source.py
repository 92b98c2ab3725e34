"""Accuracy on the held-out source split (higher is better), logged as `val_source`; None
without a hold-out (--source-val-fraction)."""

from __future__ import annotations

from domadapt.validators.base import HOLDOUT_HINT, EvalOutputs, accuracy, register_validator


@register_validator("source", higher_is_better=True,
                    help="accuracy on the held-out source split", hint=HOLDOUT_HINT,
                    reads_target=False)
def val_source(ev: EvalOutputs) -> float | None:
    if ev.holdout is None:
        return None
    return accuracy(ev.holdout.logits.argmax(1), ev.holdout.labels)
