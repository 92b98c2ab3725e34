"""Optimizer set-up for DANN / BIN training: parameter groups, the gate clamp, the lr schedule.

Learning rates are lr0 * lr_mult * lr_factor(p): heads train at lr0, the (pretrained)
backbone at `backbone_lr_mult` x lr0, and the BIN gates at `gate_lr_mult` x the learning rate
of the layer they sit in, with no weight decay, clamped to [0, 1] after every step, as in the
official BIN code (Nam & Kim, 2018). Each group carries "lr_mult" and "is_gate".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from domadapt.errors import UserError
from domadapt.nn.bin import gate_parameters

__all__ = [
    "attach_gate_clamp", "build_sgd", "gate_groups", "lr_factor", "param_groups", "set_lr",
]

_CLAMP_HANDLE = "_domadapt_gate_clamp"  # attribute on the optimizer holding the hook handle


def _split(modules: Sequence[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of `modules` as (non-gates, gates), each once, in module order."""
    gate_ids = {id(p) for m in modules for p in gate_parameters(m)}
    seen: set[int] = set()
    plain: list[nn.Parameter] = []
    gates: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (gates if id(p) in gate_ids else plain).append(p)
    return plain, gates


def param_groups(
    backbone: nn.Module,
    heads: Sequence[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 0.1,
    gate_lr_mult: float = 10.0,
) -> list[dict[str, Any]]:
    """SGD parameter groups, each with "lr" = lr * "lr_mult" and an "is_gate" flag.

        backbone         lr_mult = backbone_lr_mult                  weight decay
        backbone gates   lr_mult = backbone_lr_mult * gate_lr_mult   no decay (1.0 by default)
        heads            lr_mult = 1                                 weight decay
        head gates       lr_mult = gate_lr_mult                      no decay

    Gates get 10x the learning rate of the layer they sit in (official BIN code), hence the
    product. Only parameters with requires_grad are included; empty groups are left out.
    """
    groups: list[dict[str, Any]] = []
    for name, modules, mult in (("backbone", [backbone], backbone_lr_mult), ("heads", heads, 1.0)):
        plain, gates = _split(modules)
        for suffix, params, lr_mult, wd, is_gate in (
            ("", plain, mult, weight_decay, False),
            ("/gates", gates, mult * gate_lr_mult, 0.0, True),
        ):
            if params:
                groups.append({"params": params, "name": name + suffix, "lr": lr * lr_mult,
                               "lr_mult": lr_mult, "weight_decay": wd, "is_gate": is_gate})
    return groups


def gate_groups(optimizer: torch.optim.Optimizer) -> Iterator[dict[str, Any]]:
    """The parameter groups of `optimizer` flagged "is_gate"."""
    return (group for group in optimizer.param_groups if group.get("is_gate", False))


def _clamp_gates(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step post-hook: project every gate onto [0, 1], in place."""
    with torch.no_grad():
        for group in gate_groups(optimizer):
            for p in group["params"]:
                p.clamp_(0.0, 1.0)


def attach_gate_clamp(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Clamp the gate groups to [0, 1] after every `optimizer.step()`; idempotent.

    The hook reads the groups at each step, so it keeps working after `load_state_dict`.
    """
    if getattr(optimizer, _CLAMP_HANDLE, None) is None:
        setattr(optimizer, _CLAMP_HANDLE, optimizer.register_step_post_hook(_clamp_gates))
    return optimizer


def build_sgd(
    backbone: nn.Module,
    heads: Sequence[nn.Module],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    backbone_lr_mult: float = 0.1,
    gate_lr_mult: float = 10.0,
) -> torch.optim.SGD:
    """SGD over `param_groups(...)` with the gate clamp attached."""
    if nesterov and momentum <= 0:
        raise UserError(f"Nesterov SGD needs a positive --momentum, got {momentum}")
    groups = param_groups(backbone, heads, lr=lr, weight_decay=weight_decay,
                          backbone_lr_mult=backbone_lr_mult, gate_lr_mult=gate_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay)
    return attach_gate_clamp(optimizer)  # type: ignore[return-value]


def lr_factor(p: float, gamma: float = 10.0, decay: float = 0.75) -> float:
    """Annealing factor (1 + gamma p)^(-decay) at training progress p in [0, 1] (Ganin et al., 2016)."""
    return (1.0 + gamma * p) ** (-decay)


def set_lr(
    optimizer: torch.optim.Optimizer, lr0: float, p: float, gamma: float = 10.0,
    decay: float = 0.75,
) -> float:
    """Set every group's lr to lr0 * lr_mult * lr_factor(p); return the base lr lr0 * lr_factor(p)."""
    base = lr0 * lr_factor(p, gamma, decay)
    for group in optimizer.param_groups:
        group["lr"] = base * group.get("lr_mult", 1.0)
    return base

