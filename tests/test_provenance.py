"""Provenance: every run records what made its numbers (code, weights, data, kernel, CPU); a
resume appends an event; a run is keyed by its weights' content, not their path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_train import _options, _write_tree

from domadapt.backbones import build_backbone
from domadapt.config import make_config
from domadapt.errors import UserError
from domadapt.nn import bin_kernel as kernels
from domadapt.provenance import code_version, file_sha256, portable_command, portable_path
from domadapt.rundir import RunDir, cell_dir
from domadapt.train import run


@pytest.fixture()
def tree(tmp_path) -> Path:
    root = tmp_path / "data"
    _write_tree(root, per_class=6)
    return root


@pytest.fixture()
def weights(tmp_path) -> Path:
    """A digitnet state dict on disk (a local --pretrained file)."""
    torch.manual_seed(0)
    net, _ = build_backbone("digitnet", "none")
    path = tmp_path / "w" / "digitnet.pth"
    path.parent.mkdir()
    torch.save(net.state_dict(), path)
    return path


def _opts(tree: Path, **kw) -> dict:
    return _options(tree, iters=4, eval_every=2, checkpoint_every=2, batch_size=4) | kw


def test_a_run_records_every_provenance_field(tree, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_config(**_opts(tree, pretrained=str(weights)))
    run(cfg, tmp_path / "r", device="cpu", quiet=True)
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    prov = info["provenance"]
    # code: the checkout's commit (this test runs from the repository) or the package version
    assert prov["code"] == code_version() and prov["code"]["version"]
    assert prov["code"]["commit"] is None or len(prov["code"]["commit"]) == 40
    # the weights file's content hash, and it is what the key uses
    assert prov["pretrained_sha256"] == file_sha256(weights) == info["config"]["pretrained_sha256"]
    # the data actually read: one fingerprint per domain
    assert set(info["data"]["fingerprint"]) == {"alpha", "beta"}
    assert all(len(v) == 16 for v in info["data"]["fingerprint"].values())
    # the BIN kernel that ran
    kernel = prov["bin_kernel"]
    assert kernel == kernels.kernel_info()
    assert kernel["kernel"] in ("c", "torch")
    if kernel["kernel"] == "c":
        assert "-ffp-contract=off" in kernel["flags"] and "-march=native" not in kernel["flags"]
        assert kernel["compiler"]
    # the machine of the first start, and no absolute path anywhere
    rt = info["runtime"]
    assert rt["cpu"] and rt["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rt["threads"] == torch.get_num_threads() and len(rt["host"]) == 12
    assert rt["iteration"] == 0 and info["resumes"] == []
    assert info["config"]["root"] == "data" and info["config"]["pretrained"] == "w/digitnet.pth"
    assert str(tmp_path) not in json.dumps(info)


def test_bn_runs_record_no_bin_kernel(tree, tmp_path):
    run(make_config(**_opts(tree, norm="bn")), tmp_path / "r", device="cpu", quiet=True)
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert info["provenance"]["bin_kernel"] is None
    assert info["provenance"]["pretrained_sha256"] is None  # --pretrained none


def test_a_resume_appends_an_event_and_keeps_the_first_start(tree, tmp_path):
    cfg = make_config(**_opts(tree))
    rd = RunDir(tmp_path / "r")
    run(cfg, rd.path, device="cpu", quiet=True)
    first = json.loads(rd.config_path.read_text())
    rd.metrics_path.unlink()  # as if killed after its last checkpoint
    run(cfg.replace(num_workers=1), rd.path, device="cpu", quiet=True)
    info = json.loads(rd.config_path.read_text())
    assert {k: v for k, v in info.items() if k != "resumes"} == {
        k: v for k, v in first.items() if k != "resumes"}
    (event,) = info["resumes"]
    assert event["iteration"] == 4  # resumed from the checkpoint of the last iteration
    assert event["cpu"] and event["cpu_capability"] and len(event["host"]) == 12
    assert event["time"] and event["code"] == code_version()


def test_resume_over_changed_data_is_refused_and_changes_no_file(tree, tmp_path):
    cfg = make_config(**_opts(tree))
    rd = RunDir(tmp_path / "r")
    run(cfg, rd.path, device="cpu", quiet=True)
    rd.metrics_path.unlink()
    before = {p.name: p.read_bytes() for p in rd.path.iterdir() if p.is_file()}
    shutil.copy(tree / "beta" / "bar" / "0.png", tree / "beta" / "bar" / "extra.png")
    with pytest.raises(UserError, match="images of beta changed"):
        run(cfg, rd.path, device="cpu", quiet=True)
    assert {p.name: p.read_bytes() for p in rd.path.iterdir() if p.is_file()} == before


def test_the_same_weights_named_by_another_path_are_the_same_run(weights, tmp_path):
    copy = tmp_path / "elsewhere" / "copy.pth"
    copy.parent.mkdir()
    shutil.copy(weights, copy)
    base = {"dataset": "folder", "source": "a", "target": "b", "backbone": "digitnet"}
    a = make_config(**base, pretrained=str(weights))
    b = make_config(**base, pretrained=os.path.relpath(copy))
    assert a.key() == b.key() and a.legacy_key() != b.legacy_key()
    other = weights.parent / "other.pth"
    torch.save({k: v + 1 for k, v in torch.load(weights).items()}, other)
    assert make_config(**base, pretrained=str(other)).key() != a.key()


def test_runs_keyed_by_the_weights_path_are_still_found(weights, tmp_path):
    """Compatibility rule: a committed sweep's run directory, named with the key of the
    `--pretrained` string, is found (not retrained) by today's hashed config."""
    cfg = make_config(dataset="folder", source="a", target="b", backbone="digitnet",
                      pretrained=str(weights))
    legacy = cfg.replace(pretrained_sha256=None)
    old_dir = tmp_path / "runs" / f"{cfg.name()}-{legacy.key()}"
    assert cell_dir(tmp_path, cfg).name.endswith(cfg.key())  # nothing there yet: new name
    old_dir.mkdir(parents=True)
    assert cell_dir(tmp_path, cfg) == old_dir
    assert cfg.has_key(legacy.key()) and cfg.has_key(cfg.key()) and not cfg.has_key("x")
    # a legacy config keeps its key exactly (the field is left out of the hash when unset)
    assert legacy.key() == legacy.legacy_key()


