"""DomainDataset: decode (PIL, RGB) and transform one image, optionally under a per-sample seed."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from domadapt.errors import UserError


def load_image(path: Path) -> Image.Image:
    """Decode an image fully as RGB; a missing, corrupt or truncated file is a UserError."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # forces the full decode: truncation surfaces here
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file can make any PIL plugin raise anything
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"unreadable image {path}: {reason}") from None


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator and Python's `random` seeded by `seed`.

    Both are restored afterwards, so the caller's random streams are untouched. CUDA
    generators are left alone (the transforms run on the CPU).
    """
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class DomainDataset(Dataset):
    """Images of one domain: `items` are (path, label) pairs.

    `dataset[i]` -> (transform(image), label). `dataset[(i, seed)]` applies the transform under
    `seeded_rng(seed)`, so a random augmentation depends only on the seed, not on the worker
    or on what ran before: this is what makes `InfiniteLoader` exactly resumable.
    """

    def __init__(
        self, items: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], Any] | None
    ):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.items[index]
        image = load_image(path)
        if self.transform is None:
            return image, label
        if seed is None:
            return self.transform(image), label
        with seeded_rng(seed):
            return self.transform(image), label
