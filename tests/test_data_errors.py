"""Every user mistake about data ends in one line naming the culprit, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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

PACS = get_dataset("pacs")


@pytest.fixture
def pacs_tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "pacs", PACS.domain_names(None), PACS.class_names(None), 2)


def one_line_error(result: tuple[int, str, str], *names: object) -> str:
    code, _, err = result
    assert code != 0
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    for name in names:
        assert str(name) in err, err
    return err


def test_count_mismatch_fails(pacs_tree, run_cli):
    result = run_cli("data", "check", "-D", "pacs", "-r", pacs_tree, "-q")
    assert "art_painting   A          14     2048  count mismatch" in result[1]
    one_line_error(result, "art_painting has 14 images, expected 2048")


def test_missing_root(tmp_path, run_cli):
    one_line_error(
        run_cli("data", "check", "-D", "pacs", "-r", tmp_path / "nope"), tmp_path / "nope"
    )
    one_line_error(run_cli("data", "manifest", "-D", "officehome"), "officehome needs --root")


def test_missing_domain_folder(pacs_tree, run_cli):
    shutil.rmtree(pacs_tree / "cartoon")
    one_line_error(run_cli("data", "check", "-D", "pacs", "-r", pacs_tree), pacs_tree / "cartoon")


def test_unknown_domain_and_dataset(pacs_tree, run_cli):
    one_line_error(
        run_cli("data", "check", "-D", "pacs", "-r", pacs_tree, "-d", "clipart"), "'clipart'"
    )
    one_line_error(run_cli("data", "check", "-D", "imagenet", "-r", pacs_tree), "'imagenet'")


def test_class_sets_differ(pacs_tree, run_cli):
    shutil.rmtree(pacs_tree / "photo" / "person")
    (pacs_tree / "photo" / "zebra").mkdir()
    one_line_error(
        run_cli("data", "manifest", "-D", "pacs", "-r", pacs_tree),
        pacs_tree / "photo",
        "missing 'person'",
        "unexpected 'zebra'",
    )
    shutil.rmtree(pacs_tree / "photo" / "zebra")
    one_line_error(
        run_cli("data", "split", "-D", "folder", "-r", pacs_tree),
        "class folders differ between domains",
        pacs_tree / "photo",
        "'person'",
    )


def test_empty_domain(pacs_tree, run_cli):
    for image in (pacs_tree / "sketch").rglob("*.png"):
        image.unlink()
    one_line_error(
        run_cli("data", "check", "-D", "pacs", "-r", pacs_tree),
        "no images in",
        pacs_tree / "sketch",
    )


def test_manifest_line_names_missing_file(pacs_tree, run_cli):
    assert run_cli("data", "manifest", "-D", "pacs", "-r", pacs_tree)[0] == 0
    (pacs_tree / "photo" / "dog" / "img1.png").unlink()
    err = one_line_error(
        run_cli("data", "check", "-D", "pacs", "-r", pacs_tree),
        pacs_tree / "photo" / "dog" / "img1.png",
    )
    assert "photo.txt:2" in err
    (pacs_tree / "manifests" / "cartoon.txt").write_text("cartoon/dog/img0.png seven\n")
    one_line_error(
        run_cli("data", "check", "-D", "pacs", "-r", pacs_tree, "-d", "C"), "cartoon.txt:1"
    )


@pytest.fixture
def broken_tree(pacs_tree: Path) -> tuple[Path, Path, Path]:
    """The tree with one garbage file and one truncated PNG in photo/dog."""
    corrupt = pacs_tree / "photo" / "dog" / "img0.png"
    corrupt.write_bytes(b"\x89PNG definitely not an image")
    truncated = pacs_tree / "photo" / "dog" / "img1.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    return pacs_tree, corrupt, truncated


def test_check_lists_unreadable_images(broken_tree, run_cli):
    root, corrupt, truncated = broken_tree
    result = run_cli("data", "check", "-D", "pacs", "-r", root, "-q", "-d", "photo")
    out = result[1]
    assert f"unreadable image {corrupt}" in out and f"unreadable image {truncated}" in out
    one_line_error(result, corrupt)


def test_cache_stops_at_unreadable_image_and_leaves_nothing(broken_tree, tmp_path, run_cli):
    root, corrupt, _ = broken_tree
    one_line_error(
        run_cli("data", "cache", "-D", "pacs", "-r", root, "-o", tmp_path / "c", "-q"),
        corrupt.parent,
    )
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.*"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_loader_raises_one_line(broken_tree, num_workers):
    root, corrupt, truncated = broken_tree
    items = domain_items(PACS, root, "photo")
    dataset = DomainDataset(items, build_transform(8, 8, train=True))
    loader = InfiniteLoader(dataset, 14, seed=0, num_workers=num_workers)
    with pytest.raises(UserError) as info:
        next(loader)  # one batch = the whole domain, so it contains the bad files
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert str(corrupt) in message or str(truncated) in message
    with pytest.raises(UserError, match="unreadable image"):
        list(eval_loader(dataset, 4, num_workers=num_workers))
