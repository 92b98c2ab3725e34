"""Dataset descriptors: domains (full and short names), classes, expected counts, root lookup.

Every dataset lives on disk as ``<root>/<domain>/<class>/<image>``. The descriptors are in
`DATASETS`, one module each in `domadapt.data.datasets`. A descriptor either fixes
its domains and classes (``officehome``, ``pacs``, ``styledigits``) or discovers them from the
root (``folder``: every sub-folder of the root is a domain, every sub-sub-folder a class; the
reserved ``manifests/`` folder and what archive tools and notebooks leave behind -- hidden
entries such as ``.ipynb_checkpoints/`` or ``.DS_Store`` and macOS's ``__MACOSX/`` -- are skipped,
see `is_skipped` and `skipped_entries`). Labels are indices into the sorted
class list. Domain names are accepted by full or short name, case-insensitively.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from domadapt.errors import UserError
from domadapt.registry import Registry

MANIFEST_DIRNAME = "manifests"
# Not data, skipped: archive tools' leftovers and the folder fsck keeps at a filesystem's root.
ARCHIVE_LEFTOVERS = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "lost+found"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})  # what an image file is


def is_skipped(name: str) -> bool:
    """True for an entry that is never a domain, class or image: a hidden one (`.DS_Store`,
    `.ipynb_checkpoints`, macOS's `._*` resource forks) or an archive tool's leftover
    (`__MACOSX`, `Thumbs.db`, `desktop.ini`, `lost+found`)."""
    return name.startswith(".") or name in ARCHIVE_LEFTOVERS


@dataclass(frozen=True)
class Domain:
    """One domain: its canonical (folder) name, short name and expected image count."""

    name: str
    short: str
    expected: int | None = None
    aliases: tuple[str, ...] = ()  # other folder names accepted on disk, e.g. "Real World"


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset descriptor. `domains`/`classes` of None mean: discovered from the root."""

    name: str
    description: str
    domains: tuple[Domain, ...] | None = None
    classes: tuple[str, ...] | None = None
    hflip: bool = True  # whether horizontal flips are label-preserving (not for digits)
    materialize: Callable[[], Path] | None = None  # builds the data on demand, returns its root

    # -- domains ---------------------------------------------------------------------------
    def domain_list(self, root: str | Path | None) -> list[Domain]:
        """The domains in canonical order (discovered from `root` for `folder`)."""
        if self.domains is not None:
            return list(self.domains)
        return _discover_domains(_need_root(self, root))

    def domain_names(self, root: str | Path | None) -> list[str]:
        return [d.name for d in self.domain_list(root)]

    def domain(self, name: str, root: str | Path | None) -> Domain:
        """The domain called `name` (full or short, any case); UserError if there is none."""
        domains = self.domain_list(root)
        key = name.strip().lower()
        for attr in ("name", "short"):
            for d in domains:
                if getattr(d, attr).lower() == key:
                    return d
        choices = ", ".join(f"{d.name} ({d.short})" for d in domains)
        raise UserError(f"unknown domain {name!r} for dataset {self.name}; choose from {choices}")

    def resolve_domain(self, name: str, root: str | Path | None) -> str:
        """Full name of the domain called `name` (full or short, any case)."""
        return self.domain(name, root).name

    def short_name(self, domain: str, root: str | Path | None) -> str:
        return self.domain(domain, root).short

    def tasks(self, root: str | Path | None) -> list[tuple[str, str]]:
        """All ordered (source, target) pairs, source != target, in domain order."""
        names = self.domain_names(root)
        return [(s, t) for s in names for t in names if s != t]

    def domain_dir(self, root: str | Path, domain: str) -> Path:
        """The folder of `domain` under `root` (its name or an alias); UserError if missing."""
        d = self.domain(domain, root)
        for folder in (d.name, *d.aliases):
            if (Path(root) / folder).is_dir():
                return Path(root) / folder
        raise UserError(f"missing domain folder: {Path(root) / d.name} (dataset {self.name})")

    # -- classes ---------------------------------------------------------------------------
    def class_names(self, root: str | Path | None) -> list[str]:
        """Sorted class names; label i is class_names[i].

        For `folder`, read from the root and checked to be identical in every domain.
        """
        if self.classes is not None:
            return list(self.classes)
        root = _need_root(self, root)
        per_domain = {d.name: class_folders(root / d.name) for d in _discover_domains(root)}
        union = sorted(set().union(*per_domain.values()))
        for name, found in per_domain.items():
            if missing := sorted(set(union) - set(found)):
                raise UserError(
                    f"class folders differ between domains: {root / name} lacks "
                    f"{quote_few(missing)} (present in other domains)"
                )
        if not union:
            raise UserError(f"no class folders in the domains of {root}")
        return union


def class_folders(domain_dir: Path) -> list[str]:
    """Sorted names of the visible sub-folders of a domain folder."""
    return sorted(p.name for p in domain_dir.iterdir() if p.is_dir() and not is_skipped(p.name))


def skipped_entries(spec: DatasetSpec, root: str | Path,
                    domains: list[str] | None = None) -> list[Path]:
    """The entries passed over at the dataset root, in the domain folders and in their class
    folders (of `domains`, default all), sorted: what `data check` lists. In a class folder
    that is also every file without an image extension (`.webp`, `.tif`, `.gif`, ...)."""
    root = Path(root)
    found = [p for p in root.iterdir() if is_skipped(p.name)]
    for name in domains or spec.domain_names(root):
        folder = spec.domain_dir(root, name)
        found += [p for p in folder.iterdir() if is_skipped(p.name)]
        found += [p for c in class_folders(folder) for p in (folder / c).iterdir()
                  if is_skipped(p.name) or p.suffix.lower() not in IMAGE_EXTENSIONS]
    return sorted(found)


def check_outside_root(out: str | Path, root: str | Path, option: str = "--out") -> None:
    """UserError when `out` lies in the dataset `root` (where it would be read as a domain or
    a class and break the dataset), except in the root's own manifests/ folder."""
    out_r, root_r = Path(out).expanduser().resolve(), Path(root).expanduser().resolve()
    if out_r.is_relative_to(root_r) and not out_r.is_relative_to(root_r / MANIFEST_DIRNAME):
        raise UserError(f"{option} {out} lies inside the dataset root {root}, where it would "
                        f"be read as data; choose a folder outside it")


def derive_short_names(names: list[str]) -> list[str]:
    """Shortest case-insensitively unique prefixes, first letter upper-cased (Art -> A)."""
    lowered = [n.lower() for n in names]
    shorts = []
    for i, n in enumerate(lowered):
        k = 1
        while k < len(n) and any(o[:k] == n[:k] for j, o in enumerate(lowered) if j != i):
            k += 1
        s = names[i][:k]
        shorts.append(s[:1].upper() + s[1:])
    return shorts


def _discover_domains(root: Path) -> list[Domain]:
    names = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not is_skipped(p.name) and p.name != MANIFEST_DIRNAME
    )
    if not names:
        raise UserError(f"no domain folders in {root}")
    seen: dict[str, str] = {}
    for n in names:
        if n.lower() in seen:
            raise UserError(
                f"domain folders differ only by case: {root / seen[n.lower()]} and {root / n}"
            )
        seen[n.lower()] = n
    return [Domain(n, s) for n, s in zip(names, derive_short_names(names))]


