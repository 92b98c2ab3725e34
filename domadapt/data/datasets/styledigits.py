"""`styledigits`, the embedded default: scikit-learn's digits rendered in 4 styles, generated
on demand into the cache folder (`domadapt.data.styledigits`)."""

from __future__ import annotations

from pathlib import Path

from domadapt.data import styledigits
from domadapt.data.registry import DatasetSpec, Domain, register_dataset
from domadapt.io import cache_dir


def _materialize() -> Path:
    return styledigits.ensure_styledigits(cache_dir())


STYLEDIGITS = register_dataset(DatasetSpec(
    name="styledigits",
    description="embedded default: sklearn digits rendered in 4 styles, generated on demand",
    domains=tuple(Domain(s.name, s.short, styledigits.NUM_IMAGES) for s in styledigits.STYLES),
    classes=styledigits.CLASSES,
    hflip=False,
    materialize=_materialize,
))
