"""Atomic creation of a whole folder: build it under a temporary name, then rename it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from domadapt.errors import UserError


@contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success rename it to `dest`.

    A killed or failed build leaves no `dest` behind (only a hidden `.<name>.*.tmp` folder when
    the process was killed outright). `dest` must not exist or be an empty folder.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def require_absent(dest: Path) -> None:
    """UserError unless `dest` is free for `atomic_directory` (missing or an empty folder)."""
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise UserError(f"output folder already exists and is not empty: {dest}")