def test_recorded_commands_and_paths_are_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "sweeps" / "a")
    cmd = portable_command(["/abs/venv/bin/domadapt", "sweep", "--out", out,
                            f"--root={tmp_path / 'data'}", "--iters", "3"])
    assert cmd == "domadapt sweep --out sweeps/a --root=data --iters 3"
    assert portable_path("../x/y") == "../x/y"


def test_a_sweep_records_its_command_with_relative_paths(run_cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweeps" / "s"
    code, _, err = run_cli("sweep", "--dataset", "styledigits", "--preset", "styledigits",
                           "--tasks", "G:C", "--methods", "source-only", "--norms", "bn",
                           "--seeds", "0", "--iters", "2", "--eval-every", "2",
                           "--checkpoint-every", "2", "--image-size", "16", "--resize-size",
                           "18", "--device", "cpu", "--quiet", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "sweep.json").read_text())
    assert "--out sweeps/s" in record["command"] and str(tmp_path) not in record["command"]
    assert not os.path.isabs(record["root"])
    (run_dir,) = (out / "runs").iterdir()
    info = json.loads((run_dir / "config.json").read_text())
    assert str(tmp_path) not in json.dumps(info)


def test_dirty_means_a_change_of_the_code_not_of_results(tmp_path, monkeypatch):
    import subprocess

    from domadapt import provenance

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "domadapt").mkdir()
    (tmp_path / "domadapt" / "core.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "runs.csv").write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    def fresh() -> dict:  # code_version is cached per process
        provenance.code_version.cache_clear()
        return provenance.code_version()

    monkeypatch.setattr(provenance, "PACKAGE_DIR", (tmp_path / "domadapt").resolve())
    try:
        assert fresh()["dirty"] is False
        (tmp_path / "results" / "runs.csv").write_text("b\n")  # a sweep rewriting its tables
        assert fresh()["dirty"] is False
        (tmp_path / "domadapt" / "core.py").write_text("x = 2\n")
        version = fresh()
        assert version["dirty"] is True and len(version["commit"]) == 40
    finally:
        provenance.code_version.cache_clear()  # the next caller sees this checkout again
