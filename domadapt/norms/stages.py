"""Where a network's stages are, for the norm kinds that act on "the first stages" (IBN, MixStyle).

A stage is a run of blocks at one spatial resolution; the stem before the first stage is not
part of any stage. Two families are recognised from the module structure:

- ResNet-like (torchvision resnet*, resnext*, wide_resnet*; timm resnets): the children
  `layer1` .. `layer4`, each a sequence of residual blocks (stem: conv1/bn1).
- `features`-like (torchvision mobilenet_v2, vgg*_bn, efficientnet*, ...; `digitnet`): the
  children of the `features` Sequential, a new stage starting at every child that downsamples
  (a conv or pooling layer of stride > 1). MobileNetV2 thus has 5 stages of 16, 24, 32, 64-96
  and 160-320(-1280) channels; digitnet 3 (its conv-BN-ReLU units at 32, 16 and 8 px). A first
  child holding a norm layer that is followed by others is the stem (MobileNetV2's conv-BN-ReLU).

Anything else is refused in one line: say where its stages are by adding a family here.
"""

from __future__ import annotations

from torch import nn

from domadapt.errors import UserError
from domadapt.norms.base import NORMS


def is_norm(module: nn.Module) -> bool:
    """A 2-d norm layer of a registered kind."""
    return isinstance(module, tuple(kind.layer_type for _, kind in NORMS.items()))


def has_norm(module: nn.Module) -> bool:
    return any(is_norm(m) for m in module.modules())


def _downsamples(module: nn.Module) -> bool:
    for m in module.modules():
        stride = getattr(m, "stride", 1) if isinstance(
            m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) else 1
        stride = stride if isinstance(stride, int) else max(stride)
        if stride > 1:
            return True
    return False


def stages(model: nn.Module, kind: str) -> list[list[tuple[str, nn.Module]]]:
    """The stages of `model` that hold norm layers, in forward order, each a list of
    (qualified name, block) of its blocks (`features`-like: its children, norm layers or not).
    `kind` names the asking norm in the one-line refusal."""
    if all(isinstance(getattr(model, f"layer{i}", None), nn.Sequential) for i in range(1, 5)):
        return [[(f"layer{i}.{n}", b) for n, b in getattr(model, f"layer{i}").named_children()]
                for i in range(1, 5)]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        children = list(features.named_children())
        if len(children) > 1 and has_norm(children[0][1]):
            children = children[1:]  # the stem
        out: list[list[tuple[str, nn.Module]]] = []
        for n, child in children:
            if not out or _downsamples(child):
                out.append([])
            out[-1].append((f"features.{n}", child))
        return [s for s in out if any(has_norm(b) for _, b in s)]
    raise UserError(f"--norm {kind}: cannot tell the stages of a {type(model).__name__} (neither "
                    f"layer1..layer4 nor a features Sequential); see domadapt/norms/stages.py")


def first_norm(block: nn.Module, prefix: str) -> str:
    """The qualified name of the first norm layer of `block` (module order; a ResNet block's
    bn1, a MobileNetV2 block's expansion BN)."""
    for name, m in block.named_modules():
        if is_norm(m):
            return f"{prefix}.{name}" if name else prefix
    raise ValueError(f"{prefix} holds no norm layer")
