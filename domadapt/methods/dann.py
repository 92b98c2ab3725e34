"""DANN (Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016).

    L = CE(C(f_s), y_s) + w * BCE(D(R_lambda(f)), d)

with f the bottleneck features and d = 1 for source, 0 for target images.

R_lambda is the gradient reversal layer (identity forward, -lambda * grad backward), so one
backward pass trains D to tell the domains apart and the feature extractor to confuse it.
lambda(p) = 2 / (1 + exp(-alpha p)) - 1 rises from 0 to ~1 over training progress p in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domadapt.methods.source_only import StepOutput, batch_accuracy
from domadapt.models import DomainAdaptModel
from domadapt.nn import (
    DomainDiscriminator,
    domain_accuracy,
    domain_adversarial_loss,
    grad_reverse,
    grl_coefficient,
)


class DANN(nn.Module):
    """Domain-adversarial training with a gradient reversal layer.

    BatchNorm statistics: source and target are forwarded *concatenated*, as one batch of
    2b images, so every BN (and the batch branch of every BIN) layer normalizes with the
    statistics of the mixed batch. This is deliberate:
    - train/test consistency: the running statistics then estimate the moments of the union
      of both domains, and at test time the target is normalized by those same moments it was
      trained under. Separate forward passes would normalize each domain by its own batch
      statistics during training (implicitly aligning first and second moments per layer) but
      by a running average of the two at test time -- a train/test mismatch on the target.
    - honest adversary: per-domain batch statistics would erase exactly the mean/variance
      differences the discriminator is meant to see, making the adversarial loss look solved
      while the test-time features (normalized with shared running statistics) still differ.
    - it is the choice of common reference implementations (e.g. Transfer-Learning-Library's
      DANN), so results stay comparable with published Office-Home numbers.
    The source classifier therefore also trains on features normalized with mixed statistics,
    the same normalization the target sees at test time.
    """

    uses_target = True

    def __init__(self, model: DomainAdaptModel, *, disc_hidden: int = 1024,
                 adv_weight: float = 1.0, grl_alpha: float = 10.0) -> None:
        super().__init__()
        self.model = model
        self.discriminator = DomainDiscriminator(model.classifier.in_features, hidden=disc_hidden)
        self.adv_weight = adv_weight
        self.grl_alpha = grl_alpha

    def heads(self) -> list[nn.Module]:
        return [self.model.bottleneck, self.model.classifier, self.discriminator]

    def forward(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None = None,
                p: float = 0.0) -> StepOutput:
        if x_t is None:
            raise ValueError("DANN needs a target batch")
        n_s = x_s.shape[0]
        logits, features = self.model(torch.cat([x_s, x_t]))
        logits_s = logits[:n_s]
        coeff = grl_coefficient(p, alpha=self.grl_alpha)
        d = self.discriminator(grad_reverse(features, coeff)).float()
        d_s, d_t = d[:n_s], d[n_s:]
        cls_loss = F.cross_entropy(logits_s.float(), y_s)
        domain_loss = domain_adversarial_loss(d_s, d_t)
        loss = cls_loss + self.adv_weight * domain_loss
        with torch.no_grad():
            stats = {
                "cls_loss": cls_loss.detach(),
                "domain_loss": domain_loss.detach(),
                "disc_acc": torch.as_tensor(domain_accuracy(d_s, d_t), dtype=torch.float32),
                "train_acc": batch_accuracy(logits_s, y_s),
                "grl_coeff": torch.as_tensor(float(coeff)),
            }
        return StepOutput(loss, stats)
