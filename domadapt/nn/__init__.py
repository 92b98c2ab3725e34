"""Neural-network building blocks: the BIN layer, DANN blocks, optimizer helpers."""

from domadapt.nn.bin import (
    GATE_HIGH,
    GATE_LOW,
    BatchInstanceNorm2d,
    batch_instance_norm,
    gate_fraction_below,
    gate_parameters,
    gate_values,
    mean_gate,
)
from domadapt.nn.grl import GradientReversal, grad_reverse
from domadapt.nn.heads import (
    Bottleneck,
    DomainDiscriminator,
    domain_accuracy,
    domain_adversarial_loss,
)
from domadapt.nn.optim import (
    attach_clamp,
    build_sgd,
    clamped_groups,
    param_groups,
    set_lr,
)

__all__ = [
    "GATE_HIGH",
    "GATE_LOW",
    "BatchInstanceNorm2d",
    "Bottleneck",
    "DomainDiscriminator",
    "GradientReversal",
    "attach_clamp",
    "batch_instance_norm",
    "build_sgd",
    "clamped_groups",
    "domain_accuracy",
    "domain_adversarial_loss",
    "gate_fraction_below",
    "gate_parameters",
    "gate_values",
    "grad_reverse",
    "mean_gate",
    "param_groups",
    "set_lr",
]
