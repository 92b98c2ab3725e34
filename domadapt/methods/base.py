"""Training methods as plug-ins (DomainBed-style): a method is an `nn.Module` that owns the model
and any extra modules (discriminators, ...), declares its hyper-parameters (a frozen dataclass,
`Hparams`) and computes one iteration's loss and statistics:

    out = method(x_s, y_s, x_t, step)      # StepOutput(loss, stats)

The trainer knows no method by name: it checkpoints `method.state_dict()` whole, gives the
parameters of `method.heads()` the head learning rate, and logs every statistic in `stats`.
A method is one module of `domadapt.methods` decorated with `@register_method`.

A method that owns its update (several optimizers, alternating steps: MCD, ADDA) sets
`owns_update = True` and implements two hooks instead of `forward`:

    optimizers = method.build_optimizers(sgd)   # once: {name: sgd(backbone=[...], heads=[...])}
    stats = method.update(x_s, y_s, x_t, step, opt)   # every iteration; opt(name, loss) = one step

`sgd` builds an SGD with the run's rules (lr0 x schedule x group multiplier, backbone
multiplier, the norm's special parameters in their own groups without weight decay and
clamped after every step); the trainer sets every optimizer's lr each iteration and keeps
every optimizer's state in the checkpoint. `opt(name, loss)` (or `opt((name, ...), loss)`)
zeroes those optimizers' gradients, back-propagates `loss` once (refusing a non-finite one) and
steps each of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from domadapt.registry import NoHparams, Registry, make_hparams

if TYPE_CHECKING:
    from domadapt.nn.model import DomainAdaptModel


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
    owns_update: ClassVar[bool] = False  # True: build_optimizers + update instead of forward

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

    def build_optimizers(self, sgd: SGDFactory) -> dict[str, torch.optim.Optimizer]:
        """owns_update only: the method's optimizers by name, each built with `sgd`."""
        raise NotImplementedError(f"{self.name}: owns_update needs build_optimizers")

    def update(self, x_s: Tensor, y_s: Tensor, x_t: Tensor | None, step: Step,
               opt: StepFn) -> dict[str, Tensor]:
        """owns_update only: one iteration's optimisation steps (each `opt(name, loss)`);
        returns detached scalar statistics, as `StepOutput.stats`."""
        raise NotImplementedError(f"{self.name}: owns_update needs update")


class SGDFactory(Protocol):
    """`sgd(backbone=[modules], heads=[modules])`: an SGD over those modules' trainable
    parameters with the run's learning-rate, weight-decay and special-parameter rules
    (backbone modules at `backbone_lr_mult` x lr0, heads at lr0)."""

    def __call__(self, *, backbone: Sequence[nn.Module] = (),
                 heads: Sequence[nn.Module] = ()) -> torch.optim.Optimizer: ...


# opt(names, loss): zero the named optimizer(s)' gradients, back-propagate `loss` once, step each
StepFn = Callable[[str | Sequence[str], Tensor], None]


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
