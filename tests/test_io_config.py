"""Atomic writes and RunConfig validation."""

import os
import stat

import pytest

from domadapt.config import RunConfig, make_config
from domadapt.errors import UserError
from domadapt.io import atomic_directory, atomic_write_json, read_json


def test_atomic_write_replaces_whole_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "t.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert read_json(path) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_atomic_directory_is_all_or_nothing(tmp_path):
    dest = tmp_path / "ds"
    with pytest.raises(RuntimeError), atomic_directory(dest) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(dest) as tmp:
        (tmp / "whole").write_text("x")
    assert (dest / "whole").is_file()


@pytest.mark.parametrize(
    "bad",
    [{"seed": -1}, {"split_seed": -2}, {"weight_decay": -1e-3}, {"gate_lr_mult": -10.0},
     {"adv_weight": -1.0}, {"disc_hidden": 0}, {"iters": 0}, {"lr": 0.0},
     {"norm": "no-such-norm"}, {"method": "no-such-method"}, {"test_fraction": 1.0}],
)
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        make_config("styledigits", source="gray", target="color", **bad)


def test_key_ignores_paths_and_cadence_but_not_hyperparameters():
    a = RunConfig(source="Art", target="Clipart")
    assert a.key() == a.replace(root="/elsewhere", num_workers=8, eval_every=7).key()
    assert a.key() != a.replace(seed=1).key() != a.replace(norm="bin").key()


def test_csv_text_neutralises_formulas_in_text_cells_only():
    import pandas as pd

    from domadapt.io import csv_text
    frame = pd.DataFrame({"name": ["=HYPERLINK(1)", "+one", "-two", "@x", "\tt", "-4.8", "ok"],
                          "-acc": [-1.5, 2.0, 0.5, -3.0, 1.0, 2.0, 3.0]})
    lines = csv_text(frame, index=False).splitlines()
    assert lines[0] == "name,'-acc"
    assert [line.rsplit(",", 1)[0] for line in lines[1:]] == [
        "'=HYPERLINK(1)", "'+one", "'-two", "'@x", "'\tt", "-4.8", "ok"]
    assert [line.rsplit(",", 1)[1] for line in lines[1:]][:4] == ["-1.5", "2.0", "0.5", "-3.0"]
