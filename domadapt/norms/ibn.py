"""IBN-a (Pan, Luo, Shi & Tang, "Two at Once: Enhancing Learning and Generalization Capacities
via IBN-Net", ECCV 2018) as a norm kind.

An IBN layer over C channels splits them at h = int(C * ratio) (clipped to [1, C - 1]):

    y[:h] = IN(x[:h]) * gamma[:h] + beta[:h]      (each sample's own moments, also at test time)
    y[h:] = BN(x[h:]) * gamma[h:] + beta[h:]      (batch moments / running estimates)

Placement (the paper's IBN-a for ResNet): the first norm layer of every residual block (bn1) of
the first `--ibn-stages` stages (layer1-3 by default) is an IBN layer; every other norm layer
(the stem, later stages, the rest of each block, downsample branches) is BN. Other backbones:
the first norm layer of every block of their first stages (`domadapt.norms.stages`: a
MobileNetV2 block's expansion BN; each conv-BN-ReLU unit of digitnet, whose 3 stages are then
all IBN by default).

From a pretrained BN: gamma, beta are carried to both halves and the running statistics to the
BN half, so the BN channels start exactly where BN does; the IN channels cannot (they normalize
each image by its own moments instead of the dataset's), which is the method itself. The official
code splits with `torch.split(x, h)`, which needs ratio >= 0.5; this splits [h, C - h] for any
ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from domadapt.errors import UserError
from domadapt.norms.base import NormKind, convert_layers, get_norm, norm_hparams, register_norm
from domadapt.norms.stages import first_norm, has_norm, stages
from domadapt.registry import check_finite, hparam


def split_channels(channels: int, ratio: float) -> int:
    """h = int(C * ratio), clipped to [1, C - 1] (both halves non-empty)."""
    return min(max(int(channels * ratio), 1), channels - 1)


class InstanceBatchNorm2d(nn.Module):
    """IN on the first `in_channels` channels, BN on the rest (module docstring)."""

    def __init__(self, num_features: int, ratio: float = 0.5, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if num_features < 2:
            raise UserError(f"--norm ibn: a norm layer of {num_features} channel cannot be split")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum, self.affine = (
            num_features, eps, momentum, affine)
        self.track_running_stats = track_running_stats
        self.in_channels = split_channels(num_features, ratio)
        self.inorm = nn.InstanceNorm2d(self.in_channels, eps=eps, affine=affine, **factory)
        self.bnorm = nn.BatchNorm2d(num_features - self.in_channels, eps=eps, momentum=momentum,
                                    affine=affine, track_running_stats=track_running_stats,
                                    **factory)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.split(x, [self.in_channels, self.num_features - self.in_channels], dim=1)
        return torch.cat([self.inorm(a.contiguous()), self.bnorm(b.contiguous())], dim=1)

    @torch.no_grad()
    def carry_from(self, old: nn.Module) -> None:
        """gamma, beta of `old` into both halves; its running statistics into the BN half."""
        h = self.in_channels
        for name in ("weight", "bias"):
            src = getattr(old, name, None)
            if isinstance(src, Tensor) and self.affine and src.shape == (self.num_features,):
                getattr(self.inorm, name).copy_(src[:h])
                getattr(self.bnorm, name).copy_(src[h:])
                for part in (self.inorm, self.bnorm):
                    getattr(part, name).requires_grad_(src.requires_grad)
        for name in ("running_mean", "running_var"):
            src, dst = getattr(old, name, None), getattr(self.bnorm, name, None)
            if isinstance(src, Tensor) and isinstance(dst, Tensor) and len(src) == self.num_features:
                dst.copy_(src[h:])
        src = getattr(old, "num_batches_tracked", None)
        if isinstance(src, Tensor) and self.bnorm.num_batches_tracked is not None:
            self.bnorm.num_batches_tracked.copy_(src)


@dataclass(frozen=True)
class IBNHparams:
    ibn_ratio: float = hparam(0.5, "IBN: share of the channels of an IBN layer that are "
                                   "instance-normalized")
    ibn_stages: int = hparam(3, "IBN: IBN layers in the first N stages (ResNet: layer1-3)")

    def __post_init__(self) -> None:
        check_finite("--ibn-ratio", self.ibn_ratio)
        if not 0.0 < self.ibn_ratio < 1.0:
            raise UserError(f"--ibn-ratio must lie in (0, 1), got {self.ibn_ratio}")
        if self.ibn_stages < 1:
            raise UserError(f"--ibn-stages must be >= 1, got {self.ibn_stages}")


@register_norm
class IBN(NormKind):
    name = "ibn"
    layer_type = InstanceBatchNorm2d
    Hparams = IBNHparams
    help = "IBN-a: IN on part of the channels of each block's first norm in the first stages"

    def convert(self, model: nn.Module, hp: IBNHparams) -> nn.Module:
        """IBN at the first norm layer of every block of the first `ibn_stages` stages, BN at
        every other norm layer."""
        found = stages(model, self.name)
        if hp.ibn_stages > len(found):
            raise UserError(f"--ibn-stages {hp.ibn_stages}: this {type(model).__name__} has "
                            f"{len(found)} stages")
        chosen = {first_norm(block, name) for stage in found[:hp.ibn_stages]
                  for name, block in stage if has_norm(block)}
        bn, bn_hp = get_norm("bn"), norm_hparams("bn")
        return convert_layers(model, lambda name: (self, hp) if name in chosen else (bn, bn_hp))

    def make_layer(self, old: nn.Module, hp: IBNHparams, factory: dict[str, Any]) -> nn.Module:
        new = InstanceBatchNorm2d(old.num_features, hp.ibn_ratio, eps=old.eps,
                                  momentum=old.momentum, affine=old.affine, **factory)
        new.carry_from(old)
        return new
