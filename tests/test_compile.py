"""--compile: the setting (in the run key only when set, recorded in config.json), a compiled
run that resumes bit-identically with no graph break, one line where no C++ compiler exists,
and copies of compiled modules that run their own weights (AdaBN)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cdan import _KillAt, _Killed, _numbers, log_rows, tiny_config, write_tiny_tree
from torch import nn
from torch._dynamo.utils import counters

from domadapt import engine
from domadapt.config import RunConfig, make_config
from domadapt.nn import compiled
from domadapt.nn.adabn import adapt_batch_stats
from domadapt.train import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return write_tiny_tree(tmp_path_factory.mktemp("tiny") / "data")


def test_unset_compile_keeps_the_committed_run_keys():
    runs = sorted((REPO / "results" / "styledigits-methods" / "runs").glob("*/config.json"))[:4]
    assert runs
    for path in runs:
        info = json.loads(path.read_text())
        cfg = RunConfig.from_dict(info["config"])
        assert cfg.compile is False and cfg.key() == info["key"], path


def test_compile_is_in_the_key_when_set():
    """Compiled kernels round differently from eager ones: a compiled run is another run."""
    cfg = make_config("styledigits", source="color", target="gray")
    on = cfg.replace(compile=True)
    assert on.key() != cfg.key()
    assert RunConfig.from_dict(on.to_dict()) == on and RunConfig.from_dict(on.to_dict()).compile


needs_cxx = pytest.mark.skipif(compiled._cxx() is None, reason="no C++ compiler for inductor")


@needs_cxx
def test_compiled_run_resumes_bit_identically_without_graph_breaks(tiny_tree, tmp_path,
                                                                    monkeypatch):
    """DANN + BIN compiled: 4 iterations straight equal 2 + kill + resume 2, bit for bit; no
    graph break anywhere in the compiled parts; config.json records the setting."""
    cfg = tiny_config(tiny_tree, "dann").replace(compile=True)
    torch._dynamo.reset()
    counters.clear()
    straight = run(cfg, tmp_path / "straight", device="cpu", quiet=True)
    hooks = engine.default_hooks
    with monkeypatch.context() as m:
        m.setattr(engine, "default_hooks", lambda: [*hooks(), _KillAt(2)])
        with pytest.raises(_Killed):
            run(cfg, tmp_path / "resumed", device="cpu", quiet=True)
    torch._dynamo.reset()  # the resumed run compiles again, as a new process would
    resumed = run(cfg, tmp_path / "resumed", device="cpu", quiet=True)
    assert _numbers(resumed) == _numbers(straight)
    assert log_rows(tmp_path / "resumed") == log_rows(tmp_path / "straight")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 4  # backbone, bottleneck, classifier, disc.
    info = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert info["config"]["compile"] is True and info["key"] == cfg.key()
    assert info["runtime"]["compile"]["backend"] == "inductor"
    assert info["runtime"]["compile"]["cxx"]


def test_without_a_cxx_compiler_compile_is_one_line(tiny_tree, tmp_path, run_cli, monkeypatch):
    """inductor's own compiler search finds nothing: exit 1, one line, nothing trained."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    compiled._cxx.cache_clear()
    try:
        code, _, err = run_cli(
            "train", "--preset", "styledigits", "--dataset", "folder", "--root", tiny_tree,
            "--source", "alpha", "--target", "beta", "--method", "dann", "--norm", "bin",
            "--iters", "2", "--batch-size", "6", "--compile", "--quiet", "--device", "cpu",
            "--out", tmp_path / "run")
    finally:
        compiled._cxx.cache_clear()
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "--compile" in lines[0] and "C++ compiler" in lines[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())


def test_copies_of_compiled_modules_run_their_own_weights():
    """A deep copy of a compiled module would run the original's compiled forward (its weights,
    its buffers): `uncompiled_copy` and AdaBN's copy run their own, and leave the original's
    running statistics alone."""
    net = _net()
    net.compile()
    clone = compiled.uncompiled_copy(net)
    assert compiled.is_compiled(net) and not any(map(compiled.is_compiled, clone.modules()))
    before = net[1].running_mean.clone()
    adapted = adapt_batch_stats(net, [torch.randn(4, 3, 6, 6) + 3])
    assert torch.equal(net[1].running_mean, before)
    assert not torch.equal(adapted[1].running_mean, before)
    assert not compiled.is_compiled(adapted)


def test_compiled_parts_are_the_model_children_and_the_heads(tiny_tree):
    from domadapt.methods import build_method
    from domadapt.models import build_model
    from domadapt.settings import resolve_config

    cfg = resolve_config(tiny_config(tiny_tree, "dann"))
    method = build_method("dann", build_model(cfg, 3), cfg.method_options, num_classes=3)
    parts = compiled.compiled_parts(method)
    assert list(parts) == ["model.backbone", "model.bottleneck", "model.classifier",
                           "discriminator"]
    keys = set(method.state_dict())
    compiled.compile_modules(method)  # lazily: nothing is compiled before a call
    assert set(method.state_dict()) == keys and all(map(compiled.is_compiled, parts.values()))
    assert not compiled.is_compiled(method) and not compiled.is_compiled(method.model)
