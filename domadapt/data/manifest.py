"""Image lists of a domain: folder scans, manifest files, train/test splits.

Manifest format (``<manifest_dir>/<Domain>.txt``): one image per line, ``<relative/path> <label>``,
sorted by path. The path is relative to the dataset root, uses ``/`` and may contain spaces: a
line is split at its LAST space (the label is an integer). ``label`` indexes the sorted class
list, stored beside the manifests as ``classes.txt`` (one name per line, in label order).

Where manifests are read from: the ``manifest_dir`` argument (CLI ``--manifest-dir``) when given,
else ``<root>/manifests/`` when that folder exists (``domadapt data manifest`` writes there by
default), else nothing: the domain folder is scanned. A domain without its own ``<Domain>.txt``
in the manifest folder is scanned too. A manifest freezes the file list: images added later
are ignored until it is rebuilt.

Stored splits (``domadapt data split``) live in ``<manifest_dir>/splits/seed<S>-test<F>/`` as
``<Domain>.train.txt`` and ``<Domain>.test.txt`` (same line format). They are used for exactly
that seed and test fraction; any other split is computed on the fly by `split_items`, which
gives the same result.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from domadapt.data.registry import (
    IMAGE_EXTENSIONS,
    MANIFEST_DIRNAME,
    DatasetSpec,
    check_outside_root,
    class_folders,
    is_skipped,
    quote_few,
)
from domadapt.errors import UserError
from domadapt.io import atomic_write_text

Items = list[tuple[Path, int]]
Split = Literal["train", "test"]


# -- scanning ----------------------------------------------------------------------------------
def is_image(path: Path) -> bool:
    """A file with an image extension (any case) that `is_skipped` keeps (not `._x.jpg`)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_skipped(path.name)


def scan_domain(spec: DatasetSpec, root: Path, domain: str) -> Items:
    """(path, label) of every image in ``<root>/<domain>/<class>/``, sorted by relative path.

    The domain's class folders must be exactly the dataset's classes.
    """
    folder = spec.domain_dir(root, domain)
    classes = spec.class_names(root)
    found = class_folders(folder)
    if found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        parts = ([f"missing {quote_few(missing)}"] if missing else []) + (
            [f"unexpected {quote_few(extra)}"] if extra else []
        )
        raise UserError(
            f"class folders of {folder} differ from {spec.name}'s classes: {'; '.join(parts)}"
        )
    items = [
        (path, label)
        for label, name in enumerate(classes)
        for path in (folder / name).iterdir()
        if path.is_file() and is_image(path)
    ]
    return sort_items(items, root)


def sort_items(items: Items, root: Path) -> Items:
    """Items in the canonical order: by path relative to `root`, as a `/`-separated string."""
    return sorted(items, key=lambda item: relative(item[0], root))


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def fingerprint(items: Items, root: Path) -> str:
    """What a run read, as one hash: sha256 over the sorted lines `relative/path<TAB>size in
    bytes<TAB>label`. Adding, removing, relabelling or rewriting (to another size) an image
    changes it; where the dataset lies does not. First 16 hex digits."""
    lines = sorted(f"{Path(os.path.relpath(p, root)).as_posix()}\t{_size(p)}\t{label}\n"
                   for p, label in items)
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


# -- manifest files ----------------------------------------------------------------------------
def format_manifest(items: Items, root: Path) -> str:
    lines = []
    for path, label in sort_items(items, root):
        rel = relative(path, root)
        if "\n" in rel or "\r" in rel:
            raise UserError(f"cannot store a file name containing a line break: {path}")
        lines.append(f"{rel} {label}\n")
    return "".join(lines)


def write_manifest(path: Path, items: Items, root: Path) -> None:
    atomic_write_text(path, format_manifest(items, root))


def write_classes(manifest_dir: Path, classes: Sequence[str]) -> None:
    atomic_write_text(manifest_dir / "classes.txt", "".join(f"{c}\n" for c in classes))


def read_manifest(path: Path, root: Path, num_classes: int) -> Items:
    """Parse a manifest; UserError naming file and line for a bad line or a missing image."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"manifest is not valid text: {path}") from None
    items = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rel, _, label = line.rstrip().rpartition(" ")
        where = f"{path}:{lineno}"
        if not rel or not (label.isascii() and label.isdigit()):
            raise UserError(f"bad manifest line {where}: expected '<relative/path> <label>'")
        if int(label) >= num_classes:
            raise UserError(f"label {label} out of range (0..{num_classes - 1}) at {where}")
        image = contained(root, rel, where)
        if not image.is_file():
            raise UserError(f"manifest {where} names a missing file: {image}")
        items.append((image, int(label)))
    return items


def contained(root: Path, rel: str, where: str) -> Path:
    """`root / rel` for a manifest path that stays inside `root`; UserError naming `where`
    for an absolute path or one that climbs out with `..` (a manifest never names files
    outside its dataset, so no reader or writer can be led there)."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not parts or PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or ".." in parts:
        raise UserError(f"manifest {where} names a path outside the dataset root: {rel!r}")
    return root / rel


