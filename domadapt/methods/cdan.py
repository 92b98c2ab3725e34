"""CDAN and CDAN+E (Long et al., NeurIPS 2018, "Conditional Adversarial Domain Adaptation").

DANN's discriminator sees the features f; CDAN's sees them conditioned on the classifier's
prediction g = softmax(C(f)) through the multilinear map

    T(f, g) = g (x) f                               (flattened outer product, d_f x K dims)
    T(f, g) = (R_f f) * (R_g g) / sqrt(d)           (randomized, d dims, when d_f x K > 4096)

with R_f [d x d_f], R_g [d x K] fixed Gaussian matrices (elementwise product *). Then

    L = CE(C(f_s), y_s) + w * BCE_v(D(R_lambda(T(f, g))), d)

with R_lambda DANN's gradient reversal layer and schedule, d = 1 for source and 0 for target.
CDAN weights BCE_v uniformly; CDAN+E ("entropy conditioning") weights each sample by
v = 1 + exp(-H(g)) (confident predictions count more), normalized to mean 1 within each domain.

As in the official code (thuml/CDAN) and Transfer-Learning-Library, g is detached before the
map: the adversarial gradient reaches the network only through f, and the classifier is trained
by the cross-entropy alone. The entropy weights are constants too (computed from the detached
g, as in Transfer-Learning-Library; the official code also back-propagates a reversed gradient
through H(g), which the paper does not describe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domadapt.errors import UserError
from domadapt.methods.base import (
    Method,
    Step,
    StepOutput,
    register_method,
)
from domadapt.methods.dann import AdversarialHparams, adversarial_output, grl_lambda
from domadapt.nn import DomainDiscriminator, grad_reverse
from domadapt.nn.domains import concat_domains
from domadapt.nn.losses import certainty_weights
from domadapt.registry import hparam


@dataclass(frozen=True)
class CDANHparams(AdversarialHparams):
    """DANN's adversarial options plus the choice of multilinear map."""

    cdan_map_max_dim: int = hparam(
        4096, "CDAN: largest d_f x classes for the full multilinear map; above, the randomized one")
    cdan_random_dim: int = hparam(1024, "CDAN: output dim d of the randomized multilinear map")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cdan_map_max_dim < 0:
            raise UserError(f"--cdan-map-max-dim must be >= 0, got {self.cdan_map_max_dim}")
        if self.cdan_random_dim <= 0:
            raise UserError(f"--cdan-random-dim must be positive, got {self.cdan_random_dim}")


class MultilinearMap(nn.Module):
    """T(f, g)[:, k * d_f + j] = g[:, k] * f[:, j]: the flattened outer product g (x) f."""

    def __init__(self, features_dim: int, num_classes: int) -> None:
        super().__init__()
        self.out_features = features_dim * num_classes

    def forward(self, f: Tensor, g: Tensor) -> Tensor:
        """f [B, d_f], g [B, K] -> [B, K * d_f]."""
        return (g.unsqueeze(2) * f.unsqueeze(1)).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    """T(f, g) = (f R_f^T) * (g R_g^T) / sqrt(d), R_f [d, d_f] and R_g [d, K] drawn once from
    N(0, 1) with torch's global generator. They are buffers: moved with the module, saved in
    its state_dict and restored on resume. E[<T(f,g), T(f',g')>] = <f, f'> <g, g'>."""

    def __init__(self, features_dim: int, num_classes: int, dim: int = 1024) -> None:
        super().__init__()
        self.out_features = dim
        self.register_buffer("r_f", torch.randn(dim, features_dim))
        self.register_buffer("r_g", torch.randn(dim, num_classes))

    def forward(self, f: Tensor, g: Tensor) -> Tensor:
        """f [B, d_f], g [B, K] -> [B, d]."""
        return (f @ self.r_f.T.to(f.dtype)) * (g @ self.r_g.T.to(g.dtype)) / math.sqrt(
            self.out_features)


def multilinear_map(features_dim: int, num_classes: int, *, max_dim: int = 4096,
                    random_dim: int = 1024) -> MultilinearMap | RandomizedMultilinearMap:
    """The full map if d_f x K <= max_dim, else the randomized one with `random_dim` outputs."""
    if features_dim * num_classes <= max_dim:
        return MultilinearMap(features_dim, num_classes)
    return RandomizedMultilinearMap(features_dim, num_classes, random_dim)


def weighted_domain_loss(d_s: Tensor, d_t: Tensor, v_s: Tensor | None = None,
                         v_t: Tensor | None = None) -> Tensor:
    """sum_i u_i BCE(d_i, label_i) / (n_s + n_t), labels 1 (source) / 0 (target), with
    u = v / mean(v) within each domain (u = 1 without weights: the plain mean BCE).
    For n_s = n_t this is the official CDAN+E loss: the mean of the two domains' v-weighted
    averages."""
    logits = torch.cat([d_s, d_t]).float()
    labels = torch.cat([torch.ones_like(d_s), torch.zeros_like(d_t)]).float()
    weight = None
    if v_s is not None and v_t is not None:
        weight = torch.cat([v_s / v_s.mean(), v_t / v_t.mean()]).detach().float()
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weight)


@register_method
class CDAN(Method):
    """Conditional domain-adversarial training (module docstring for the loss).

    Source and target are forwarded concatenated, as in DANN: BN/BIN layers then normalize
    with mixed-batch statistics, the ones the running estimates (used at test time) average."""

    name = "cdan"
    help = "conditional domain-adversarial training: D sees features x predictions (Long et al.)"
    Hparams = CDANHparams
    uses_target = True
    entropy_conditioning: ClassVar[bool] = False

    def __init__(self, model, hp: CDANHparams, *, num_classes: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, hp, num_classes=num_classes)
        self.map = multilinear_map(model.classifier.in_features, num_classes,
                                   max_dim=hp.cdan_map_max_dim, random_dim=hp.cdan_random_dim)
        self.discriminator = DomainDiscriminator(self.map.out_features, hidden=hp.disc_hidden)

    def forward(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None, step: Step) -> StepOutput:
        if x_t is None:
            raise ValueError(f"{self.name} needs a target batch")
        n_s = x_s.shape[0]
        logits, features = self.model(*concat_domains(x_s, x_t))
        logits_s = logits[:n_s]
        g = F.softmax(logits.float(), dim=1).detach()
        coeff = grl_lambda(self.hp, step)
        d = self.discriminator(grad_reverse(self.map(features, g), coeff)).float()
        d_s, d_t = d[:n_s], d[n_s:]
        if self.entropy_conditioning:
            v = certainty_weights(g)
            domain_loss = weighted_domain_loss(d_s, d_t, v[:n_s], v[n_s:])
        else:
            domain_loss = weighted_domain_loss(d_s, d_t)
        return adversarial_output(logits_s, y_s, d_s, d_t, domain_loss, coeff,
                                  self.hp.adv_weight)


@register_method
class CDANE(CDAN):
    """CDAN+E: CDAN with entropy conditioning. A method of its own (not a boolean option) so
    that a sweep lists it next to cdan in --methods and the tables give it its own row."""

    name = "cdan-e"
    help = "CDAN+E: CDAN with entropy conditioning (samples weighted by 1 + exp(-H(g)))"
    entropy_conditioning = True
