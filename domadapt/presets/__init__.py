"""Presets (`--preset NAME`): named overrides of the RunConfig defaults, one module per family
of presets, each registering its presets in `PRESETS` when imported (every module of this
package is; `base` holds the registry). A new preset is one new file here. Built in, in this
order: officehome, officehome-ganin (officehome.py), pacs-cpu (pacs.py), styledigits."""

from domadapt.registry import import_submodules

import_submodules(__name__, __path__, first=("officehome", "pacs", "styledigits"))

from domadapt.presets.base import PRESETS, preset_overrides, register_preset

__all__ = ["PRESETS", "preset_overrides", "register_preset"]
