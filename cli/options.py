"""Command-line options generated from the one declaration of every setting: RunConfig's fields
and the plug-ins' hyper-parameters (`domadapt.config.core_fields`, `plugin_options`).

`@config_options(exclude=...)` adds one `--option` per setting to a typer command; the command
receives them as `options` (None = not given: the preset's value, else the default, applies).
Each option's help shows its default.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from domadapt.backbones import BACKBONES, FAMILIES
from domadapt.config import SETTING_DEFAULTS, core_fields, plugin_options
from domadapt.data import DATASETS
from domadapt.errors import UsageError, UserError
from domadapt.methods import METHODS
from domadapt.norms import NORMS
from domadapt.presets import PRESETS
from domadapt.selection import RULES
from domadapt.sweep.launchers import LAUNCHERS

PANEL_PLUGINS = "Method / norm options"


# What the shell completes for an option, by the registry its value names (`--methods bn,b`
# completes the last item of a comma list).
REGISTRY_NAMES: dict[str, Callable[[], Iterable[str]]] = {
    "method": METHODS.names,
    "norm": NORMS.names,
    "backbone": lambda: [*BACKBONES.names(), *(f"{f}:" for f in FAMILIES.names())],
    "dataset": DATASETS.names,
    "preset": PRESETS.names,
    "launcher": LAUNCHERS.names,
    "rule": lambda: RULES,
}


def complete(registry: str) -> Callable[[str], list[str]]:
    """Shell completion of names from `registry` (a key of REGISTRY_NAMES)."""

    def names(incomplete: str) -> list[str]:
        head, comma, last = incomplete.rpartition(",")
        return [f"{head}{comma}{n}" for n in REGISTRY_NAMES[registry]() if n.startswith(last)]

    return names


def option(*names: str, help: str, panel: str = "Run", default: str | bool = True,
           registry: str | None = None, **kw: Any) -> Any:
    """A typer option in a help panel; `default`: the text shown as its default (True: the
    parameter's own default); `registry`: complete its value from that registry's names."""
    if registry is not None:
        kw["autocompletion"] = complete(registry)
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=default, **kw)


def _flag(name: str, kind: type) -> tuple[str, ...]:
    flag = "--" + name.replace("_", "-")
    return (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)


def _parameter(name: str, kind: Any, help: str, default: Any, panel: str) -> inspect.Parameter:
    shown = "none" if default is None else str(default).lower() if kind is bool else str(default)
    base = bool if kind is bool else int if kind is int else float if kind is float else str
    annotation = Annotated[base | None, option(
        *_flag(name, base), help=help, panel=panel, default=shown,
        registry=name if name in REGISTRY_NAMES else None)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=annotation)


def _field_type(annotation: Any) -> type:
    text = str(annotation)
    for kind in (bool, int, float):
        if text.startswith(kind.__name__):
            return kind
    return str


def config_parameters(exclude: set[str], setting: str | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per RunConfig field and plug-in option not in `exclude`; the
    defaults shown are `setting`'s (`config.SETTING_DEFAULTS`) where it has its own."""
    own = SETTING_DEFAULTS.get(setting or "", {})
    params = [_parameter(f.name, _field_type(f.type), f.metadata["help"],
                         own.get(f.name, f.default), f.metadata["panel"])
              for f in core_fields() if f.metadata.get("cli", True) and f.name not in exclude]
    for name, (spec, owners) in plugin_options().items():
        if name not in exclude:
            params.append(_parameter(name, spec.type, f"{spec.help} ({', '.join(owners)})",
                                     spec.default, PANEL_PLUGINS))
    return params


def config_options(exclude: tuple[str, ...] = (), setting: str | None = None
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command gets every setting as an option, collected into `options`
    (`setting`: the command's, whose own defaults its help shows)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "options"]
        extra = config_parameters(set(exclude) | {p.name for p in own}, setting)
        names = {p.name for p in extra}

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return fn(**kwargs, options=options)

        wrapper.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}
        return wrapper

    return decorate


@contextmanager
def usage_errors() -> Iterator[None]:
    """A UserError raised inside (reading the options: config, grid, launcher) is a usage
    error, exit code 2; one raised later, while the work runs, exits with 1."""
    try:
        yield
    except UsageError:
        raise
    except UserError as e:
        raise UsageError(str(e)) from None
