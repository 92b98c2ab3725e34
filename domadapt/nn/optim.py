"""Optimizer set-up: parameter groups, the clamp of constrained parameters, the lr schedule.

Learning rates are lr0 * lr_mult * schedule: heads train at lr0, the (pretrained) backbone at
`backbone_lr_mult` x lr0. A norm kind may declare special parameters (`SpecialParams`, e.g. the
BIN gates) that get their own groups: lr_mult = its multiplier x (the layer's multiplier if
`relative`, else 1), no weight decay, and a clamp applied after every step. Each group carries
"name", "lr_mult" and, for clamped groups, "clamp" = (lo, hi).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from domadapt.errors import UserError
from domadapt.norms.base import SpecialParams

__all__ = ["attach_clamp", "build_sgd", "clamped_groups", "param_groups", "set_lr"]

_CLAMP_HANDLE = "_domadapt_clamp"  # attribute on the optimizer holding the hook handle


def _split(modules: Sequence[nn.Module], special: set[int]
           ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of `modules` as (plain, special), each once, in module order."""
    seen: set[int] = set()
    plain: list[nn.Parameter] = []
    chosen: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (chosen if id(p) in special else plain).append(p)
    return plain, chosen


def param_groups(
    backbone: nn.Module | Sequence[nn.Module],
    heads: Sequence[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 0.1,
    special: SpecialParams | None = None,
) -> list[dict[str, Any]]:
    """SGD parameter groups, each with "lr" = lr * "lr_mult":

        backbone            lr_mult = backbone_lr_mult                       weight decay
        backbone/<label>    lr_mult = special.lr_mult (x backbone_lr_mult    no decay
                                      if special.relative)
        heads               lr_mult = 1                                      weight decay
        heads/<label>       lr_mult = special.lr_mult                        no decay

    Only parameters with requires_grad are included; empty groups are left out. `backbone`
    is one module or several (a method's own optimizers may cover part of the network).
    """
    ids = {id(p) for p in special.params} if special else set()
    groups: list[dict[str, Any]] = []
    backbones = [backbone] if isinstance(backbone, nn.Module) else list(backbone)
    for name, modules, mult in (("backbone", backbones, backbone_lr_mult), ("heads", heads, 1.0)):
        plain, chosen = _split(modules, ids)
        groups.append({"params": plain, "name": name, "lr_mult": mult,
                       "weight_decay": weight_decay})
        if special is not None:
            group = {"params": chosen, "name": f"{name}/{special.label}",
                     "lr_mult": special.lr_mult * (mult if special.relative else 1.0),
                     "weight_decay": 0.0}
            if special.clamp is not None:
                group["clamp"] = special.clamp
            groups.append(group)
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    return groups


def clamped_groups(optimizer: torch.optim.Optimizer) -> Iterator[dict[str, Any]]:
    """The parameter groups of `optimizer` that carry a "clamp"."""
    return (group for group in optimizer.param_groups if group.get("clamp") is not None)


def _clamp(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step post-hook: project every clamped group onto its [lo, hi], in place."""
    with torch.no_grad():
        for group in clamped_groups(optimizer):
            lo, hi = group["clamp"]
            for p in group["params"]:
                p.clamp_(lo, hi)


def attach_clamp(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Clamp the clamped groups after every `optimizer.step()`; idempotent.

    The hook reads the groups at each step, so it keeps working after `load_state_dict`.
    """
    if getattr(optimizer, _CLAMP_HANDLE, None) is None:
        setattr(optimizer, _CLAMP_HANDLE, optimizer.register_step_post_hook(_clamp))
    return optimizer


def build_sgd(
    backbone: nn.Module | Sequence[nn.Module],
    heads: Sequence[nn.Module],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    backbone_lr_mult: float = 0.1,
    special: SpecialParams | None = None,
) -> torch.optim.SGD:
    """SGD over `param_groups(...)` with the clamp attached."""
    if nesterov and momentum <= 0:
        raise UserError(f"Nesterov SGD needs a positive --momentum, got {momentum}")
    groups = param_groups(backbone, heads, lr=lr, weight_decay=weight_decay,
                          backbone_lr_mult=backbone_lr_mult, special=special)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay)
    return attach_clamp(optimizer)  # type: ignore[return-value]


def set_lr(optimizer: torch.optim.Optimizer, base: float) -> dict[str, float]:
    """Set every group's lr to base * lr_mult, `base` being lr0 x the schedule's factor.
    Returns {group name: lr}."""
    out = {}
    for group in optimizer.param_groups:
        group["lr"] = base * group.get("lr_mult", 1.0)
        out[group.get("name", "")] = group["lr"]
    return out

