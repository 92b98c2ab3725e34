"""MCD (Saito et al., CVPR 2018): the discrepancy, what each of the three steps trains and with
which sign, the optimizers' learning-rate rules, training, resume, the listing."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from test_cdan import _sections, kill_and_resume_matches, tiny_config, write_tiny_tree
from torch import nn

from domadapt import engine
from domadapt.config import make_config
from domadapt.distributed import DistContext
from domadapt.errors import UserError
from domadapt.methods import build_method
from domadapt.methods.mcd import classifier_discrepancy
from domadapt.models import DomainAdaptModel
from domadapt.rundir import RunDir
from domadapt.settings import build_data, resolve_config


def test_discrepancy_by_hand():
    z = torch.randn(4, 3)
    assert float(classifier_discrepancy(z, z)) == 0.0
    # p1 = (1, 0), p2 = (1/2, 1/2): |diff| = (1/2, 1/2), mean 1/2
    z1 = torch.tensor([[0.0, -float("inf")]])
    assert float(classifier_discrepancy(z1, torch.zeros(1, 2))) == pytest.approx(0.5)


def _tiny(mcd_steps: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = DomainAdaptModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), feature_dim=6,
                             bottleneck_dim=4, num_classes=3)
    return build_method("mcd", model, {"mcd_steps": mcd_steps}, num_classes=3)


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(5, 3, 2, 2, generator=g), torch.tensor([0, 1, 2, 0, 1]),
            torch.randn(5, 3, 2, 2, generator=g) + 1)


def _sgd(*, backbone=(), heads=()):
    params = [p for m in (*backbone, *heads) for p in m.parameters()]
    return torch.optim.SGD(params, lr=0.5)


class Recorder:
    """A StepFn: plain SGD steps, and a record of (names, loss value, grads of each param)."""

    def __init__(self, method: nn.Module) -> None:
        self.method = method
        self.optimizers = method.build_optimizers(_sgd)
        self.calls: list[tuple[tuple[str, ...], float]] = []

    def __call__(self, names, loss: torch.Tensor) -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        self.calls.append((names, float(loss.detach())))
        for n in names:
            self.optimizers[n].zero_grad(set_to_none=True)
        loss.backward()
        for n in names:
            self.optimizers[n].step()


def _params(method: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.named_parameters()}


def _changed(before: dict, method: nn.Module) -> set[str]:
    groups = {"model.backbone": "G", "model.bottleneck": "G", "model.classifier": "F1",
              "classifier2": "F2"}
    out = set()
    for n, p in method.named_parameters():
        if not torch.equal(before[n], p.detach()):
            out.add(next(v for k, v in groups.items() if n.startswith(k)))
    return out


def test_optimizers_split_generator_and_classifiers():
    method = _tiny()
    opts = method.build_optimizers(_sgd)
    ids = {k: {id(p) for g in o.param_groups for p in g["params"]} for k, o in opts.items()}
    gen = {id(p) for m in (method.model.backbone, method.model.bottleneck) for p in m.parameters()}
    cls = {id(p) for m in (method.model.classifier, method.classifier2) for p in m.parameters()}
    assert ids == {"generator": gen, "classifiers": cls}


def test_each_step_trains_what_the_paper_says_with_its_sign():
    method = _tiny()
    x_s, y_s, x_t = _batch()
    opt = Recorder(method)
    n = y_s.shape[0]

    before = _params(method)
    method.step_a(x_s, y_s, x_t, opt)
    assert _changed(before, method) == {"G", "F1", "F2"}
    assert opt.calls[-1][0] == ("generator", "classifiers")

    # B: loss = CE1 + CE2 - d on the target; G untouched
    method.eval()  # fixed BN statistics: the hand computation sees the same features
    f = method.model.bottleneck(method.model.backbone(torch.cat([x_s, x_t])))
    z1, z2 = method.model.classifier(f), method.classifier2(f)
    ce = F.cross_entropy(z1[:n], y_s) + F.cross_entropy(z2[:n], y_s)
    d = classifier_discrepancy(z1[n:], z2[n:])
    before = _params(method)
    d_b = method.step_b(x_s, y_s, x_t, opt)
    assert opt.calls[-1] == (("classifiers",), pytest.approx(float((ce - d).detach()), rel=1e-5))
    d = float(d.detach())
    assert float(d_b) == pytest.approx(d, rel=1e-5) and d > 0
    assert _changed(before, method) == {"F1", "F2"}

    # C: loss = d; only G moves, and d on the same batch goes down
    before = _params(method)
    d_c = method.step_c(x_s, x_t, opt)
    assert opt.calls[-1][0] == ("generator",)
    assert _changed(before, method) == {"G"}
    after = method.step_c(x_s, x_t, opt)
    assert float(after) < float(d_c)


def test_step_b_raises_the_discrepancy_its_loss_subtracts():
    """With the source terms removed, B's gradient step on F1, F2 increases d on the target."""
    method = _tiny().eval()
    x_s, y_s, x_t = _batch()
    opt = Recorder(method)
    method.source_loss = lambda f, y: (torch.zeros(()), method.model.classifier(f),
                                       method.classifier2(f))
    d0 = method.step_b(x_s, y_s, x_t, opt)
    d1 = method.step_b(x_s, y_s, x_t, opt)
    assert float(d1) > float(d0)


