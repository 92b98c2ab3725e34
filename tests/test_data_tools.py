"""`domadapt data cache` (pre-resized copy) and `domadapt data check` on a healthy tree."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from domadapt.data import domain_items, get_dataset
from domadapt.data.testing import write_image_tree

FOLDER = get_dataset("folder")


def test_cache_builds_a_resized_valid_root(tmp_path, run_cli):
    root = write_image_tree(
        tmp_path / "src", ["day", "night"], ["cat", "dog"], 2, size=24, ext=".png"
    )
    Image.new("RGB", (40, 20), (200, 10, 10)).save(root / "day" / "cat" / "wide photo.bmp")
    Image.new("RGB", (6, 6)).save(root / "night" / "dog" / "small.JPEG")
    (root / "night" / "empty").mkdir()
    (root / "day" / "empty").mkdir()
    out = tmp_path / "cache"
    code, stdout, err = run_cli(
        "data", "cache", "-D", "folder", "-r", root, "--size", 10, "-o", out
    )
    assert code == 0, err
    assert "10 images resized to 10px" in stdout
    with Image.open(out / "day" / "cat" / "wide photo.jpg") as image:
        assert image.format == "JPEG" and image.size == (20, 10)
    with Image.open(out / "night" / "dog" / "small.jpg") as image:
        assert image.size == (6, 6)  # never enlarged
    assert FOLDER.class_names(out) == ["cat", "dog", "empty"]
    cached = {p.relative_to(out).as_posix() for p, _ in domain_items(FOLDER, out, "day")}
    source = {
        Path(p.relative_to(root)).with_suffix(".jpg").as_posix()
        for p, _ in domain_items(FOLDER, root, "day")
    }
    assert cached == source
    code, stdout, err = run_cli("data", "check", "-D", "folder", "-r", out, "-q")
    assert code == 0 and ["night", "N", "5", "-", "ok"] in [
        line.split() for line in stdout.splitlines()
    ], err
    code, _, err = run_cli(
        "data", "cache", "-D", "folder", "-r", root, "-o", out
    )  # never overwrites
    assert code != 0 and f"output folder already exists and is not empty: {out}" in err


def test_cache_refuses_name_collisions(tmp_path, run_cli):
    root = write_image_tree(tmp_path / "src", ["a", "b"], ["x"], 1, ext=".png")
    (root / "a" / "x" / "img0.jpg").write_bytes((root / "a" / "x" / "img0.png").read_bytes())
    code, _, err = run_cli("data", "cache", "-D", "folder", "-r", root, "-o", tmp_path / "c")
    assert code != 0 and "a/x/img0.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()
