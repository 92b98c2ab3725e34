"""Domain-specific BatchNorm (Chang, You, Seo, Kwak & Han, "Domain-Specific Batch Normalization
for Unsupervised Domain Adaptation", CVPR 2019) as a norm kind.

Every norm layer keeps one BatchNorm per domain d (source, target), with its own statistics
and affine parameters; sample i of domain d_i is normalized by its domain's branch only:

    y_i = (x_i - mu_{d_i}) / sqrt(var_{d_i} + eps) * gamma_{d_i} + beta_{d_i}

mu_d, var_d being the moments of the batch's domain-d samples in training (each branch's
running statistics follow its own samples only) and the branch's running estimates at
evaluation. The domains come through `domadapt.nn.domains` (methods label their batches, the
trainer its evaluation sets): source accuracy is measured with the source branch, target
accuracy with the target branch. A forward without labels uses the target's branch at
evaluation (the domain a model is deployed on; e.g. analysis tools) and is an error in training.

From a pretrained BN both branches start as copies of it (the paper's initialization), so at
evaluation, and in training on a batch of one domain, the network starts exactly where BN does;
on a mixed batch (DANN's [source; target]) each domain is normalized by its own batch moments
instead of the mixed ones: that is the method. DSBN needs every training image's domain and a
trained target branch, so it runs only in the transfer setting with a method that trains on the
target (`domadapt.settings.check_domains_defined`; source-only, multidomain and dg are refused
in one line). Departure: the paper's second stage (pseudo-labelled self-training of a
target-only network) is not part of the norm; it would be a method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from domadapt.nn.domains import TARGET, DomainAware
from domadapt.norms.base import NormKind, register_norm

NUM_DOMAINS = 2  # SOURCE, TARGET


class DomainSpecificBatchNorm2d(DomainAware):
    """One BatchNorm2d per domain (`branches[d]`), chosen per sample by `self.domains`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 num_domains: int = NUM_DOMAINS, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = (
            num_features, eps, momentum, affine)
        self.track_running_stats = track_running_stats
        self.branches = nn.ModuleList(
            nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine,
                           track_running_stats=track_running_stats, device=device, dtype=dtype)
            for _ in range(num_domains))

    def forward(self, x: Tensor) -> Tensor:
        domains = self.domains
        if domains is None:
            if self.training:
                raise RuntimeError("DomainSpecificBatchNorm2d: a training forward without "
                                   "domain labels (see domadapt.nn.domains.domain_labels)")
            domains = TARGET
        if isinstance(domains, int):
            return self.branches[domains](x)
        if domains.shape != (x.shape[0],):
            raise RuntimeError(f"DomainSpecificBatchNorm2d: {tuple(domains.shape)} domain labels "
                               f"for a batch of {x.shape[0]}")
        out = torch.empty_like(x)
        for d, branch in enumerate(self.branches):
            rows = (domains == d).nonzero().flatten()
            if len(rows):
                out[rows] = branch(x[rows])
        return out

    @torch.no_grad()
    def carry_from(self, old: nn.Module) -> None:
        """Every branch := `old`'s affine weight, bias and running statistics."""
        for branch in self.branches:
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(old, name, None), getattr(branch, name, None)
                if isinstance(src, Tensor) and isinstance(dst, Tensor) and src.shape == dst.shape:
                    dst.copy_(src)
                    if isinstance(dst, nn.Parameter):
                        dst.requires_grad_(src.requires_grad)


@register_norm
class DomainSpecificBatchNorm(NormKind):
    name = "dsbn"
    layer_type = DomainSpecificBatchNorm2d
    needs_domains = True
    help = "domain-specific BN: source and target statistics and affine (transfer, methods " \
           "that train on the target)"

    def make_layer(self, old: nn.Module, hp: Any, factory: dict[str, Any]) -> nn.Module:
        new = DomainSpecificBatchNorm2d(
            old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
            track_running_stats=bool(getattr(old, "track_running_stats", False)
                                     or isinstance(old, nn.InstanceNorm2d)), **factory)
        new.carry_from(old)
        return new
