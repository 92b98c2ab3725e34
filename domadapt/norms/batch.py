"""BatchNorm (Ioffe & Szegedy, 2015): y = (x - mu_B) / sqrt(var_B + eps) * gamma + beta, with the
batch moments mu_B, var_B in training and running estimates at test time."""

from torch import nn

from domadapt.norms.base import NormKind, register_norm


@register_norm
class BatchNorm(NormKind):
    name = "bn"
    layer_type = nn.BatchNorm2d
    help = "BatchNorm (the pretrained network as it is)"
    plot_marker, plot_shade = "o", 0.5
