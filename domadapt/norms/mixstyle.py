"""MixStyle (Zhou, Yang, Qiao & Xiang, "Domain Generalization with MixStyle", ICLR 2021) as a
norm kind: every norm layer stays BN, and a MixStyle layer follows each chosen stage.

In training, with probability p per layer and forward, over a batch x of B samples:

    mu, sigma = mean, sqrt(var + eps) of x over H, W (per sample and channel; detached)
    lambda_i ~ Beta(alpha, alpha),  j = perm(i) a random permutation of the batch
    mix(x)_i = (x_i - mu_i) / sigma_i * (lambda_i sigma_i + (1 - lambda_i) sigma_j)
                                      + (lambda_i mu_i + (1 - lambda_i) mu_j)

and the identity otherwise and at evaluation. As the official code: eps = 1e-6, var unbiased,
the "random" mix (any pair; a DANN batch of source then target images mixes across domains),
p = 0.5, alpha = 0.1, after stages 1, 2, 3 of ResNet (`resnet18_ms_l123`, its DG classification
setting); stages of other backbones as `domadapt.norms.stages`. The coin, lambda and the
permutation are drawn from torch's global CPU generator, which the trainer seeds
(`derive_seed(seed, "train")`) and checkpoints, so runs repeat and resume exactly (the official
code draws the coin from Python's `random`). Nothing is drawn at evaluation, for a batch of one,
or when p = 0 (such a run is BN's run exactly).

The MixStyle layer is a child of the stage's last block (`mixstyle`) applied by a forward hook
on that block: it has no parameters or buffers, so the state dict keeps BN's keys and a
converted pretrained network is that network, exactly, at evaluation and whenever the coin says
no.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from domadapt.errors import UserError
from domadapt.norms.base import NormKind, register_norm
from domadapt.norms.stages import stages
from domadapt.registry import check_finite, hparam


class MixStyle(nn.Module):
    """Mixes instance statistics between samples in training (module docstring)."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.alpha, self.eps = p, alpha, eps

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.shape[0] < 2 or float(torch.rand(())) >= self.p:
            return x
        b = x.shape[0]
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sig = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        alpha = torch.tensor(float(self.alpha))
        lam = torch.distributions.Beta(alpha, alpha).sample((b, 1, 1, 1)).to(x)
        perm = torch.randperm(b).to(x.device)
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sig_mix = lam * sig + (1 - lam) * sig[perm]
        return (x - mu) / sig * sig_mix + mu_mix


def _apply_mixstyle(block: nn.Module, args: Any, output: Tensor) -> Tensor:
    """Forward hook: the block's output through its `mixstyle` child."""
    return block.mixstyle(output)


def parse_stages(text: str) -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3): distinct stage numbers >= 1, or a one-line UserError."""
    try:
        out = tuple(int(t) for t in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1 or len(set(out)) != len(out):
        raise UserError(f"--mixstyle-stages must be distinct stage numbers >= 1 separated by "
                        f"commas (e.g. 1,2,3), got {text!r}")
    return out


@dataclass(frozen=True)
class MixStyleHparams:
    mixstyle_p: float = hparam(0.5, "MixStyle: probability of mixing, per layer and batch")
    mixstyle_alpha: float = hparam(0.1, "MixStyle: lambda ~ Beta(alpha, alpha)")
    mixstyle_stages: str = hparam("1,2,3", "MixStyle: after which stages (ResNet: layer1-3)")

    def __post_init__(self) -> None:
        check_finite("--mixstyle-p", self.mixstyle_p)
        check_finite("--mixstyle-alpha", self.mixstyle_alpha)
        if not 0.0 <= self.mixstyle_p <= 1.0:
            raise UserError(f"--mixstyle-p must lie in [0, 1], got {self.mixstyle_p}")
        if not self.mixstyle_alpha > 0:
            raise UserError(f"--mixstyle-alpha must be positive, got {self.mixstyle_alpha}")
        parse_stages(self.mixstyle_stages)


@register_norm
class MixStyleNorm(NormKind):
    name = "mixstyle"
    layer_type = nn.BatchNorm2d
    Hparams = MixStyleHparams
    help = "BN, with MixStyle (instance statistics mixed between samples) after chosen stages"

    def convert(self, model: nn.Module, hp: MixStyleHparams) -> nn.Module:
        """Every norm layer -> BN (`make_layer`), then a MixStyle layer after each chosen
        stage's last block (kept when it already has one)."""
        model = super().convert(model, hp)
        found = stages(model, self.name)
        chosen = parse_stages(hp.mixstyle_stages)
        if max(chosen) > len(found):
            raise UserError(f"--mixstyle-stages {hp.mixstyle_stages}: this "
                            f"{type(model).__name__} has {len(found)} stages")
        for k in chosen:
            _, block = found[k - 1][-1]
            if not isinstance(getattr(block, "mixstyle", None), MixStyle):
                mix = MixStyle(hp.mixstyle_p, hp.mixstyle_alpha).train(block.training)
                block.add_module("mixstyle", mix)
                block.register_forward_hook(_apply_mixstyle)
        return model
