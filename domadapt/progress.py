"""tqdm progress bars that stay quiet under --quiet and when stderr is not a terminal."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Any = None, *, quiet: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar, disabled when `quiet` or when stderr is not a TTY."""
    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
