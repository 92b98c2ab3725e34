"""Tiny synthetic image trees for tests (of this package and of the trainer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_tree(
    root: Path,
    domains: Sequence[str],
    classes: Sequence[str],
    per_class: int | Mapping[str, int] = 1,
    *,
    size: int = 8,
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    """Write ``root/<domain>/<class>/img<k><ext>`` with random RGB content; return `root`.

    `per_class` is one count for all classes or a count per class name.
    """
    rng = np.random.default_rng(seed)
    for domain in domains:
        for name in classes:
            folder = Path(root) / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            n = per_class if isinstance(per_class, int) else per_class[name]
            for k in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"img{k}{ext}")
    return Path(root)
