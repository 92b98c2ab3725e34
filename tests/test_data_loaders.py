"""Transforms, DomainDataset, and the loaders: determinism, exact resume, DDP slicing."""

from __future__ import annotations

import itertools

import pytest
import torch

from domadapt.data import (
    DomainDataset,
    InfiniteLoader,
    build_transform,
    domain_items,
    eval_loader,
    get_dataset,
)
from domadapt.data.testing import write_image_tree
from domadapt.errors import UserError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> DomainDataset:
    root = write_image_tree(
        tmp_path_factory.mktemp("tree"), ["d"], ["a", "b", "c"], {"a": 7, "b": 9, "c": 6}, size=16
    )
    items = domain_items(get_dataset("folder"), root, "d")
    return DomainDataset(items, build_transform(12, 14, train=True))


def take(loader: InfiniteLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(loader, n))


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_transforms():
    from PIL import Image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, right half red
    train, evaluate = build_transform(16, 18, train=True), build_transform(16, 18, train=False)
    assert train(image).shape == evaluate(image).shape == (3, 16, 16)
    assert torch.equal(evaluate(image), evaluate(image))
    red = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    assert torch.allclose(evaluate(image)[:, 8, -1], red, atol=1e-5)  # right edge of the crop
    no_flip = build_transform(16, 18, train=True, flip=False, crop_scale=(1.0, 1.0))
    assert {bool(no_flip(image)[2, 8, 0] > 0) for _ in range(20)} == {True}  # left edge stays blue
    flip = build_transform(16, 18, train=True, crop_scale=(1.0, 1.0))
    assert {bool(flip(image)[2, 8, 0] > 0) for _ in range(40)} == {True, False}
    with pytest.raises(UserError):
        build_transform(32, 16, train=False)


def test_seeded_sample_is_reproducible_and_isolated(dataset):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    x1, y1 = dataset[(3, 42)]
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's stream untouched
    x2, _ = dataset[(3, 42)]
    x3, _ = dataset[(3, 43)]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3) and y1 == dataset.items[3][1]


def test_infinite_loader_epochs(dataset):
    loader = InfiniteLoader(dataset, 5, seed=0)
    assert loader.batches_per_epoch == 4  # 22 images, drop_last
    batches = take(loader, 8)
    assert all(x.shape == (5, 3, 12, 12) and y.dtype == torch.int64 for x, y in batches)
    assert loader.state_dict() == {"epoch": 2, "position": 0}
    epoch0 = torch.cat([y for _, y in batches[:4]])
    epoch1 = torch.cat([y for _, y in batches[4:]])
    assert not torch.equal(epoch0, epoch1)  # reshuffled
    assert_same(batches, take(InfiniteLoader(dataset, 5, seed=0), 8))  # deterministic
    other = take(InfiniteLoader(dataset, 5, seed=1), 4)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_identical(dataset, num_workers):
    reference = take(InfiniteLoader(dataset, 5, seed=7), 11)
    first = InfiniteLoader(dataset, 5, seed=7, num_workers=num_workers)
    head = take(first, 6)  # stop mid-epoch (epoch 1, position 2) while workers prefetch ahead
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 2}
    first.close()
    resumed = InfiniteLoader(dataset, 5, seed=7, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert_same(head + take(resumed, 5), reference)
    resumed.load_state_dict({"epoch": 0, "position": 3})  # rewinding works too
    assert_same(take(resumed, 2), reference[3:5])
    with pytest.raises(UserError):
        resumed.load_state_dict({"epoch": 0, "position": 4})


def test_ddp_ranks_slice_each_global_batch(dataset):
    whole = take(InfiniteLoader(dataset, 6, seed=3), 6)  # world_size 1 with the global batch size
    ranks = [take(InfiniteLoader(dataset, 3, seed=3, rank=r, world_size=2), 6) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *ranks):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(UserError, match="rank 2"):
        InfiniteLoader(dataset, 3, seed=3, rank=2, world_size=2)
    with pytest.raises(UserError, match="fewer than one batch"):
        InfiniteLoader(dataset, 12, seed=3, world_size=2)


def test_eval_loader_is_ordered(dataset):
    evaluated = DomainDataset(dataset.items, build_transform(12, 14, train=False))
    loader = eval_loader(evaluated, 5, num_workers=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and batches[-1][0].shape[0] == 2
    assert torch.cat([y for _, y in batches]).tolist() == evaluated.labels
    assert torch.equal(batches[1][0][0], evaluated[5][0])