def _need_root(spec: DatasetSpec, root: str | Path | None) -> Path:
    if root is None:
        raise UserError(f"dataset {spec.name} needs --root (its domains are read from the folder)")
    return Path(root)


def quote_few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


# name -> descriptor. One module per dataset in `domadapt.data.datasets` registers its
# descriptor when imported (`register_dataset`); the CLI's --dataset help and completion read it.
DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register `spec` under its (lower-case) name; twice: ValueError."""
    if spec.name != spec.name.strip().lower():
        raise ValueError(f"dataset name {spec.name!r}: use lower case, no surrounding spaces")
    return DATASETS.register(spec.name, spec)


def list_datasets() -> list[DatasetSpec]:
    return [spec for _, spec in DATASETS.items()]


def get_dataset(name: str) -> DatasetSpec:
    """The descriptor called `name` (any case); UserError naming the choices otherwise."""
    key = name.strip().lower()
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS.names())}")
    return DATASETS.get(key)


def resolve_root(spec: DatasetSpec, root: str | Path | None) -> Path:
    """The dataset's root folder, absolute and without `..` (symlinks are kept as given).

    With `root=None` a generated dataset (styledigits) is built on demand in the cache folder;
    any other dataset needs an existing `root`.
    """
    if root is None:
        if spec.materialize is None:
            raise UserError(f"dataset {spec.name} needs --root (the folder holding its domains)")
        return spec.materialize()
    path = Path(os.path.abspath(Path(root).expanduser()))
    if not path.is_dir():
        raise UserError(f"dataset root not found: {path}")
    return path
