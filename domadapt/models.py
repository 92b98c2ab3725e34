"""Building the domain-adaptation model of a run (`build_model`; the network, `DomainAdaptModel`,
lives in `domadapt.nn.model`): a backbone, a bottleneck and a classifier.

    x --backbone--> h (feature_dim) --bottleneck--> f (bottleneck_dim) --classifier--> logits

`f` (the bottleneck output) is what the domain discriminator sees and what analysis tools embed.
Normalization layers are converted (`domadapt.norms.convert_norm`) *after* pretrained weights
are loaded, so BIN starts from the pretrained BatchNorm exactly; then a ReLU / ReLU6 module
right after a BIN layer is fused into it (`domadapt.nn.bin_fusion`: the same bits, fewer
passes over memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from domadapt.backbones import build_backbone
from domadapt.errors import UserError
from domadapt.nn.bin_fusion import fuse_activations
from domadapt.nn.model import DomainAdaptModel
from domadapt.norms import convert_norm, count_norm_layers

if TYPE_CHECKING:
    from domadapt.config import RunConfig


def build_model(cfg: RunConfig, num_classes: int, *,
                load_pretrained: bool = True) -> DomainAdaptModel:
    """The model of a run: backbone (pretrained as `cfg.pretrained`, then norm-converted to
    `cfg.norm`), bottleneck of `cfg.bottleneck_dim`, classifier over `num_classes`.

    `load_pretrained=False` builds the same architecture without fetching any weights (used
    when a checkpoint is about to overwrite them).
    """
    pretrained = cfg.pretrained if load_pretrained else "none"
    backbone, feature_dim = build_backbone(cfg.backbone, pretrained)
    if cfg.norm != "bn" and not count_norm_layers(backbone):
        raise UserError(f"--norm {cfg.norm}: backbone {cfg.backbone} has no normalization "
                        f"layers to convert")
    convert_norm(backbone, cfg.norm, cfg.norm_options)
    fuse_activations(backbone)  # BIN + ReLU/ReLU6 in a Sequential: one pass, the same bits
    return DomainAdaptModel(backbone, feature_dim, cfg.bottleneck_dim, num_classes)
