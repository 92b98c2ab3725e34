"""Name -> plug-in registries (methods, normalizations, backbones, validators, datasets,
presets, launchers) and the plug-ins' hyper-parameters.

A plug-in module registers itself when imported; each plug-in package imports all of its
modules (`import_submodules`), so adding a method, norm, backbone, validator, dataset, preset
or launcher is one new file.

Hyper-parameters of a plug-in are a frozen dataclass whose fields carry their help text
(`hparam(default, help)`). Every plug-in option is a flat command-line option
(`adv_weight` -> `--adv-weight`); two plug-ins may declare the same option only with the
same type, default and search distribution (e.g. DANN and CDAN share the GRL schedule).
`hparam(..., search=LogUniform(0.1, 10))` declares the distribution a hyper-parameter search
draws the option from (`domadapt.distributions`, `domadapt.hparam_search`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar, get_type_hints

from domadapt.errors import UserError

if TYPE_CHECKING:
    from domadapt.distributions import Distribution

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map that refuses duplicate names and names its choices on a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; choose from "
                            f"{', '.join(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        return self._items[name]  # KeyError; `get` is the one-line UserError for users

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._items.items()))


def import_submodules(package: str, path: list[str], first: tuple[str, ...] = ()) -> None:
    """Import every module of `package` (its registrations run on import): the modules named
    in `first` in that order (the built-ins, where their order is visible), then the others in
    the order of their names."""
    names = sorted(i.name for i in pkgutil.iter_modules(path) if not i.name.startswith("_"))
    for name in [*first, *(n for n in names if n not in first)]:
        importlib.import_module(f"{package}.{name}")


# -- hyper-parameters ---------------------------------------------------------------------------

def hparam(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           search: Distribution | None = None) -> Any:
    """A documented hyper-parameter field of a plug-in's Hparams dataclass; `search`: the
    distribution `sweep --n-hparams` draws it from (None: never searched)."""
    return field(default=default, metadata={"help": help, "choices": choices, "search": search})


@dataclass(frozen=True)
class NoHparams:
    """A plug-in without hyper-parameters."""


@dataclass(frozen=True)
class HparamSpec:
    """One option: name, type (bool | int | float | str), default, help, allowed values, search
    distribution."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    search: Distribution | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def hparam_specs(cls: type) -> list[HparamSpec]:
    """The options declared by an Hparams dataclass, in declaration order. A search
    distribution that cannot draw the option's values is a one-line UserError."""
    hints = get_type_hints(cls)
    specs = [HparamSpec(f.name, hints[f.name], f.default, f.metadata.get("help", ""),
                        f.metadata.get("choices"), f.metadata.get("search")) for f in fields(cls)]
    for spec in specs:
        if spec.search is not None:
            spec.search.check(spec.type, spec.flag, spec.choices)
    return specs


def coerce(spec: HparamSpec, value: Any) -> Any:
    """`value` as `spec.type` (ints accepted for floats), or a one-line UserError."""
    kind = spec.type
    ok = (isinstance(value, bool) if kind is bool
          else isinstance(value, kind) and not isinstance(value, bool)
          or (kind is float and isinstance(value, int) and not isinstance(value, bool)))
    if not ok:
        raise UserError(f"{spec.flag} must be a {kind.__name__}, got {value!r}")
    value = kind(value)
    if kind is float:
        check_finite(spec.flag, value)
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"{spec.flag}: unknown value {value!r}; choose from "
                        f"{', '.join(spec.choices)}")
    return value


def check_finite(flag: str, value: float) -> None:
    """UserError unless `value` is a finite number: every float option goes through here, so
    NaN or inf never reaches the range checks (NaN passes `x <= 0`) or training."""
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")


def make_hparams(cls: type[T], values: dict[str, Any]) -> T:
    """An instance of `cls` from `values` (missing -> defaults); unknown names -> UserError.
    The dataclass's own `__post_init__` validates ranges."""
    specs = {s.name: s for s in hparam_specs(cls)}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} for {cls.__qualname__}")
    return cls(**{k: coerce(specs[k], v) for k, v in values.items()})


def hparams_dict(hp: Any) -> dict[str, Any]:
    return dataclasses.asdict(hp)


def merged_specs(owners: list[tuple[str, type]], *, reserved: dict[str, str] | None = None
                 ) -> dict[str, tuple[HparamSpec, list[str]]]:
    """option name -> (spec, labels of the plug-ins that declare it). The same name declared
    twice must agree on type and default; a name in `reserved` (name -> what owns it, e.g. the
    core settings) may not be declared at all. A clash is a one-line UserError naming both."""
    out: dict[str, tuple[HparamSpec, list[str]]] = {}
    for label, cls in owners:
        for spec in hparam_specs(cls):
            if reserved and spec.name in reserved:
                raise UserError(f"option {spec.flag} of {label} clashes with "
                                f"{reserved[spec.name]} {spec.flag}; rename the option")
            if spec.name in out:
                seen, who = out[spec.name]
                if (seen.type, seen.default, seen.search) != (spec.type, spec.default,
                                                               spec.search):
                    raise UserError(
                        f"option {spec.flag} is declared differently by {who[0]} "
                        f"({_typed(seen)}) and {label} ({_typed(spec)}); plug-ins that share an "
                        f"option must agree on its type, default and search: rename one of them")
                who.append(label)
            else:
                out[spec.name] = (spec, [label])
    return out


def _typed(spec: HparamSpec) -> str:
    search = "" if spec.search is None else f", search {spec.search}"
    return f"{spec.type.__name__}, default {spec.default!r}{search}"
