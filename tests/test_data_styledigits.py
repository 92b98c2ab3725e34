"""styledigits: on-demand generation, determinism, atomicity, the committed record, style shift."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from domadapt.data import domain_items, get_dataset, resolve_root
from domadapt.data import styledigits as sd
from domadapt.data.manifest import build_manifests, write_splits
from domadapt.errors import UserError

RECORD = Path(__file__).resolve().parents[1] / "data_manifests" / f"styledigits-v{sd.VERSION}"
SPEC = get_dataset("styledigits")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """The default styledigits, generated on demand by resolve_root into a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOMADAPT_CACHE", str(cache))
        root = resolve_root(SPEC, None)
        assert root == cache / "styledigits-v1"
        marker = (root / sd.MARKER).stat().st_mtime_ns
        assert resolve_root(SPEC, None) == root and (root / sd.MARKER).stat().st_mtime_ns == marker
    return root


def test_layout_and_counts(generated):
    assert SPEC.domain_names(generated) == ["gray", "color", "texture", "sketch"]
    assert [SPEC.short_name(d, generated) for d in SPEC.domain_names(generated)] == [
        "G",
        "C",
        "T",
        "S",
    ]
    for domain in SPEC.domain_names(generated):
        items = domain_items(SPEC, generated, domain)
        assert len(items) == sd.NUM_IMAGES
        assert {label for _, label in items} == set(range(10))
    with Image.open(generated / "texture" / "3" / "0003.png") as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
    assert not list(generated.parent.glob(".styledigits-v1.*"))  # no temporary folder left


def test_same_bytes_twice(generated, tmp_path, run_cli):
    code, out, err = run_cli("data", "styledigits", "--out", tmp_path / "again", "-q")
    assert code == 0 and "styledigits written" in out, err
    files = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    assert len(files) == 4 * sd.NUM_IMAGES + 1
    _, mismatch, errors = filecmp.cmpfiles(generated, tmp_path / "again", files, shallow=False)
    assert not mismatch and not errors
    assert run_cli("data", "styledigits", "--out", tmp_path / "again")[1].startswith(
        "styledigits already complete"
    )


def test_matches_committed_record(generated, tmp_path):
    build_manifests(SPEC, generated, tmp_path)
    write_splits(SPEC, generated, tmp_path)
    for path in RECORD.rglob("*.txt"):
        assert path.read_text() == (tmp_path / path.relative_to(RECORD)).read_text(), path
    for line in (RECORD / "pixels.sha256").read_text().splitlines():
        digest, style = line.split()
        assert sd.content_digest(generated, style) == digest, f"{style} changed: bump VERSION"


def test_styles_differ_measurably(generated):
    """Colourfulness, brightness and background texture separate the four styles."""
    from sklearn.datasets import load_digits

    digits, n = load_digits(), 300
    stats = {}
    for s, style in enumerate(sd.STYLES):
        spread, bright, bg_std = [], [], []
        for i in range(n):
            path = generated / style.name / str(digits.target[i]) / f"{i:04d}.png"
            x = np.asarray(Image.open(path), dtype=float) / 255
            mask = sd.glyph_mask(digits.images[i], np.random.default_rng([0, s, i]))  # as rendered
            spread.append((x.max(axis=2) - x.min(axis=2)).mean())
            bright.append(x.mean())
            bg_std.append(x[mask < 0.01].std(axis=0).mean())
        stats[style.name] = {
            "spread": np.mean(spread),
            "bright": np.mean(bright),
            "bg_std": np.mean(bg_std),
        }
    assert stats["gray"]["spread"] == 0 and stats["sketch"]["spread"] < 0.1
    assert stats["color"]["spread"] > 0.3 and stats["texture"]["spread"] > 0.3
    assert stats["gray"]["bright"] < 0.4 and stats["sketch"]["bright"] > 0.7
    assert stats["color"]["bg_std"] < 0.01 and stats["gray"]["bg_std"] < 0.03
    assert stats["texture"]["bg_std"] > 0.05


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 50:
            raise KeyboardInterrupt
        return np.zeros((32, 32, 3), np.uint8)

    monkeypatch.setattr(sd, "render", failing)
    with pytest.raises(KeyboardInterrupt):
        sd.write_styledigits(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("DOMADAPT_CACHE", str(tmp_path))
    (tmp_path / "styledigits-v1" / "gray").mkdir(parents=True)  # e.g. a half copy by hand
    with pytest.raises(UserError, match="incomplete styledigits cache"):
        resolve_root(SPEC, None)


def test_refuses_non_empty_out(tmp_path, run_cli):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = run_cli("data", "styledigits", "--out", tmp_path)
    assert code != 0 and str(tmp_path) in err and "Traceback" not in err
    assert (tmp_path / "keep.txt").read_text() == "mine"
