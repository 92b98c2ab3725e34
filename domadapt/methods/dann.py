"""DANN (Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016).

    L = CE(C(f_s), y_s) + w * BCE(D(R_lambda(f)), d)

with f the bottleneck features and d = 1 for source, 0 for target images.

R_lambda is the gradient reversal layer (identity forward, -lambda * grad backward), so one
backward pass trains D to tell the domains apart and the feature extractor to confuse it.
lambda rises from 0 to ~1: 2 / (1 + exp(-alpha p)) - 1 over training progress p in [0, 1]
(Ganin et al.), or 2 / (1 + exp(-i / warm-up)) - 1 over iterations i (Transfer-Learning-Library).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from domadapt.distributions import LogUniform
from domadapt.errors import UserError
from domadapt.methods.base import (
    Method,
    Step,
    StepOutput,
    batch_accuracy,
    register_method,
    stat,
    supervised_loss,
)
from domadapt.nn import DomainDiscriminator, domain_accuracy, domain_adversarial_loss, grad_reverse
from domadapt.nn.domains import concat_domains
from domadapt.registry import hparam
from domadapt.schedules import SCHEDULE_FORMS, check_schedule_options, grl_coefficient


def disc_hidden_hparam() -> Any:
    """The `disc_hidden` option of every method with a `DomainDiscriminator` (one declaration:
    methods that share an option must agree on its type and default)."""
    return hparam(1024, "width of the domain discriminator's hidden layers")


def check_disc_hidden(value: int) -> None:
    if value <= 0:
        raise UserError(f"--disc-hidden must be positive, got {value}")


@dataclass(frozen=True)
class AdversarialHparams:
    """Options shared by the domain-adversarial methods (DANN, CDAN)."""

    adv_weight: float = hparam(1.0, "weight w of the domain-adversarial loss",
                               search=LogUniform(0.03, 3.0))
    disc_hidden: int = disc_hidden_hparam()
    grl_schedule: str = hparam(
        "progress", "GRL coefficient: 2/(1+exp(-alpha p))-1 (progress, Ganin et al.) or "
        "2/(1+exp(-iteration/warmup))-1 (iteration, Transfer-Learning-Library)",
        choices=SCHEDULE_FORMS)
    grl_alpha: float = hparam(10.0, "GRL progress schedule: alpha")
    grl_warmup: float = hparam(1000.0, "GRL iteration schedule: warm-up iterations")

    def __post_init__(self) -> None:
        check_schedule_options(grl_schedule=self.grl_schedule, grl_alpha=self.grl_alpha,
                               grl_warmup=self.grl_warmup)
        if self.adv_weight < 0:
            raise UserError(f"--adv-weight must be >= 0, got {self.adv_weight}")
        check_disc_hidden(self.disc_hidden)


def grl_lambda(hp: AdversarialHparams, step: Step) -> float:
    """The gradient-reversal coefficient lambda at `step` (`domadapt.schedules`)."""
    return grl_coefficient(step.iteration, step.total, form=hp.grl_schedule, alpha=hp.grl_alpha,
                           warmup=hp.grl_warmup)


@register_method
class DANN(Method):
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
    - it is what Transfer-Learning-Library's DANN does.
    The source classifier therefore also trains on features normalized with mixed statistics,
    the same normalization the target sees at test time.
    """

    name = "dann"
    help = "domain-adversarial training with a gradient reversal layer (Ganin et al.)"
    Hparams = AdversarialHparams
    uses_target = True

    def __init__(self, model, hp: AdversarialHparams, *, num_classes: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, hp, num_classes=num_classes)
        self.discriminator = DomainDiscriminator(model.classifier.in_features, hidden=hp.disc_hidden)

    def forward(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None, step: Step) -> StepOutput:
        if x_t is None:
            raise ValueError("DANN needs a target batch")
        n_s = x_s.shape[0]
        logits, features = self.model(*concat_domains(x_s, x_t))
        logits_s = logits[:n_s]
        coeff = grl_lambda(self.hp, step)
        d = self.discriminator(grad_reverse(features, coeff)).float()
        d_s, d_t = d[:n_s], d[n_s:]
        return adversarial_output(logits_s, y_s, d_s, d_t, domain_adversarial_loss(d_s, d_t),
                                  coeff, self.hp.adv_weight)


def adversarial_output(logits_s: Tensor, y_s: Tensor, d_s: Tensor, d_t: Tensor,
                       domain_loss: Tensor, coeff: float, adv_weight: float) -> StepOutput:
    """The step of a gradient-reversal method (DANN, CDAN): loss = CE(logits_s, y_s) +
    adv_weight * domain_loss, with the logged statistics (losses, the discriminator's domain
    accuracy on d_s / d_t, the source batch accuracy, the reversal coefficient)."""
    cls_loss = supervised_loss(logits_s, y_s)
    loss = cls_loss + adv_weight * domain_loss
    stats = {
        "cls_loss": cls_loss.detach(),
        "domain_loss": domain_loss.detach(),
        "disc_acc": stat(domain_accuracy(d_s.detach(), d_t.detach())),
        "train_acc": batch_accuracy(logits_s.detach(), y_s),
        "grl_coeff": stat(float(coeff)),
    }
    return StepOutput(loss, stats)
