"""Learning-rate and gradient-reversal schedules, in the two forms found in the literature.

"progress" (Ganin et al., JMLR 2016, Sec. 5.2.2): a function of p = iteration / total in [0, 1],
so stretching a run stretches the schedule:

    lr_factor(p) = (1 + gamma p)^(-decay)              (gamma = 10, decay = 0.75)
    lambda(p)    = 2 / (1 + exp(-alpha p)) - 1          (alpha = 10)

"iteration" (Transfer-Learning-Library: LambdaLR in examples/.../dann.py, and
WarmStartGradientReverseLayer(alpha=1, lo=0, hi=1, max_iters=1000) in tllib/modules/grl.py):
a function of the iteration i alone, whatever the length of the run:

    lr_factor(i) = (1 + gamma i)^(-decay)              (gamma = 0.001, decay = 0.75)
    lambda(i)    = 2 / (1 + exp(-i / warmup)) - 1       (warmup = 1000)

Both factors start at 1 (lr) and 0 (lambda) at iteration 0. The progress form computes
p = iteration / total as a Python float and then evaluates the same expressions, in the same
order, as `domadapt.nn.optim.lr_factor` and `domadapt.nn.grl.grl_coefficient`, so the floats
are identical to theirs.
"""

from __future__ import annotations

import math
from typing import Literal

from domadapt.errors import UserError

__all__ = ["SCHEDULE_FORMS", "ScheduleForm", "check_schedule_options", "grl_coefficient",
           "lr_factor"]

ScheduleForm = Literal["progress", "iteration"]
SCHEDULE_FORMS: tuple[str, ...] = ("progress", "iteration")


def _x(iteration: int, total: int, form: str) -> float:
    """The schedule's abscissa: p = iteration / total ("progress") or iteration ("iteration")."""
    if form == "progress":
        return iteration / total
    if form == "iteration":
        return float(iteration)
    raise ValueError(f"unknown schedule form {form!r}; choose from {', '.join(SCHEDULE_FORMS)}")


def lr_factor(iteration: int, total: int, *, form: str = "progress", gamma: float = 10.0,
              decay: float = 0.75) -> float:
    """Learning-rate factor (1 + gamma x)^(-decay), x = iteration / total or x = iteration.

    The learning rate of a group is lr0 * lr_mult * lr_factor(...). With form "iteration",
    `total` is ignored: the value at iteration i does not depend on the run's length.
    """
    return (1.0 + gamma * _x(iteration, total, form)) ** (-decay)


def grl_coefficient(iteration: int, total: int, *, form: str = "progress", alpha: float = 10.0,
                    warmup: float = 1000.0) -> float:
    """Gradient-reversal coefficient lambda in [0, 1).

    progress:  2 / (1 + exp(-alpha p)) - 1, p = iteration / total (`warmup` unused).
    iteration: 2 / (1 + exp(-iteration / warmup)) - 1 (`alpha`, `total` unused); this is TLL's
               WarmStartGradientReverseLayer with hi = 1, lo = 0, alpha = 1, max_iters = warmup.
    """
    if form == "iteration":
        return 2.0 / (1.0 + math.exp(-iteration / warmup)) - 1.0
    return 2.0 / (1.0 + math.exp(-alpha * _x(iteration, total, form))) - 1.0


def check_schedule_options(
    *,
    lr_schedule: str = "progress",
    lr_gamma: float = 10.0,
    lr_decay: float = 0.75,
    grl_schedule: str = "progress",
    grl_alpha: float = 10.0,
    grl_warmup: float = 1000.0,
) -> None:
    """Raise UserError with one line naming the first option out of range.

    Forms must be one of SCHEDULE_FORMS; --lr-gamma, --lr-decay and --grl-alpha must be finite
    and >= 0; --grl-warmup must be finite and positive.
    """
    for option, value in (("--lr-schedule", lr_schedule), ("--grl-schedule", grl_schedule)):
        if value not in SCHEDULE_FORMS:
            raise UserError(f"unknown {option} {value!r}; choose from {', '.join(SCHEDULE_FORMS)}")
    for option, number in (("--lr-gamma", lr_gamma), ("--lr-decay", lr_decay),
                           ("--grl-alpha", grl_alpha)):
        if not (math.isfinite(number) and number >= 0):
            raise UserError(f"{option} must be a finite number >= 0, got {number}")
    if not (math.isfinite(grl_warmup) and grl_warmup > 0):
        raise UserError(f"--grl-warmup must be positive, got {grl_warmup}")
