"""InstanceNorm (Ulyanov et al., 2016): y = (x - mu_nc) / sqrt(var_nc + eps) * gamma + beta, with the
moments of each sample and channel, in training and at test time (no running statistics)."""

from torch import nn

from domadapt.norms.base import NormKind, register_norm


@register_norm
class InstanceNorm(NormKind):
    name = "in"
    layer_type = nn.InstanceNorm2d
    tracks_running_stats = False
    help = "InstanceNorm (affine carried from BN, no running statistics)"
    plot_marker, plot_shade = "^", 0.7
