"""Folder scans, manifests (paths with spaces), stratified splits, and their CLI commands."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from domadapt.data import domain_items, get_dataset, split_items
from domadapt.data.datasets.officehome import OFFICEHOME_CLASSES
from domadapt.data.manifest import read_manifest, scan_domain
from domadapt.data.testing import write_image_tree
from domadapt.errors import UserError

OH_FOLDERS = ["Art", "Clipart", "Product", "Real World"]  # the original archive's spelling


@pytest.fixture
def officehome(tmp_path: Path) -> Path:
    """An Office-Home-shaped tree: 4 domains, all 65 classes, tiny images, mixed extensions."""
    root = write_image_tree(tmp_path / "oh", OH_FOLDERS, OFFICEHOME_CLASSES, 1, ext=".jpg")
    extra = root / "Real World" / "TV"
    write_image_tree(extra.parent.parent, ["Real World"], ["TV"], 2, ext=".PNG", seed=1)
    (extra / "notes.txt").write_text("not an image")
    (extra / ".img0.jpg").write_bytes(b"macOS resource fork")
    (extra / "my photo 1.bmp").write_bytes((extra / "img0.PNG").read_bytes())
    return root


def test_scan_officehome_tree(officehome):
    spec = get_dataset("officehome")
    items = domain_items(spec, officehome, "rw")
    rel = [p.relative_to(officehome).as_posix() for p, _ in items]
    assert len(items) == 65 + 3  # 65 jpg + img0/img1.PNG + "my photo 1.bmp" in TV
    assert rel == sorted(rel) and rel[0] == "Real World/Alarm_Clock/img0.jpg"
    labels = dict(zip(rel, (label for _, label in items)))
    assert labels["Real World/TV/my photo 1.bmp"] == OFFICEHOME_CLASSES.index("TV") == 58
    assert labels["Real World/Webcam/img0.jpg"] == 64
    assert not any(r.endswith((".txt", "/.img0.jpg")) for r in rel)


def test_manifest_cli_roundtrip_with_spaces(officehome, run_cli):
    code, out, err = run_cli("data", "manifest", "--dataset", "officehome", "--root", officehome)
    assert code == 0, err
    mdir = officehome / "manifests"
    assert "Real_World: 68 images" in out
    assert sorted(p.name for p in mdir.iterdir()) == [
        "Art.txt",
        "Clipart.txt",
        "Product.txt",
        "Real_World.txt",
        "classes.txt",
    ]
    assert (mdir / "classes.txt").read_text().splitlines() == list(OFFICEHOME_CLASSES)
    lines = (mdir / "Real_World.txt").read_text().splitlines()
    assert "Real World/TV/my photo 1.bmp 58" in lines and lines == sorted(lines)
    spec = get_dataset("officehome")
    # <root>/manifests is picked up: removing a line there removes the image from the domain
    (mdir / "Art.txt").write_text(
        "".join(line + "\n" for line in (mdir / "Art.txt").read_text().splitlines()[:10])
    )
    assert len(domain_items(spec, officehome, "Art")) == 10
    assert len(domain_items(spec, officehome, "Real_World")) == 68
    assert read_manifest(mdir / "Real_World.txt", officehome, 65) == scan_domain(
        spec, officehome, "Rw"
    )


def test_explicit_manifest_dir_wins(officehome, tmp_path, run_cli):
    elsewhere = tmp_path / "lists"
    assert (
        run_cli(
            "data", "manifest", "-D", "officehome", "-r", officehome, "-o", elsewhere, "-d", "Cl"
        )[0]
        == 0
    )
    assert sorted(p.name for p in elsewhere.iterdir()) == ["Clipart.txt", "classes.txt"]
    (elsewhere / "Clipart.txt").write_text("Clipart/Fan/img0.jpg 19\n")
    spec = get_dataset("officehome")
    assert domain_items(spec, officehome, "cl", manifest_dir=elsewhere) == [
        (officehome / "Clipart/Fan/img0.jpg", 19)
    ]
    assert len(domain_items(spec, officehome, "cl")) == 65  # no <root>/manifests: scanned


@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    counts = {"a": 10, "b": 25, "c": 3}
    return write_image_tree(tmp_path / "tree", ["d1", "d2"], list(counts), counts)


def test_split_is_stratified_deterministic_and_order_free(folder_tree):
    items = domain_items(get_dataset("folder"), folder_tree, "d1")
    train, test = split_items(items, 0.2, seed=0)
    assert set(train).isdisjoint(test) and sorted(train + test) == sorted(items)
    assert Counter(label for _, label in test) == {0: 2, 1: 5, 2: 1}  # round(0.2 n) per class
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert split_items(shuffled, 0.2, seed=0) == (train, test)
    assert split_items(items, 0.2, seed=1)[1] != test
    one_each = [(Path(f"/x/{k}.png"), k) for k in range(3)]  # singleton classes stay in train
    assert split_items(one_each, 0.5, 0) == (one_each, [])
    with pytest.raises(UserError, match="test fraction"):
        split_items(items, 1.0)


def test_domain_items_split_and_stored_split(folder_tree, run_cli):
    spec = get_dataset("folder")
    train = domain_items(spec, folder_tree, "d2", "train", split_seed=3, test_fraction=0.3)
    test = domain_items(spec, folder_tree, "d2", "test", split_seed=3, test_fraction=0.3)
    assert (train, test) == split_items(domain_items(spec, folder_tree, "d2"), 0.3, 3)
    code, out, err = run_cli(
        "data", "split", "-D", "folder", "-r", folder_tree, "--seed", 3, "--test-fraction", 0.3
    )
    assert code == 0, err
    assert "d2: 26 train / 12 test" in out  # 3 + 8 + 1 held out
    stored = folder_tree / "manifests" / "splits" / "seed3-test0.3"
    assert sorted(os.listdir(stored)) == [
        "d1.test.txt",
        "d1.train.txt",
        "d2.test.txt",
        "d2.train.txt",
    ]
    assert read_manifest(stored / "d2.test.txt", folder_tree, 3) == test
    # A stored split is used as is for its own seed and fraction (here edited to one image) ...
    (stored / "d2.test.txt").write_text("d2/a/img0.png 0\n")
    assert domain_items(spec, folder_tree, "d2", "test", split_seed=3, test_fraction=0.3) == [
        (folder_tree / "d2/a/img0.png", 0)
    ]
    # ... and ignored for any other, which is computed
    assert len(domain_items(spec, folder_tree, "d2", "test", split_seed=0, test_fraction=0.3)) == 12
