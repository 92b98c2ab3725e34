"""The trainer's side of methods that own their update: checkpoints written before it (one
"optimizer", windows without per-statistic counts) still resume bit-identically; a non-finite
loss in a method's own step stops the run in one line; no torchrun for such methods."""

from __future__ import annotations

import json

import pytest
import torch
from test_cdan import _KillAt, _Killed, _numbers, log_rows, tiny_config, write_tiny_tree

from domadapt import engine
from domadapt.distributed import DistContext
from domadapt.errors import UserError
from domadapt.methods.mcd import MCD
from domadapt.rundir import RunDir
from domadapt.settings import build_data, resolve_config
from domadapt.train import NonFiniteLoss, run


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return write_tiny_tree(tmp_path_factory.mktemp("tiny") / "data")


def _as_old_checkpoint(rd: RunDir) -> None:
    """Rewrite checkpoint.pt the way the trainer wrote it before methods owned updates."""
    ckpt = rd.read_checkpoint()
    ckpt.pop("format", None)
    ckpt["optimizer"] = ckpt.pop("optimizers")["sgd"]
    ckpt["state"]["window"].pop("counts")
    rd.save_checkpoint(ckpt)


def test_an_old_checkpoint_resumes_bit_identically(tiny_tree, tmp_path, monkeypatch):
    # checkpoint every 3, evaluate every 2: the checkpoint at 3 holds a half-full window
    cfg = tiny_config(tiny_tree, "dann").replace(checkpoint_every=3)
    straight = run(cfg, tmp_path / "straight", device="cpu", quiet=True)
    hooks = engine.default_hooks
    with monkeypatch.context() as m:
        m.setattr(engine, "default_hooks", lambda: [*hooks(), _KillAt(3)])
        with pytest.raises(_Killed):
            run(cfg, tmp_path / "old", device="cpu", quiet=True)
    rd = RunDir(tmp_path / "old")
    assert rd.read_checkpoint()["state"]["window"]["iters"] == 1
    _as_old_checkpoint(rd)
    assert "optimizers" not in rd.read_checkpoint()
    resumed = run(cfg, tmp_path / "old", device="cpu", quiet=True)
    assert _numbers(resumed) == _numbers(straight)
    assert log_rows(tmp_path / "old") == log_rows(tmp_path / "straight")


def test_window_means_count_each_statistic_where_reported():
    w = engine.Window()
    w.add({"a": 1.0, "b": 4.0}, 2, 0.1)
    w.add({"a": 3.0}, 2, 0.1)
    assert w.means() == {"a": 2.0, "b": 4.0}
    old = {"sums": {"a": 4.0}, "iters": 2, "images": 4, "seconds": 0.2}  # saved before counts
    assert engine.Window.from_dict(old).means() == {"a": 2.0}


def _trainer(tiny_tree, tmp_path, method: str, ctx: DistContext | None = None, **options):
    cfg = resolve_config(tiny_config(tiny_tree, method, **options))
    return engine.Trainer(cfg, build_data(cfg), RunDir(tmp_path / "r"),
                          ctx or DistContext(torch.device("cpu")), quiet=True)


def test_a_non_finite_loss_in_an_own_step_stops_in_one_line(tiny_tree, tmp_path, monkeypatch):
    trainer = _trainer(tiny_tree, tmp_path, "mcd", mcd_steps=1)
    monkeypatch.setattr(MCD, "step_c", lambda self, x_s, x_t, opt: opt(
        "generator", torch.tensor(float("nan"), requires_grad=True)))
    with pytest.raises(NonFiniteLoss) as e:
        trainer.run_step()
    assert str(e.value).startswith("training diverged: the loss became non-finite at iteration 1 "
                                   "(generator_loss=nan)")


def test_own_update_methods_refuse_torchrun(tiny_tree, tmp_path):
    ctx = DistContext(torch.device("cpu"), rank=0, world_size=2)
    with pytest.raises(UserError, match="--method adda runs its own optimisation steps"):
        _trainer(tiny_tree, tmp_path, "adda", ctx=ctx)


@pytest.mark.parametrize("method,option", [("mcd", ["--mcd-steps", "2"]),
                                           ("adda", ["--adda-pretrain-share", "0.25"])])
def test_own_update_methods_train_from_the_cli(tiny_tree, tmp_path, run_cli, method, option):
    out = tmp_path / method
    code, stdout, err = run_cli(
        "train", "--preset", "styledigits", "--dataset", "folder", "--root", tiny_tree,
        "--source", "alpha", "--target", "beta", "--method", method, "--norm", "bin",
        "--iters", "4", "--eval-every", "4", "--checkpoint-every", "4", "--batch-size", "6",
        *option, "--quiet", "--device", "cpu", "--out", out)
    assert code == 0, err
    assert "target accuracy (last iteration)" in stdout
    options = json.loads((out / "config.json").read_text())["config"]["method_options"]
    assert options[option[0][2:].replace("-", "_")] == float(option[1])


def test_cpu_evaluation_reads_images_in_this_process_with_the_same_numbers(tiny_tree, tmp_path):
    # on CPU no worker processes: the eval datasets' image cache fills here and is reused
    cfg = resolve_config(tiny_config(tiny_tree, "dann", adabn=True, num_workers=2))
    data = build_data(cfg)
    trainer = engine.Trainer(cfg, data, RunDir(tmp_path / "r"), DistContext(torch.device("cpu")),
                             quiet=True)
    assert trainer.eval_workers == 0
    first = trainer.evaluate()
    assert all(ds.cached == len(ds) for ds in data.evals.values())
    with pytest.MonkeyPatch.context() as m:  # the same passes through 2 worker processes
        m.setattr(engine.Trainer, "eval_workers", 2)
        assert trainer.evaluate() == first
