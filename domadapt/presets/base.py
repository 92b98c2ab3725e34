"""The preset registry: a preset is a name for a set of overrides of the RunConfig defaults
(core fields and plug-in options alike, flat: `{"iters": 300, "adv_weight": 0.3}`), applied
before the options given on the command line (`domadapt.config.make_config`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from domadapt.registry import Registry

__all__ = ["PRESETS", "preset_overrides", "register_preset"]

# name -> read-only overrides; the CLI's --preset help and completion read it. A name the
# overrides do not declare (no core field, no plug-in option) is refused when the preset is
# used, in one line (`config.route_options`).
PRESETS: Registry[Mapping[str, Any]] = Registry("preset")


def register_preset(name: str, overrides: Mapping[str, Any]) -> Mapping[str, Any]:
    """Register `overrides` as the preset `name` (twice: ValueError)."""
    if not all(isinstance(k, str) for k in overrides):
        raise ValueError(f"preset {name!r}: option names must be strings")
    return PRESETS.register(name, MappingProxyType(dict(overrides)))


def preset_overrides(name: str | None) -> dict[str, Any]:
    """A copy of preset `name`'s overrides ({} for None); unknown name: UserError naming the
    choices."""
    if name is None:
        return {}
    return dict(PRESETS.get(name))
