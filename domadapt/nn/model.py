"""The domain-adaptation network: a backbone, a bottleneck and a classifier (built for a run by
`domadapt.models.build_model`). Here, below the methods, so a method may name its type.

    x --backbone--> h (feature_dim) --bottleneck--> f (bottleneck_dim) --classifier--> logits
"""

from __future__ import annotations

from torch import Tensor, nn

from domadapt.nn.domains import Domains, domain_labels
from domadapt.nn.heads import Bottleneck


class DomainAdaptModel(nn.Module):
    """backbone -> bottleneck (Linear-BN1d-ReLU) -> linear classifier.

    `forward(x, domains=None)` returns `(logits, features)`, `features` being the bottleneck
    output; `domains` (an int or a per-sample tensor) labels the batch for domain-aware norm
    layers (`domadapt.nn.domains`).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, bottleneck_dim: int,
                 num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.bottleneck = Bottleneck(feature_dim, bottleneck_dim)
        self.classifier = nn.Linear(bottleneck_dim, num_classes)

    def forward(self, x: Tensor, domains: Domains = None) -> tuple[Tensor, Tensor]:
        with domain_labels(self, domains):
            features = self.bottleneck(self.backbone(x))
        return self.classifier(features), features
