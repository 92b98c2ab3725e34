"""Norm + activation in one pass: a ReLU or ReLU6 that directly follows a BIN layer in an
`nn.Sequential` (torchvision's Conv2dNormActivation in MobileNetV2, VGG-BN's features,
digitnet's blocks) is applied by the BIN layer itself, in the pass that writes its output,
and its gradient is masked in the passes that read it (`domadapt.nn.bin_function`): one read
and one write of every activation fewer each way, with the bits of the two modules run one
after the other (tests/test_bin_fusion.py).

    fuse_activations(model)     # Sequential(conv, BIN, ReLU6) -> Sequential(conv, BIN[relu6], FusedActivation)
    unfuse_activations(model)   # and back

The fusion is visible: the BIN layer's repr says `activation=relu6`, and a `FusedActivation`
(an identity) stands where the activation module stood, so indices, names and state-dict keys
do not move. A run's model is fused when it is built (`domadapt.models.build_model`);
`convert_norm` puts the activations back before it converts, so converting a fused network
to another norm keeps its activations.

ResNet is not fused: its activations are calls in the forward code (`ResNet.forward`'s stem,
`BasicBlock.forward`, `Bottleneck.forward`), one ReLU module called after several norms and
after the residual addition, not modules after a norm in a Sequential. Fusing them needs the
blocks rewritten (an FX trace of each block, the `bn -> relu` call pairs replaced), which turns
every block into a GraphModule: another type and repr for code and hooks that look for
torchvision's blocks (MixStyle, IBN's stages), for two of the three activations per block
(the one after the addition cannot join a norm). Left out until a measurement says it pays.
"""

from __future__ import annotations

from itertools import pairwise

from torch import nn

from domadapt.nn.bin import BatchInstanceNorm2d

FUSABLE: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_MODULES = {name: kind for kind, name in FUSABLE.items()}


class FusedActivation(nn.Identity):
    """Where an activation stood before the BIN layer in front of it took it over (its
    `activation`): passes its input through. `unfuse_activations` puts the module back."""

    def __init__(self, activation: str, inplace: bool) -> None:
        super().__init__()
        self.activation, self.inplace = activation, inplace

    def extra_repr(self) -> str:
        return f"{self.activation}, applied by the norm layer before"

    def restored(self) -> nn.Module:
        return _MODULES[self.activation](inplace=self.inplace)


def fuse_activations(model: nn.Module) -> int:
    """Fuse, in place, every ReLU / ReLU6 module that directly follows a BIN layer (without an
    activation yet) in an `nn.Sequential` of `model`; returns how many were fused."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for before, name in pairwise(names):
            norm, act = seq._modules[before], seq._modules[name]
            if (isinstance(norm, BatchInstanceNorm2d) and norm.activation == "none"
                    and type(act) in FUSABLE):
                norm.activation = FUSABLE[type(act)]
                seq._modules[name] = FusedActivation(norm.activation, act.inplace)
                fused += 1
    return fused


def unfuse_activations(model: nn.Module) -> int:
    """Undo `fuse_activations` in place: each FusedActivation becomes its module again and the
    BIN layer before it stops applying it; returns how many were put back."""
    restored = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for before, name in pairwise(names):
            norm, placeholder = seq._modules[before], seq._modules[name]
            if isinstance(placeholder, FusedActivation) and isinstance(norm, BatchInstanceNorm2d):
                norm.activation = "none"
                seq._modules[name] = placeholder.restored()
                restored += 1
    return restored
