"""MCC and DANN+MCC: the class-confusion loss by hand, the methods' losses, training, resume,
the listing."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from test_cdan import _sections, kill_and_resume_matches, log_rows, tiny_config, write_tiny_tree
from torch import nn

from domadapt.config import make_config
from domadapt.errors import UserError
from domadapt.methods import Step, build_method
from domadapt.methods.dann import DANN
from domadapt.methods.mcc import class_confusion_loss
from domadapt.models import DomainAdaptModel

T = 2.5


def _logits(p: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax at temperature T is p (log 0 = -inf gives exact zeros)."""
    return T * torch.log(torch.tensor(p))


def test_confident_predictions_have_no_confusion():
    one_hot = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert float(class_confusion_loss(_logits(one_hot), T)) == 0.0


def test_uniform_predictions_give_k_minus_1_over_k():
    # C = n/K^2 everywhere, rows normalized to 1/K: L = (K - K * 1/K) / K = (K - 1) / K
    assert float(class_confusion_loss(torch.zeros(6, 4), T)) == pytest.approx(0.75)


def test_entropy_weighting_by_hand():
    """Y = [[1, 0], [.5, .5]]: v = (2, 1.5), normalized to sum 2: (8/7, 6/7).
    C = 8/7 [[1, 0], [0, 0]] + 6/7 [[.25, .25], [.25, .25]] = [[9.5, 1.5], [1.5, 1.5]] / 7,
    row-normalized diagonal (9.5/11, 1/2): L = 1 - (9.5/11 + 1/2) / 2 = 7/22.
    (Unweighted it would be 1 - (5/6 + 1/2) / 2 = 1/3.)"""
    got = float(class_confusion_loss(_logits([[1.0, 0.0], [0.5, 0.5]]), T))
    assert got == pytest.approx(7 / 22, rel=1e-6)
    assert got != pytest.approx(1 / 3, rel=1e-3)


def test_temperature_divides_the_logits():
    """Rows (p, 1-p) and (1-p, p): equal weights, C~ diagonal p^2 + (1-p)^2, L = 2p(1-p)."""
    z = math.log(4) * T
    logits = torch.tensor([[z, 0.0], [0.0, z]])
    assert float(class_confusion_loss(logits, T)) == pytest.approx(2 * 0.8 * 0.2, rel=1e-6)
    p = 4**T / (1 + 4**T)  # at T = 1 the same logits are sharper
    assert float(class_confusion_loss(logits, 1.0)) == pytest.approx(2 * p * (1 - p), rel=1e-5)


def test_gradient_of_the_loss_sharpens_the_predictions():
    torch.manual_seed(0)
    logits = torch.randn(8, 3, requires_grad=True)
    loss = class_confusion_loss(logits, T)
    loss.backward()
    stepped = class_confusion_loss(logits.detach() - 1.0 * logits.grad, T)
    assert float(stepped) < float(loss.detach())


# -- the methods ---------------------------------------------------------------------------------

def _tiny(method: str, **options) -> nn.Module:
    torch.manual_seed(0)
    model = DomainAdaptModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), feature_dim=6,
                             bottleneck_dim=4, num_classes=3)
    extra = {"disc_hidden": 8} if method != "mcc" else {}
    return build_method(method, model, {**extra, **options}, num_classes=3)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(5, 3, 2, 2, generator=g), torch.tensor([0, 1, 2, 0, 1]),
            torch.randn(5, 3, 2, 2, generator=g) + 1)


@torch.no_grad()
def test_mcc_method_is_ce_plus_weighted_confusion_on_the_target():
    method = _tiny("mcc", mcc_weight=0.7, mcc_temperature=2.0)
    x_s, y_s, x_t = _batch()
    out = method(x_s, y_s, x_t, Step(0, 10))
    assert list(out.stats) == ["cls_loss", "mcc_loss", "train_acc"]
    logits, _ = method.model(torch.cat([x_s, x_t]))
    expect = class_confusion_loss(logits[5:], 2.0)
    assert float(out.stats["mcc_loss"]) == pytest.approx(float(expect), rel=1e-6)
    assert float(out.loss) == pytest.approx(
        float(out.stats["cls_loss"]) + 0.7 * float(expect), rel=1e-6)


@torch.no_grad()
def test_dann_mcc_is_dann_plus_weighted_confusion():
    both = _tiny("dann-mcc", mcc_weight=0.5, adv_weight=0.3)
    assert isinstance(both, DANN)
    dann = _tiny("dann", adv_weight=0.3)
    dann.load_state_dict(both.state_dict())
    x_s, y_s, x_t = _batch()
    step = Step(3, 10)
    a, b = dann(x_s, y_s, x_t, step), both(x_s, y_s, x_t, step)
    assert list(b.stats) == [*a.stats, "mcc_loss"]
    for k, v in a.stats.items():
        assert float(b.stats[k]) == pytest.approx(float(v), rel=1e-6), k
    logits, _ = both.model(torch.cat([x_s, x_t]))
    mcc = float(class_confusion_loss(logits[5:], T))
    assert float(b.stats["mcc_loss"]) == pytest.approx(mcc, rel=1e-6)
    assert float(b.loss) == pytest.approx(float(a.loss) + 0.5 * mcc, rel=1e-6)
    assert not both.model._forward_hooks  # the hook that reads the logits is gone


@pytest.mark.parametrize("method,change,expect", [
    ("mcc", {"mcc_temperature": 0.0}, "--mcc-temperature must be positive"),
    ("mcc", {"mcc_weight": -1.0}, "--mcc-weight must be >= 0"),
    ("dann-mcc", {"mcc_temperature": -2.5}, "--mcc-temperature must be positive"),
    ("dann-mcc", {"adv_weight": -1.0}, "--adv-weight must be >= 0"),
])
def test_bad_options_are_one_line_errors(method, change, expect):
    with pytest.raises(UserError, match=expect):
        make_config(method=method, source="a", target="b", **change)


# -- training end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_tree(tmp_path_factory.mktemp("tiny") / "data")


@pytest.mark.parametrize("method,stats", [
    ("mcc", ["cls_loss", "mcc_loss", "train_acc"]),
    ("dann-mcc", ["cls_loss", "domain_loss", "disc_acc", "train_acc", "grl_coeff", "mcc_loss"]),
])
def test_train_logs_the_stats_and_resumes_bit_identically(tiny_tree, tmp_path, monkeypatch,
                                                          method, stats):
    kill_and_resume_matches(tiny_config(tiny_tree, method), tmp_path, monkeypatch)
    with open(tmp_path / "straight" / "log.csv") as f:
        header = next(csv.reader(f))
    assert header[:len(stats) + 1] == ["iter", *stats]
    rows = log_rows(tmp_path / "straight")
    assert [int(r["iter"]) for r in rows] == [2, 4]
    assert all(0 < float(r["mcc_loss"]) < 1 for r in rows)


def test_methods_listing_names_mcc_and_its_options(run_cli):
    code, out, err = run_cli("methods")
    assert code == 0, err
    sections = _sections(out)
    assert sections["mcc"] == {"--mcc-temperature", "--mcc-weight"}
    assert sections["dann-mcc"] == {"--adv-weight", "--disc-hidden", "--grl-schedule",
                                    "--grl-alpha", "--grl-warmup", "--mcc-temperature",
                                    "--mcc-weight"}
    assert "default 2.5" in out