def find_manifest_dir(root: Path, manifest_dir: str | Path | None) -> Path | None:
    """The manifest folder in use: the given one (must exist), else ``<root>/manifests``, else
    None."""
    if manifest_dir is not None:
        mdir = Path(manifest_dir).expanduser()
        if not mdir.is_dir():
            raise UserError(f"manifest folder not found: {mdir}")
        return mdir
    default = root / MANIFEST_DIRNAME
    return default if default.is_dir() else None


def check_classes_file(mdir: Path, classes: list[str]) -> None:
    path = mdir / "classes.txt"
    if path.is_file() and path.read_text().splitlines() != classes:
        raise UserError(f"{path} does not list the dataset's {len(classes)} classes in order")


# -- splits ------------------------------------------------------------------------------------
def split_items(items: Items, test_fraction: float = 0.2, seed: int = 0) -> tuple[Items, Items]:
    """Deterministic stratified (train, test) split, independent of the input order.

    Items are put in path order, then each class (label c, n_c images) is permuted by a
    generator seeded with (seed, c) and its first round(test_fraction * n_c) images go to test,
    keeping at least one image of every class in train. Both halves come back in path order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction must lie in (0, 1), got {test_fraction}")
    if seed < 0:
        raise UserError(f"split seed must be >= 0, got {seed}")
    ordered = sorted(items, key=lambda item: item[0].as_posix())
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(ordered):
        by_class.setdefault(label, []).append(i)
    test: set[int] = set()
    for label, idx in by_class.items():
        n_test = min(math.floor(test_fraction * len(idx) + 0.5), len(idx) - 1)
        perm = np.random.default_rng([seed, label]).permutation(len(idx))
        test.update(idx[j] for j in perm[:n_test])
    train = [item for i, item in enumerate(ordered) if i not in test]
    return train, [item for i, item in enumerate(ordered) if i in test]


def split_dirname(seed: int, test_fraction: float) -> str:
    return f"seed{seed}-test{test_fraction:g}"


def split_manifest_path(
    mdir: Path, domain: str, split: Split, seed: int, test_fraction: float
) -> Path:
    return mdir / "splits" / split_dirname(seed, test_fraction) / f"{domain}.{split}.txt"


# -- the one entry point -----------------------------------------------------------------------
def domain_items(
    spec: DatasetSpec,
    root: str | Path,
    domain: str,
    split: Split | None = None,
    *,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    manifest_dir: str | Path | None = None,
) -> Items:
    """(path, label) pairs of one domain (full or short name), whole or one side of its split.

    Reads a manifest when one is found (see the module docstring), scans the folder otherwise.
    UserError naming the path at fault for: a missing domain folder, class folders that differ
    from the dataset's, an empty domain, a manifest line naming a missing file.
    """
    root = Path(root)
    domain = spec.resolve_domain(domain, root)
    if split not in (None, "train", "test"):
        raise UserError(f"unknown split {split!r}; choose from train, test")
    classes = spec.class_names(root)
    mdir = find_manifest_dir(root, manifest_dir)
    if mdir is not None:
        check_classes_file(mdir, classes)
        if split is not None:
            stored = split_manifest_path(mdir, domain, split, split_seed, test_fraction)
            if stored.is_file():
                return _non_empty(read_manifest(stored, root, len(classes)), stored)
    full = mdir / f"{domain}.txt" if mdir is not None else None
    if full is not None and full.is_file():
        items = _non_empty(read_manifest(full, root, len(classes)), full)
    else:
        items = _non_empty(scan_domain(spec, root, domain), spec.domain_dir(root, domain))
    if split is None:
        return items
    train, test = split_items(items, test_fraction, split_seed)
    return train if split == "train" else test


def _non_empty(items: Items, source: Path) -> Items:
    if not items:
        raise UserError(f"no images in {source}")
    return items


def resolve_domains(spec: DatasetSpec, root: Path, domains: Sequence[str] | None) -> list[str]:
    """Full names of the requested domains (all, in order, when None or empty)."""
    if not domains:
        return spec.domain_names(root)
    return [spec.resolve_domain(d, root) for d in domains]


def build_manifests(
    spec: DatasetSpec, root: Path, out: Path, domains: Sequence[str] | None = None
) -> dict[str, int]:
    """Scan the folders and write ``<out>/<Domain>.txt`` and ``classes.txt``; counts per domain."""
    check_outside_root(out, root)
    counts = {}
    names = resolve_domains(spec, root, domains)
    scans = {d: _non_empty(scan_domain(spec, root, d), spec.domain_dir(root, d)) for d in names}
    for d, items in scans.items():
        write_manifest(out / f"{d}.txt", items, root)
        counts[d] = len(items)
    write_classes(out, spec.class_names(root))
    return counts


def write_splits(
    spec: DatasetSpec,
    root: Path,
    out: Path,
    domains: Sequence[str] | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    manifest_dir: str | Path | None = None,
) -> dict[str, tuple[int, int]]:
    """Write the (train, test) split of each domain under `out` (a manifest folder)."""
    check_outside_root(out, root)
    counts = {}
    for d in resolve_domains(spec, root, domains):
        items = domain_items(spec, root, d, manifest_dir=manifest_dir)
        halves = split_items(items, test_fraction, seed)
        for name, half in zip(("train", "test"), halves):
            write_manifest(split_manifest_path(out, d, name, seed, test_fraction), half, root)
        counts[d] = (len(halves[0]), len(halves[1]))
    write_classes(out, spec.class_names(root))
    return counts
