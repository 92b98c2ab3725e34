"""Training methods as plug-ins (DomainBed-style): a method is an `nn.Module` that owns the model
and any extra modules (discriminators, ...), declares its hyper-parameters (a frozen dataclass,
`Hparams`) and computes one iteration's loss and statistics:

    out = method(x_s, y_s, x_t, step)      # StepOutput(loss, stats)

The trainer knows no method by name: it checkpoints `method.state_dict()` whole, gives the
parameters of `method.heads()` the head learning rate, and logs every statistic in `stats`.
A method is one module of `domadapt.methods` decorated with `@register_method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from domadapt.registry import NoHparams, Registry, make_hparams

if TYPE_CHECKING:
    from domadapt.models import DomainAdaptModel


class StepOutput(NamedTuple):
    """One iteration: the loss to back-propagate and detached scalar statistics."""

    loss: Tensor
    stats: dict[str, Tensor]


@dataclass(frozen=True)
class Step:
    """Where training is: `iteration` (0-based, the one being computed) of `total`."""

    iteration: int
    total: int

    @property
    def progress(self) -> float:
        """p = iteration / total in [0, 1)."""
        return self.iteration / self.total


def batch_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(1) == labels).float().mean()


class Method(nn.Module):
    """Base class. Subclasses set `name`, `help`, `uses_target` and (if any) `Hparams`, and
    implement `forward`. `self.model` is the backbone -> bottleneck -> classifier network."""

    name: ClassVar[str]
    help: ClassVar[str] = ""
    Hparams: ClassVar[type] = NoHparams
    uses_target: ClassVar[bool] = False  # does forward need a target batch?

    def __init__(self, model: DomainAdaptModel, hp: Any, *, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.hp = hp
        self.num_classes = num_classes

    def heads(self) -> list[nn.Module]:
        """Modules trained at the head learning rate: bottleneck, classifier and every extra
        module the method owns (all children but the model)."""
        extra = [m for name, m in self.named_children() if name != "model"]
        return [self.model.bottleneck, self.model.classifier, *extra]

    def forward(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None,
                step: Step) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register `cls` under `cls.name` (a name taken twice is an error)."""
    METHODS.register(cls.name, cls)
    return cls


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def method_hparams(name: str, values: dict[str, Any] | None = None) -> Any:
    return make_hparams(get_method(name).Hparams, values or {})


def build_method(name: str, model: DomainAdaptModel, options: dict[str, Any], *,
                 num_classes: int) -> Method:
    """The method `name` around `model`, with its hyper-parameters from `options`."""
    cls = get_method(name)
    return cls(model, method_hparams(name, options), num_classes=num_classes)


def supervised_loss(logits_s: Tensor, y_s: Tensor) -> Tensor:
    """Cross-entropy on labelled source images, in float32 (autocast-safe)."""
    return nn.functional.cross_entropy(logits_s.float(), y_s)


def stat(value: float | Tensor) -> Tensor:
    """A detached float32 scalar for StepOutput.stats."""
    return torch.as_tensor(value, dtype=torch.float32).detach()
