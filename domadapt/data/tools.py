"""Whole-dataset operations: decode-check every image, build a pre-resized copy."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from PIL import Image

from domadapt.data.dataset import load_image
from domadapt.data.manifest import Items, domain_items, relative, resolve_domains
from domadapt.data.registry import DatasetSpec, check_outside_root
from domadapt.errors import UserError
from domadapt.io import NO_SPACE, atomic_directory, require_absent, write_fully
from domadapt.progress import progress
from domadapt.system import usable_cores

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return min(8, usable_cores())


def _parallel_map(
    fn: Callable[[T], R], xs: Sequence[T], workers: int, quiet: bool, desc: str
) -> Iterable[R]:
    """`map` over threads (PIL decodes and encodes without the GIL), in order, with a bar.
    Stopped early (Ctrl-C, an error), it drops the images not yet started."""
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        yield from progress(pool.map(fn, xs), total=len(xs), quiet=quiet, desc=desc, unit="img")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class DomainReport:
    domain: str
    short: str
    count: int
    expected: int | None
    unreadable: list[str] = field(default_factory=list)  # one-line messages naming the file

    @property
    def ok(self) -> bool:
        return not self.unreadable and self.expected in (None, self.count)


def _decode_error(path: Path) -> str | None:
    try:
        load_image(path)
    except UserError as e:
        return str(e)
    return None


def check_dataset(
    spec: DatasetSpec,
    root: Path,
    domains: Sequence[str] | None = None,
    *,
    manifest_dir: str | Path | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> list[DomainReport]:
    """Decode every image of the chosen domains; per-domain counts and unreadable files.

    Structural problems (missing folders, class mismatch, empty domain, manifest lines naming
    missing files) raise a UserError at once; decode failures are collected.
    """
    names = resolve_domains(spec, root, domains)
    listed = {d: domain_items(spec, root, d, manifest_dir=manifest_dir) for d in names}
    reports = []
    for d, items in listed.items():
        dom = spec.domain(d, root)
        paths = [path for path, _ in items]
        errors = _parallel_map(
            _decode_error, paths, workers or default_workers(), quiet, f"check {d}"
        )
        reports.append(
            DomainReport(d, dom.short, len(items), dom.expected, [e for e in errors if e])
        )
    return reports


def build_resized_cache(
    spec: DatasetSpec,
    root: Path,
    out: Path,
    size: int,
    domains: Sequence[str] | None = None,
    *,
    manifest_dir: str | Path | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> dict[str, int]:
    """Decode every image once, shrink its shorter side to `size` (never enlarge), save as JPEG
    (quality 95) at the same relative path with a `.jpg` suffix. `out` is a valid root itself.

    The copy is built in a temporary folder renamed to `out` at the end, so an interrupted run
    leaves no partial `out` behind (the per-file atomic writes would be redundant inside it).
    """
    if size <= 0:
        raise UserError(f"--size must be positive, got {size}")
    out = Path(out).expanduser().absolute()
    require_absent(out)
    check_outside_root(out, root)
    names = resolve_domains(spec, root, domains)
    listed: dict[str, Items] = {
        d: domain_items(spec, root, d, manifest_dir=manifest_dir) for d in names
    }
    targets: dict[str, Path] = {}
    for items in listed.values():
        for path, _ in items:
            rel = Path(relative(path, root)).with_suffix(".jpg").as_posix()
            if rel in targets:
                raise UserError(f"{path} and {targets[rel]} would both be cached as {rel}")
            targets[rel] = path
    with atomic_directory(out) as tmp:
        for d in names:  # empty class folders too, so the copy keeps the dataset's class set
            folder = tmp / spec.domain_dir(root, d).relative_to(root)
            for c in spec.class_names(root):
                (folder / c).mkdir(parents=True, exist_ok=True)

        def convert(job: tuple[str, Path]) -> None:
            rel, src = job
            image = load_image(src)
            scale = size / min(image.size)
            if scale < 1:
                new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(new, Image.BICUBIC, reducing_gap=3.0)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=95)
            try:
                write_fully(tmp / rel, buf.getvalue())
            except OSError as e:
                if e.errno not in NO_SPACE:
                    raise
                raise UserError(f"no space left to write {out / rel} ({e.strerror}); {out} was "
                                f"not created: free space and re-run") from None

        for _ in _parallel_map(
            convert, list(targets.items()), workers or default_workers(), quiet, "cache"
        ):
            pass
    return {d: len(items) for d, items in listed.items()}
