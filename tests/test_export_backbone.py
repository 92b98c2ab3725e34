"""`domadapt export-backbone`: a finished BN run's backbone as a `--pretrained` state dict, so a
second run (BN or BIN) starts from exactly the weights the first one trained."""

from __future__ import annotations

import json

import pytest
import torch

from domadapt.backbones import build_backbone
from domadapt.config import make_config
from domadapt.models import build_model
from domadapt.nn.bin import BatchInstanceNorm2d
from domadapt.train import load_trained, run

TINY = {"iters": 2, "eval_every": 2, "checkpoint_every": 2, "batch_size": 4, "num_workers": 0}


def _train(path, **over):
    run(make_config("styledigits", source="gray", target="color", **TINY | over), path,
        device="cpu", quiet=True)
    return path


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("export") / "bn", norm="bn")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def test_the_exported_backbone_is_the_trained_one_and_a_bin_run_starts_from_it(
        run_cli, bn_run, tmp_path):
    out = tmp_path / "weights" / "gray_bn.pth"
    code, text, _ = run_cli("export-backbone", bn_run, out)
    assert code == 0 and f"--pretrained {out}" in text
    _, trained = load_trained(bn_run)
    exported = torch.load(out, weights_only=True)
    _assert_same(exported, trained.backbone.state_dict())
    # --pretrained OUT loads it unchanged (every key, nothing left at its random init)
    backbone, _ = build_backbone("digitnet", str(out))
    _assert_same(backbone.state_dict(), exported)
    # a BIN run from it: each BIN layer holds the trained BN's affine and running statistics,
    # its gates at 1, so the second stage starts from the first stage's network
    cfg = make_config("styledigits", source="gray", target="color", norm="bin",
                      pretrained=str(out), **TINY)
    bins = [m for m in build_model(cfg, 10).backbone.modules()
            if isinstance(m, BatchInstanceNorm2d)]
    bns = [m for m in trained.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bins) == len(bns) == 3
    for b, n in zip(bins, bns):
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(b, name), getattr(n, name)), name
        assert torch.all(b.rho == 1)


def test_a_torchvision_backbone_exports_without_its_head(run_cli, tmp_path):
    path = _train(tmp_path / "mnv2", norm="bn", backbone="mobilenet_v2", pretrained="none",
                  image_size=32, resize_size=32)
    out = tmp_path / "mnv2.pth"
    assert run_cli("export-backbone", path, out)[0] == 0
    backbone, _ = build_backbone("mobilenet_v2", str(out))
    _assert_same(backbone.state_dict(), load_trained(path)[1].backbone.state_dict())


def test_a_bin_run_is_refused_with_one_line_and_nothing_written(run_cli, tmp_path):
    path = _train(tmp_path / "bin", norm="bin")
    out = tmp_path / "bin.pth"
    code, text, err = run_cli("export-backbone", path, out)
    assert code != 0 and not out.exists()
    assert "only BN runs export a backbone" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in text + err


def test_a_missing_run_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("export-backbone", tmp_path / "nothing", tmp_path / "x.pth")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_two_stage_sweep_starts_each_task_from_its_source_export(run_cli, bn_run, tmp_path):
    """Stage 1 exported as weights/gray.pth; stage 2 sweeps with --pretrained
    weights/{source}.pth: the gray -> color cell records that file's hash."""
    from domadapt.provenance import file_sha256

    assert run_cli("export-backbone", bn_run, tmp_path / "weights" / "gray.pth")[0] == 0
    code, _, err = run_cli(
        "sweep", "--dataset", "styledigits", "--preset", "styledigits", "--tasks", "G:C",
        "--methods", "dann", "--norms", "bin", "--seeds", "0", "--iters", "2",
        "--eval-every", "2", "--batch-size", "4", "--pretrained",
        tmp_path / "weights" / "{source}.pth", "--out", tmp_path / "s", "--quiet")
    assert code == 0, err
    (config,) = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("runs/*/config.json")]
    assert config["provenance"]["pretrained_sha256"] == file_sha256(
        tmp_path / "weights" / "gray.pth")
    assert config["config"]["pretrained"].endswith("weights/gray.pth")
