"""Schedules: the progress form is bit-identical to the old functions; the iteration form
follows Transfer-Learning-Library's formulas and does not depend on the run's length."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from domadapt.errors import UserError
from domadapt.schedules import check_schedule_options, grl_coefficient, lr_factor


def old_lr_factor(p: float, gamma: float = 10.0, decay: float = 0.75) -> float:
    """The first release's schedule (nn/optim.py), kept here as the bit-for-bit reference."""
    return (1.0 + gamma * p) ** (-decay)


def old_grl_coefficient(p: float, alpha: float = 10.0) -> float:
    """The first release's GRL coefficient (nn/grl.py), the bit-for-bit reference."""
    return 2.0 / (1.0 + math.exp(-alpha * p)) - 1.0

TOTALS = (1, 7, 300, 5000, 30000)


@pytest.mark.parametrize("total", TOTALS)
@pytest.mark.parametrize(("gamma", "decay", "alpha"), [(10.0, 0.75, 10.0), (3.0, 0.5, 5.0)])
def test_progress_form_equals_old_functions_bit_for_bit(total, gamma, decay, alpha):
    for i in range(total + 1):
        p = i / total
        assert lr_factor(i, total, form="progress", gamma=gamma, decay=decay) == \
            old_lr_factor(p, gamma, decay)
        assert grl_coefficient(i, total, form="progress", alpha=alpha) == \
            old_grl_coefficient(p, alpha)


def test_defaults_are_the_progress_form_of_ganin():
    assert lr_factor(2500, 5000) == old_lr_factor(0.5, 10.0, 0.75)
    assert grl_coefficient(2500, 5000) == old_grl_coefficient(0.5, 10.0)


@pytest.mark.parametrize(("i", "expected"), [
    (0, 1.0),
    (1, 1.001 ** -0.75),
    (1000, 2.0 ** -0.75),          # 0.5946...
    (9000, 10.0 ** -0.75),         # 0.1778...
    (29999, 30.999 ** -0.75),
])
def test_tll_lr_factor_at_iterations(i, expected):
    got = lr_factor(i, 30000, form="iteration", gamma=0.001, decay=0.75)
    assert got == pytest.approx(expected, rel=1e-15)
    # TLL's LambdaLR: lr0 * (1. + lr_gamma * float(x)) ** (-lr_decay), times the group's
    # initial lr (0.1 backbone, 1.0 heads); ours: (lr0 * factor) * lr_mult. Same floats.
    tll = 0.1 * (0.01 * (1.0 + 0.001 * float(i)) ** (-0.75))
    assert (0.01 * got) * 0.1 == tll


@pytest.mark.parametrize("i", [0, 1, 500, 1000, 2000, 5000, 29999])
def test_tll_grl_coefficient_at_iterations(i):
    got = grl_coefficient(i, 30000, form="iteration", warmup=1000.0)
    hi, lo, alpha, max_iters = 1.0, 0.0, 1.0, 1000.0  # DomainAdversarialLoss's defaults
    tll = float(2.0 * (hi - lo) / (1.0 + np.exp(-alpha * i / max_iters)) - (hi - lo) + lo)
    assert got == pytest.approx(tll, rel=1e-14, abs=1e-16)
    assert got == 2.0 / (1.0 + math.exp(-i / 1000.0)) - 1.0


def test_known_values():
    assert grl_coefficient(0, 10, form="iteration") == 0.0
    assert grl_coefficient(1000, 10, form="iteration") == pytest.approx(0.46211715726, rel=1e-10)
    assert grl_coefficient(5000, 5000, form="progress") == pytest.approx(0.99990920, rel=1e-7)
    assert lr_factor(5000, 5000, form="progress") == pytest.approx(11.0 ** -0.75, rel=1e-15)


@pytest.mark.parametrize("i", [0, 3, 999, 4000])
def test_iteration_form_does_not_depend_on_total(i):
    a = [f(i, 5000, form="iteration") for f in (lr_factor, grl_coefficient)]
    b = [f(i, 30000, form="iteration") for f in (lr_factor, grl_coefficient)]
    assert a == b
    # ... whereas the progress form does
    assert lr_factor(4000, 5000) != lr_factor(4000, 30000)


def test_schedules_are_monotone():
    for form in ("progress", "iteration"):
        lrs = [lr_factor(i, 100, form=form) for i in range(101)]
        assert lrs[0] == 1.0 and all(a > b for a, b in itertools.pairwise(lrs))
    grl = [grl_coefficient(i, 100, form="iteration", warmup=10.0) for i in range(101)]
    assert grl[0] == 0.0 and all(a < b for a, b in itertools.pairwise(grl)) and grl[-1] < 1.0


def test_unknown_form_in_library_call():
    with pytest.raises(ValueError, match="schedule form"):
        lr_factor(1, 10, form="no-such-form")
    with pytest.raises(ValueError, match="schedule form"):
        grl_coefficient(1, 10, form="no-such-form")


def test_check_schedule_options_accepts_both_recipes():
    check_schedule_options()
    check_schedule_options(lr_schedule="iteration", lr_gamma=0.001, lr_decay=0.75,
                           grl_schedule="iteration", grl_warmup=1000)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"grl_warmup": -5}, "--grl-warmup must be positive, got -5"),
    ({"grl_warmup": 0}, "--grl-warmup must be positive, got 0"),
    ({"grl_warmup": math.inf}, "--grl-warmup must be positive, got inf"),
    ({"lr_schedule": "no-such-form"}, "unknown --lr-schedule 'no-such-form'; choose from progress, iteration"),
    ({"grl_schedule": "no-such-form"}, "unknown --grl-schedule 'no-such-form'"),
    ({"lr_gamma": -0.001}, "--lr-gamma must be a finite number >= 0, got -0.001"),
    ({"lr_decay": math.nan}, "--lr-decay must be a finite number >= 0, got nan"),
    ({"grl_alpha": -1.0}, "--grl-alpha must be a finite number >= 0, got -1.0"),
])
def test_check_schedule_options_names_the_option(kwargs, message):
    with pytest.raises(UserError) as info:
        check_schedule_options(**kwargs)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
