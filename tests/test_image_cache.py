"""The decoded-image cache of DomainDataset: bit-identical samples, budget, errors, head split."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import pytest
import torch
from conftest import PACS_ROOT, needs_pacs
from torchvision import transforms as T

from domadapt.data import DomainDataset, InfiniteLoader, build_transform, domain_items, get_dataset
from domadapt.data.dataset import CACHE_ENV, default_cache_bytes, split_transform
from domadapt.data.testing import write_image_tree
from domadapt.errors import UserError

FOLDER = get_dataset("folder")


@pytest.fixture
def items(tmp_path) -> list[tuple[Path, int]]:
    root = write_image_tree(tmp_path, ["d"], ["a", "b"], 5, size=20)
    return domain_items(FOLDER, root, "d")


def transforms() -> dict[str, T.Compose]:
    return {
        "train": build_transform(12, 16, train=True),
        "train-noflip": build_transform(12, 14, train=True, flip=False),
        "eval": build_transform(12, 16, train=False),
    }


def samples(dataset: DomainDataset, seeded: bool) -> list[tuple[torch.Tensor, int]]:
    return [dataset[(i, 1000 + i) if seeded else i] for i in range(len(dataset))]


def assert_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert ya == yb and xa.dtype == xb.dtype and torch.equal(xa, xb)


@pytest.mark.parametrize("name", ["train", "train-noflip", "eval"])
def test_samples_bit_identical_with_and_without_cache(items, name):
    tf = transforms()[name]
    plain, cached = DomainDataset(items, tf, cache_bytes=0), DomainDataset(items, tf)
    seeded = name.startswith("train")
    reference = samples(plain, seeded)
    first = samples(cached, seeded)  # decodes and fills the cache
    assert cached.cached == len(items) and plain.cached == 0
    again = samples(cached, seeded)  # served from the cache
    assert_equal(first, reference)
    assert_equal(again, reference)


def test_cache_is_used_instead_of_the_file(items):
    dataset = DomainDataset(items, transforms()["train"])
    before = samples(dataset, seeded=True)
    for path, _ in items:
        path.write_bytes(b"overwritten")
    assert_equal(samples(dataset, seeded=True), before)
    with pytest.raises(UserError, match="unreadable image"):
        DomainDataset(items, transforms()["train"])[(0, 1)]


def test_infinite_loader_batches_identical_with_cache(items):
    tf = transforms()["train"]
    for workers in (0, 1):
        loaders = [
            InfiniteLoader(DomainDataset(items, tf, cache_bytes=b), 4, seed=3, num_workers=workers)
            for b in (0, 1 << 20)
        ]
        a, b = (list(itertools.islice(loader, 6)) for loader in loaders)  # 2 epochs and a half
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_pickle_drops_the_cache(items):
    dataset = DomainDataset(items, transforms()["train"])
    reference = samples(dataset, seeded=True)
    copy = pickle.loads(pickle.dumps(dataset))
    assert dataset.cached == len(items) and copy.cached == 0 and copy._cached_bytes == 0
    assert_equal(samples(copy, seeded=True), reference)
    assert copy.cached == len(items)


def test_budget_bounds_what_is_kept(items):
    tf = transforms()["train"]  # head = Resize(16): a 16x16x3 uint8 array per image
    per_image = 16 * 16 * 3
    dataset = DomainDataset(items, tf, cache_bytes=3 * per_image + 1)
    reference = samples(DomainDataset(items, tf, cache_bytes=0), seeded=True)
    assert_equal(samples(dataset, seeded=True), reference)
    assert dataset.cached == 3 and dataset._cached_bytes == 3 * per_image
    assert_equal(samples(dataset, seeded=True), reference)  # the rest decoded again, same result
    with pytest.raises(UserError, match="budget"):
        DomainDataset(items, tf, cache_bytes=-1)


def test_corrupt_image_fails_with_the_same_one_line_error(items):
    bad = items[2][0]
    bad.write_bytes(b"\x89PNG definitely not an image")
    messages = []
    for budget in (0, 1 << 20):
        dataset = DomainDataset(items, transforms()["train"], cache_bytes=budget)
        for _ in range(2):  # a failure is not cached: it fails again, identically
            with pytest.raises(UserError) as info:
                dataset[(2, 7)]
            messages.append(str(info.value))
        assert dataset.cached == 0
    assert len(set(messages)) == 1 and "\n" not in messages[0]
    assert messages[0].startswith(f"unreadable image {bad}")


def test_split_transform_keeps_only_deterministic_head():
    class NoisyResize(T.Resize):  # a subclass might randomize: not part of the head
        pass

    train = build_transform(12, 16, train=True)
    head, rest = split_transform(train)
    assert [type(s) for s in head.transforms] == [T.Resize]
    assert type(rest.transforms[0]) is T.RandomResizedCrop
    evaluate = build_transform(12, 16, train=False)
    head, rest = split_transform(evaluate)
    assert [type(s) for s in head.transforms] == [T.Resize, T.CenterCrop]
    assert [type(s) for s in rest.transforms] == [T.ToTensor, T.Normalize]
    assert split_transform(T.Compose([NoisyResize(4), T.ToTensor()]))[0] is None
    assert split_transform(None) == (None, None)
    head, rest = split_transform(T.Compose([T.Resize(4)]))
    assert rest is None and len(head.transforms) == 1


def test_cache_budget_from_environment(monkeypatch, items):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_cache_bytes() == 1024 << 20
    monkeypatch.setenv(CACHE_ENV, "0")
    dataset = DomainDataset(items, transforms()["eval"])
    samples(dataset, seeded=False)
    assert dataset.cached == 0
    monkeypatch.setenv(CACHE_ENV, "1.5")
    assert default_cache_bytes() == 3 << 19
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv(CACHE_ENV, bad)
        with pytest.raises(UserError, match=CACHE_ENV):
            default_cache_bytes()


@needs_pacs
def test_real_pacs_jpegs_bit_identical():
    items = domain_items(get_dataset("pacs"), PACS_ROOT, "art_painting")[::100]
    for train in (True, False):
        tf = build_transform(96, 112, train=train)
        reference = samples(DomainDataset(items, tf, cache_bytes=0), seeded=train)
        cached = DomainDataset(items, tf)
        samples(cached, seeded=train)
        assert cached.cached == len(items)
        assert_equal(samples(cached, seeded=train), reference)
