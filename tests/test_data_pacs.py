"""The real PACS copy in ../shared (skipped when absent): counts, decoding, split, check."""

from __future__ import annotations

import torch
from conftest import PACS_ROOT, needs_pacs

from domadapt.data import DomainDataset, build_transform, domain_items, get_dataset, split_items

pytestmark = needs_pacs
PACS = get_dataset("pacs")


def test_counts_and_labels():
    counts = {d: len(domain_items(PACS, PACS_ROOT, d)) for d in PACS.domain_names(PACS_ROOT)}
    assert counts == {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
    items = domain_items(PACS, PACS_ROOT, "P")
    assert {label for _, label in items} == set(range(7))
    assert items[0][0] == PACS_ROOT / "photo" / "dog" / min(
        p.name for p in (PACS_ROOT / "photo" / "dog").iterdir()
    )


def test_decode_sample():
    items = domain_items(PACS, PACS_ROOT, "sketch")[::500]
    dataset = DomainDataset(items, build_transform(96, 112, train=False))
    for k in range(len(dataset)):
        x, y = dataset[k]
        assert x.shape == (3, 96, 96) and x.dtype == torch.float32 and y == items[k][1]
        assert x.std() > 0.1


def test_split_stable_stratified_disjoint():
    for domain in PACS.domain_names(PACS_ROOT):
        train = domain_items(PACS, PACS_ROOT, domain, "train")
        test = domain_items(PACS, PACS_ROOT, domain, "test")
        assert (train, test) == (
            domain_items(PACS, PACS_ROOT, domain, "train"),
            domain_items(PACS, PACS_ROOT, domain, "test"),
        )
        assert set(train).isdisjoint(test) and len(train) + len(test) == len(
            domain_items(PACS, PACS_ROOT, domain)
        )
        whole = torch.bincount(torch.tensor([y for _, y in train + test]), minlength=7).double()
        held = torch.bincount(torch.tensor([y for _, y in test]), minlength=7).double()
        assert torch.all((held - 0.2 * whole).abs() <= 0.5)  # exactly stratified per class
    other = split_items(domain_items(PACS, PACS_ROOT, "photo"), 0.2, seed=1)[1]
    assert other != domain_items(PACS, PACS_ROOT, "photo", "test")


def test_check_command(run_cli):
    code, out, err = run_cli("data", "check", "--dataset", "pacs", "--root", PACS_ROOT, "-q")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:6]]
    assert rows == [
        [d.name, d.short, str(d.expected), str(d.expected), "ok"] for d in PACS.domain_list(None)
    ]
    assert "9991 images decoded" in out
