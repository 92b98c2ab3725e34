"""Parameter groups of the norms' special parameters (BIN gates): learning-rate rules, no weight
decay, the clamp after every step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domadapt.nn import attach_clamp, build_sgd, param_groups, set_lr
from domadapt.norms import convert_norm, get_norm, norm_hparams


def tiny_bin_net() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    backbone = convert_norm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten()), "bin")
    head = nn.Linear(8, 3)
    return backbone, head


def gates_of(*modules: nn.Module, rule: str = "base", mult: float = 10.0):
    """The BIN kind's special parameters of `modules` under `rule`."""
    wrapper = nn.ModuleList(modules)
    hp = norm_hparams("bin", {"gate_lr_rule": rule, "gate_lr_mult": mult})
    return get_norm("bin").special_params(wrapper, hp)


@pytest.mark.parametrize(("rule", "backbone_gate_mult"), [("base", 10.0), ("layer", 1.0)])
def test_gate_groups_follow_the_rule(rule: str, backbone_gate_mult: float) -> None:
    """base: gates at 10 x lr0 wherever they sit (official BIN code: lr * bin_lr); layer:
    10 x the lr of their layer (backbone 0.1 x lr0 -> 1 x lr0). No weight decay, clamped."""
    backbone, head = tiny_bin_net()
    head_with_gate = convert_norm(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)), "bin")
    backbone[0].bias.requires_grad_(False)
    special = gates_of(backbone, head_with_gate, rule=rule)
    groups = param_groups(backbone, [head, head_with_gate], lr=0.01, weight_decay=1e-3,
                          special=special)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["backbone", "backbone/gate", "heads", "heads/gate"]
    assert by_name["backbone/gate"]["params"] == [backbone[1].rho]
    assert by_name["heads/gate"]["params"] == [head_with_gate[1].rho]
    expected = {"backbone": (0.1, 1e-3), "backbone/gate": (backbone_gate_mult, 0.0),
                "heads": (1.0, 1e-3), "heads/gate": (10.0, 0.0)}
    for name, (mult, wd) in expected.items():
        g = by_name[name]
        assert g["lr_mult"] == pytest.approx(mult) and g["lr"] == pytest.approx(0.01 * mult)
        assert g["weight_decay"] == wd
        assert ("clamp" in g) == name.endswith("gate")
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [p for m in (backbone, head, head_with_gate) for p in m.parameters()
                 if p.requires_grad]
    assert sorted(listed) == sorted(id(p) for p in trainable)  # each trainable param once


def test_gate_lr_is_annealed_with_the_schedule() -> None:
    backbone, head = tiny_bin_net()
    opt = build_sgd(backbone, [head], lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3,
                    special=gates_of(backbone, rule="base"))
    lrs = set_lr(opt, 0.01 * 0.5)
    assert lrs["backbone/gate"] == pytest.approx(0.05)  # 10 x lr0 x 0.5
    assert lrs["backbone"] == pytest.approx(0.0005) and lrs["heads"] == pytest.approx(0.005)


def gate_step(opt: torch.optim.Optimizer, backbone: nn.Module, head: nn.Module) -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    F.cross_entropy(head(backbone(x)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()


def test_clamp_keeps_gates_in_unit_interval() -> None:
    backbone, head = tiny_bin_net()
    with torch.no_grad():
        backbone[1].rho.fill_(0.5)
    hyper = {"lr": 1e3, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}
    # Control: the same step without the clamp leaves [0, 1] ...
    backbone_raw, head_raw = copy.deepcopy(backbone), copy.deepcopy(head)
    plain = torch.optim.SGD(param_groups(backbone_raw, [head_raw], lr=1e3, weight_decay=0.0,
                                         special=gates_of(backbone_raw)), **hyper)
    gate_step(plain, backbone_raw, head_raw)
    raw = backbone_raw[1].rho.detach()
    assert ((raw < 0) | (raw > 1)).any()
    # ... with it, the gates are exactly that step projected onto [0, 1].
    opt = build_sgd(backbone, [head], **hyper, special=gates_of(backbone))
    attach_clamp(opt)  # idempotent: still one hook
    assert len(opt._optimizer_step_post_hooks) == 1
    gate_step(opt, backbone, head)
    assert torch.equal(backbone[1].rho.detach(), raw.clamp(0, 1))
    for _ in range(3):
        gate_step(opt, backbone, head)
        rho = backbone[1].rho.detach()
        assert rho.min() >= 0 and rho.max() <= 1


def test_clamp_survives_load_state_dict() -> None:
    backbone, head = tiny_bin_net()
    opt = build_sgd(backbone, [head], lr=1e3, momentum=0.9, nesterov=False, weight_decay=0.0,
                    special=gates_of(backbone))
    gate_step(opt, backbone, head)
    state = copy.deepcopy(opt.state_dict())
    with torch.no_grad():
        backbone[1].rho.fill_(0.5)
    opt.load_state_dict(state)
    assert any("clamp" in g for g in opt.param_groups)
    gate_step(opt, backbone, head)
    rho = backbone[1].rho.detach()
    assert rho.min() >= 0 and rho.max() <= 1 and ((rho == 0) | (rho == 1)).any()
