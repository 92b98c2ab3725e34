"""`folder`: any <root>/<domain>/<class>/<image> tree, its domains and classes read from the
folder names (`DatasetSpec` with domains and classes None)."""

from __future__ import annotations

from domadapt.data.registry import DatasetSpec, register_dataset

FOLDER = register_dataset(DatasetSpec(
    name="folder",
    description="any <root>/<domain>/<class>/<image> tree (domains and classes from folders)",
))
