"""DomainDataset: decode (PIL, RGB) and transform one image, optionally under a per-sample seed.

Image cache: a dataset keeps, per process, the output of the deterministic head of its
transform (decode -> RGB -> the leading `Resize` / `CenterCrop` steps of a `T.Compose`) as a
uint8 HxWx3 array, up to `cache_bytes` bytes of pixels per dataset (first come, first kept).
Only the random tail (crop, flip) and the tensor conversion run again on each access, on an
image rebuilt with `Image.fromarray`, so a sample is bit-identical with and without the cache.
With DataLoader workers every worker fills its own copy (a forked worker starts with what the
parent held; pickling, as a spawned worker gets it, drops the cache).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from domadapt.errors import UserError

CACHE_ENV = "DOMADAPT_IMAGE_CACHE_MB"
DEFAULT_CACHE_MB = 1024  # per dataset and process: all of PACS at 128 px is ~470 MiB
# Steps that are a pure function of the image (exact types: a subclass may add randomness).
_DETERMINISTIC_STEPS = (T.Resize, T.CenterCrop)
# 16-bit grayscale as PIL opens it (a PNG's 16-bit gray is "I" or "I;16").
_WIDE_GRAY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def load_image(path: Path) -> Image.Image:
    """Decode an image fully as RGB; a missing, corrupt or truncated file is a UserError.
    A 16-bit grayscale image keeps its range (0..65535 -> 0..255), where `convert` would clip
    it to almost pure white."""
    try:
        with Image.open(path) as image:
            if image.mode in _WIDE_GRAY:
                image.load()
                wide = np.asarray(image, dtype=np.float64)
                image = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8))
            return image.convert("RGB")  # forces the full decode: truncation surfaces here
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file can make any PIL plugin raise anything
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"unreadable image {path}: {reason}") from None


def default_cache_bytes() -> int:
    """The per-dataset cache budget: $DOMADAPT_IMAGE_CACHE_MB MiB (0 disables), else 1024 MiB."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if not value:
        return DEFAULT_CACHE_MB << 20
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise UserError(f"{CACHE_ENV} must be a number of MiB >= 0, got {value!r}")
    return int(mb * (1 << 20))


def split_transform(
    transform: Callable[[Image.Image], Any] | None,
) -> tuple[Callable[[Image.Image], Image.Image] | None, Callable[[Image.Image], Any] | None]:
    """(deterministic head, rest) with rest(head(image)) == transform(image).

    The head is the leading run of exact `T.Resize` / `T.CenterCrop` steps of a `T.Compose`
    (None if there are none); any other transform is all rest.
    """
    if not isinstance(transform, T.Compose):
        return None, transform
    steps = list(transform.transforms)
    k = 0
    while k < len(steps) and type(steps[k]) in _DETERMINISTIC_STEPS:
        k += 1
    head = T.Compose(steps[:k]) if k else None
    rest = T.Compose(steps[k:]) if k < len(steps) else None
    return head, rest


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
    `cache_bytes` bounds the decoded-image cache (module docstring; None: `default_cache_bytes()`,
    0: no cache).
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, int]],
        transform: Callable[[Image.Image], Any] | None,
        *,
        cache_bytes: int | None = None,
    ):
        self.items = list(items)
        self.transform = transform
        self.cache_bytes = default_cache_bytes() if cache_bytes is None else cache_bytes
        if self.cache_bytes < 0:
            raise UserError(f"image cache budget must be >= 0 bytes, got {self.cache_bytes}")
        self._head, self._rest = split_transform(transform)
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without the cache (a spawned worker starts empty; fork shares it as is)."""
        return self.__dict__ | {"_cache": {}, "_cached_bytes": 0}

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    @property
    def cached(self) -> int:
        """How many images this process holds decoded."""
        return len(self._cache)

    def _image(self, index: int) -> Image.Image:
        """head(decoded image `index`), from the cache when there."""
        pixels = self._cache.get(index)
        if pixels is not None:
            return Image.fromarray(pixels)  # HxWx3 uint8 -> RGB
        image = load_image(self.items[index][0])
        if self._head is not None:
            image = self._head(image)
        if self.cache_bytes and image.mode == "RGB":
            pixels = np.asarray(image)  # a read-only copy of the pixels
            if self._cached_bytes + pixels.nbytes <= self.cache_bytes:
                self._cache[index] = pixels
                self._cached_bytes += pixels.nbytes
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        label = self.items[index][1]
        image = self._image(index)
        if self._rest is None:
            return image, label
        if seed is None:
            return self._rest(image), label
        with seeded_rng(seed):
            return self._rest(image), label
