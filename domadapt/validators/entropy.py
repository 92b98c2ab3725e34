"""Mean prediction entropy of the target predictions (lower is better), logged as
`val_entropy`."""

from __future__ import annotations

import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor

from domadapt.nn.losses import entropy_of_log_probs
from domadapt.validators.base import EvalOutputs, as_2d_float, register_validator

__all__ = ["prediction_entropy"]


def prediction_entropy(logits: Tensor | ArrayLike) -> float:
    """Mean Shannon entropy (nats) of the softmax predictions: (1/N) sum_i H(softmax(z_i)),
    H(p) = -sum_k p_k log p_k. Logits [N, K]. Range [0, log K]; lower = more confident.
    """
    log_p = F.log_softmax(as_2d_float(logits, "logits"), dim=1)
    return entropy_of_log_probs(log_p).mean().item()


@register_validator("entropy", higher_is_better=False,
                    help="mean prediction entropy on the target")
def val_entropy(ev: EvalOutputs) -> float:
    return prediction_entropy(ev.target_logits)
