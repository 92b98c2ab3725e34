"""Loaders: an endless, exactly resumable training loader and an ordered eval loader.

Exact resumability: the order of epoch e is a permutation drawn from a generator seeded by
(seed, e), together with one augmentation seed per position of that permutation. A batch is
therefore a pure function of (seed, epoch, position), whatever the number of workers, and
`state_dict()` = {"epoch", "position"} (batches already *returned*) is all it takes to resume.

Bad images: a worker cannot hand a UserError to the main process intact (DataLoader wraps it
into a multi-line traceback), so a failed sample travels as a `_LoadFailure` value through the
collate function and is raised again, as the same one-line UserError, by the loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from domadapt.errors import UserError

Batch = Any  # (images, labels) as collated by `default_collate`


@dataclass(frozen=True)
class _LoadFailure:
    message: str


class _Guarded(Dataset):
    """Returns a `_LoadFailure` instead of raising a UserError (safe to send from a worker)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.dataset[key]
        except UserError as e:
            return _LoadFailure(str(e))


def _collate(samples: list[Any]) -> Any:
    failure = next((s for s in samples if isinstance(s, _LoadFailure)), None)
    return failure if failure is not None else default_collate(samples)


def _unwrap(batch: Any) -> Batch:
    if isinstance(batch, _LoadFailure):
        raise UserError(batch.message)
    return batch


def _data_loader(dataset: Dataset, num_workers: int, pin_memory: bool, **kwargs: Any) -> DataLoader:
    if num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {num_workers}")
    # An own generator: creating an iterator must not draw from torch's global one.
    return DataLoader(
        _Guarded(dataset),
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )


def epoch_order(n: int, seed: int, epoch: int) -> tuple[list[int], list[int]]:
    """(permutation of range(n), one augmentation seed per position) for one epoch."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])
    g = torch.Generator().manual_seed(mixed)
    perm = torch.randperm(n, generator=g)
    seeds = torch.randint(0, 2**62, (n,), generator=g)
    return perm.tolist(), seeds.tolist()


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless (index, sample_seed) batches of one rank, starting at (epoch, position).

    Global batch b of an epoch covers permutation positions [b*G, (b+1)*G) with
    G = batch_size * world_size; rank r takes positions [b*G + r*batch_size, ... + batch_size).
    The incomplete tail of each epoch is dropped.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        epoch: int = 0,
        position: int = 0,
    ):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = epoch, position
        self.batches_per_epoch = n // (batch_size * world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, position = self.epoch, self.position
        global_batch = self.batch_size * self.world_size
        while True:
            perm, seeds = epoch_order(self.n, self.seed, epoch)
            for b in range(position, self.batches_per_epoch):
                start = b * global_batch + self.rank * self.batch_size
                yield [(perm[j], seeds[j]) for j in range(start, start + self.batch_size)]
            epoch, position = epoch + 1, 0


class InfiniteLoader:
    """Endless training batches (images, labels), reshuffled every epoch, exactly resumable.

    `batch_size` is per process: with DDP (`world_size` > 1) every rank builds the same loader
    with the same seed and gets its own `batch_size` slice of each global batch of
    batch_size * world_size samples. Use it as an iterator: `images, labels = next(loader)`.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if batch_size <= 0 or seed < 0:
            raise UserError(f"batch size must be positive and seed >= 0, got {batch_size}, {seed}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside 0..{world_size - 1}")
        if len(dataset) < batch_size * world_size:
            raise UserError(
                f"{len(dataset)} images are fewer than one batch "
                f"({batch_size} per process x {world_size} processes)"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.pin_memory = pin_memory
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        self.epoch = 0
        self.position = 0  # batches returned in the current epoch
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            sampler = ResumableBatchSampler(
                len(self.dataset),
                self.batch_size,
                self.seed,
                self.rank,
                self.world_size,
                self.epoch,
                self.position,
            )
            loader = _data_loader(
                self.dataset, self.num_workers, self.pin_memory, batch_sampler=sampler
            )
            self._iterator = iter(loader)
        batch = _unwrap(next(self._iterator))
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly after the last batch returned when `state` was taken."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise UserError(
                f"loader state {state} does not fit {self.batches_per_epoch} batches per epoch"
            )
        self.close()
        self.epoch, self.position = epoch, position

    def close(self) -> None:
        """Drop the running iterator (its worker processes exit)."""
        self._iterator = None


def fixed_order(n: int, seed: int) -> list[int]:
    """One random permutation of range(n), the same for the same seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class EvalLoader:
    """Batches over the whole dataset, each sample once (last batch may be smaller), no
    augmentation seed: in the dataset's order, or with `seed` in `fixed_order(len, seed)`."""

    def __init__(
        self, dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
        seed: int | None = None,
    ):
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        self.dataset, self.batch_size = dataset, batch_size
        order = None if seed is None else fixed_order(len(dataset), seed)  # type: ignore[arg-type]
        self._loader = _data_loader(
            dataset, num_workers, pin_memory, batch_size=batch_size, shuffle=False, sampler=order
        )

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self._loader:
            yield _unwrap(batch)


def eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, *, pin_memory: bool = False,
    seed: int | None = None,
) -> EvalLoader:
    """Batches of `dataset` for evaluation and feature extraction: in its order, or with `seed`
    in one fixed random order (batches that each represent the whole set, as a pass that
    normalises every batch by its own statistics needs: AdaBN, `nn.adabn`)."""
    return EvalLoader(dataset, batch_size, num_workers, pin_memory, seed)