def test_update_runs_a_b_and_n_c_steps():
    method = _tiny(mcd_steps=3)
    x_s, y_s, x_t = _batch()
    opt = Recorder(method)
    stats = method.update(x_s, y_s, x_t, engine.Step(0, 10), opt)
    assert [c[0] for c in opt.calls] == [("generator", "classifiers"), ("classifiers",),
                                         ("generator",), ("generator",), ("generator",)]
    assert set(stats) == {"cls_loss", "train_acc", "discrepancy_max", "discrepancy"}
    assert float(stats["discrepancy"]) == pytest.approx(sum(c[1] for c in opt.calls[2:]) / 3)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return write_tiny_tree(tmp_path_factory.mktemp("tiny") / "data")


def test_every_optimizer_follows_the_run_rules(tiny_tree, tmp_path):
    """BIN gates: own group at gate_lr_mult x lr0, no weight decay, clamped after every step,
    in the generator's optimizer; every optimizer's lr follows the schedule."""
    cfg = resolve_config(tiny_config(tiny_tree, "mcd", mcd_steps=2))
    trainer = engine.Trainer(cfg, build_data(cfg), RunDir(tmp_path / "r"),
                             DistContext(torch.device("cpu")), quiet=True)
    groups = {k: {g["name"]: g for g in o.param_groups} for k, o in trainer.optimizers.items()}
    assert set(groups["generator"]) == {"backbone", "backbone/gate", "heads"}
    assert set(groups["classifiers"]) == {"heads"}
    gate = groups["generator"]["backbone/gate"]
    assert gate["weight_decay"] == 0.0 and gate["clamp"] == (0.0, 1.0)
    assert gate["lr_mult"] == cfg.norm_hparams.gate_lr_mult
    with torch.no_grad():
        for p in gate["params"]:
            p.fill_(5.0)  # outside [0, 1]: only the clamp after the step brings it back
    trainer.run_step()
    trainer.run_step()  # iteration 1: lr0 x the schedule's factor < lr0
    assert all(float(p.detach().min()) >= 0 and float(p.detach().max()) <= 1 for p in gate["params"])
    for opt in trainer.optimizers.values():
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(trainer.lrs["heads"] * g["lr_mult"])
    assert trainer.lrs["heads"] < cfg.lr  # the schedule moved on after iteration 0


def test_train_logs_the_stats_and_resumes_bit_identically(tiny_tree, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_tree, "mcd", mcd_steps=2)
    ckpt = kill_and_resume_matches(cfg, tmp_path, monkeypatch)
    assert set(ckpt["optimizers"]) == {"generator", "classifiers"}
    assert any(k.startswith("classifier2.") for k in ckpt["method"])
    assert all(s["state"] for s in ckpt["optimizers"].values())  # momentum buffers saved
    with open(tmp_path / "straight" / "log.csv") as f:
        header = next(csv.reader(f))
    assert header[:5] == ["iter", "cls_loss", "train_acc", "discrepancy_max", "discrepancy"]
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["discrepancy"] >= 0


def test_bad_option_is_a_one_line_error():
    with pytest.raises(UserError, match="--mcd-steps must be positive"):
        make_config(method="mcd", source="a", target="b", mcd_steps=0)


def test_methods_listing_names_mcd(run_cli):
    code, out, err = run_cli("methods")
    assert code == 0, err
    assert _sections(out)["mcd"] == {"--mcd-steps"}
