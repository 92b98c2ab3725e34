"""Normalization kinds as plug-ins: how a kind is built from a 2-d norm layer (carrying affine
and running statistics), which of its parameters follow a special optimizer rule, and which
diagnostics it reports.

    convert_norm(model, "bin", {"gate_lr_mult": 10.0})   # every BN / IN / BIN layer -> BIN

A kind lives in one module of `domadapt.norms` that calls `register_norm(...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn

from domadapt.errors import UserError
from domadapt.nn.bin_fusion import FusedActivation, unfuse_activations
from domadapt.registry import NoHparams, Registry, make_hparams


@dataclass(frozen=True)
class SpecialParams:
    """Parameters that take their own optimizer group in every part of the network.

    lr = lr0 * lr_mult * schedule              (relative=False: the base learning rate)
    lr = lr0 * layer_mult * lr_mult * schedule (relative=True: the lr of the layer they sit in)
    no weight decay; after every step each entry is clamped to `clamp` (lo, hi) if given.
    `label` names the groups (`backbone/<label>`) and the log column (`<label>_lr`).
    """

    label: str
    params: tuple[nn.Parameter, ...]
    lr_mult: float
    relative: bool
    clamp: tuple[float, float] | None = None


class NormKind:
    """One normalization kind. Subclasses set `name`, `layer_type` and, if they have any,
    `Hparams`; override `special_params` and `diagnostics` where the kind has them."""

    name: ClassVar[str]
    layer_type: ClassVar[type[nn.Module]]
    Hparams: ClassVar[type] = NoHparams
    help: ClassVar[str] = ""
    # Its look in figures (`domadapt.plots`): a matplotlib marker, and the shade of the
    # method's colour (0 light .. 1 dark). None: derived from the registry order.
    plot_marker: ClassVar[str | None] = None
    plot_shade: ClassVar[float | None] = None

    def build(self, old: nn.Module, hp: Any) -> nn.Module:
        """A new layer of this kind in place of `old` (`make_layer`), carrying `old`'s affine
        weight and bias, running statistics and num_batches_tracked wherever the new layer has
        them with the same shape, and `old`'s device, dtype, requires_grad and train/eval
        mode. `hp`: this kind's resolved options."""
        ref = next(iter(old.parameters()), None)
        if ref is None:
            ref = next(iter(old.buffers()), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        new = self.make_layer(old, hp, factory)
        with torch.no_grad():
            for name in ("weight", "bias"):
                src, dst = getattr(old, name, None), getattr(new, name, None)
                if _carries(src, dst):
                    dst.copy_(src)
                    dst.requires_grad_(src.requires_grad)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(old, name, None), getattr(new, name, None)
                if _carries(src, dst):
                    dst.copy_(src)
        return new.train(old.training)

    def convert(self, model: nn.Module, hp: Any) -> nn.Module:
        """Replace the norm layers of `model` (in place; returns `model`, or the new layer when
        `model` is itself a norm layer). Default: every 2-d norm layer not already of this kind
        is `build`-ed. Override where the layer depends on its place in the network (IBN: some
        stages only) or the kind adds modules (MixStyle); `domadapt.norms.stages` locates the
        stages and `convert_layers` does the replacing."""
        return convert_layers(model, lambda name: (self, hp))

    def make_layer(self, old: nn.Module, hp: Any, factory: dict[str, Any]) -> nn.Module:
        """The new layer, before anything is carried over. Default: `layer_type` constructed
        like nn.BatchNorm2d from `old`'s num_features, eps, momentum and affine. Override to
        build any other layer (e.g. nn.GroupNorm(hp.groups, channels(old), ...)); `factory`
        holds the device and dtype to build on."""
        track = self.tracks_running_stats and (
            getattr(old, "track_running_stats", False) or isinstance(old, nn.InstanceNorm2d))
        return self.layer_type(old.num_features, eps=old.eps, momentum=old.momentum,
                               affine=old.affine, track_running_stats=track, **factory)

    tracks_running_stats: ClassVar[bool] = True  # IN: False (always each sample's own moments)
    # True: the layers read each sample's domain (`domadapt.nn.domains`); such a kind runs only
    # where every training image has a known domain (`domadapt.settings.check_domains_defined`)
    needs_domains: ClassVar[bool] = False

    def special_params(self, model: nn.Module, hp: Any) -> SpecialParams | None:
        """This kind's parameters that need their own optimizer rule (None: none)."""
        return None

    def diagnostics(self, model: nn.Module) -> dict[str, float | None]:
        """Scalars logged at every evaluation and kept in metrics.json (e.g. the mean gate)."""
        return {}

    def diagnostic_names(self) -> tuple[str, ...]:
        return ()

    def records(self, model: nn.Module) -> dict[str, pd.DataFrame]:
        """Tables written into the run directory when training ends (file name -> table),
        e.g. BIN's gates per layer; committed with the run records."""
        return {}


def _carries(src: Any, dst: Any) -> bool:
    """Whether tensor `src` can be copied into `dst` (both present, same shape)."""
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
            and src.shape == dst.shape)


def channels(layer: nn.Module) -> int:
    """The channel count of a 2-d norm layer (BatchNorm/InstanceNorm: num_features;
    GroupNorm: num_channels)."""
    return int(getattr(layer, "num_features", None) or layer.num_channels)


NORMS: Registry[NormKind] = Registry("norm")


def register_norm(kind: type[NormKind]) -> type[NormKind]:
    """Class decorator: register one instance of `kind` under `kind.name`."""
    NORMS.register(kind.name, kind())
    return kind


def get_norm(name: str) -> NormKind:
    return NORMS.get(name)


def norm_hparams(name: str, values: dict[str, Any] | None = None) -> Any:
    return make_hparams(get_norm(name).Hparams, values or {})


def _norm_types() -> tuple[type[nn.Module], ...]:
    return tuple(kind.layer_type for _, kind in NORMS.items())


def _wrapped(old: nn.Module, new: nn.Module, kind: str) -> nn.Module:
    """Keep what a subclass of a norm layer does after normalizing (timm's BatchNormAct2d:
    dropout, then activation), or refuse in one line when that is unknown."""
    fused = getattr(old, "activation", "none")  # a lone BIN layer with an activation fused
    if fused != "none" and not isinstance(new, type(old)):
        return nn.Sequential(new, FusedActivation(fused, inplace=True).restored())
    if type(old) in _norm_types():
        return new
    drop, act = getattr(old, "drop", None), getattr(old, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return nn.Sequential(new, drop, act)
    raise UserError(f"cannot convert {type(old).__name__} to --norm {kind}: it is a subclass of "
                    f"a norm layer whose extra behaviour would be lost")


def convert_norm(model: nn.Module, kind: str, options: dict[str, Any] | None = None) -> nn.Module:
    """Replace, in place, the 2-d norm layers of a registered kind by `kind`, built with the
    kind's `options` (its Hparams fields; missing ones take their defaults): `NormKind.convert`,
    by default every such layer.

    Layers already of `kind` (or a subclass) are kept, so converting twice is a no-op; BN ->
    BIN leaves a network's outputs unchanged in train and eval mode; BIN -> BN drops rho.
    Activations fused into BIN layers (`domadapt.nn.bin_fusion`) are put back as modules
    first (fuse again after converting). Returns `model`, or the new layer when `model` is
    itself a norm layer.
    """
    unfuse_activations(model)
    target = get_norm(kind)
    return target.convert(model, norm_hparams(kind, options))


def convert_layers(model: nn.Module,
                   choose: Callable[[str], tuple[NormKind, Any]]) -> nn.Module:
    """Replace every outermost 2-d norm layer of `model` (qualified name `name`) by
    `kind.build(layer, hp)` for `(kind, hp) = choose(name)`, keeping a layer already of that
    kind; a norm layer's own children are not visited. Returns `model`, or the new layer when
    `model` is itself a norm layer."""
    return _convert(model, "", choose)


def _convert(model: nn.Module, name: str,
             choose: Callable[[str], tuple[NormKind, Any]]) -> nn.Module:
    if isinstance(model, _norm_types()):
        target, hp = choose(name)
        if isinstance(model, target.layer_type):
            return model
        return _wrapped(model, target.build(model, hp), target.name)
    for child_name, child in model.named_children():
        converted = _convert(child, f"{name}.{child_name}" if name else child_name, choose)
        if converted is not child:
            setattr(model, child_name, converted)
    return model


def count_norm_layers(model: nn.Module) -> int:
    return sum(isinstance(m, _norm_types()) for m in model.modules())


def norm_names() -> tuple[str, ...]:
    return NORMS.names()


def all_params(modules: Iterable[nn.Module], layer_type: type[nn.Module],
               attr: str) -> tuple[nn.Parameter, ...]:
    """Parameter `attr` of every `layer_type` layer inside `modules`, each once, in order."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for layer in m.modules():
            if isinstance(layer, layer_type):
                p = getattr(layer, attr)
                seen.setdefault(id(p), p)
    return tuple(seen.values())
