"""Portability: what a README command needs runs without Linux-only pieces (CPU affinity, fcntl,
process groups) and without a C compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep import fake_runner
from test_train import _cli_args, _options, _write_tree

from domadapt.system import usable_cores

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# Loaded by every interpreter started with it on PYTHONPATH (the sweep's spawned workers too):
# the functions that exist on Linux only, or on no Windows, are taken away.
WITHOUT_LINUX_ONLY = """
import os, sys
for name in ("sched_getaffinity", "setpgrp", "getpgrp", "killpg"):
    if hasattr(os, name):
        delattr(os, name)
sys.modules["fcntl"] = None  # `import fcntl` raises ImportError
"""


def test_usable_cores_without_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    if hasattr(os, "sched_getaffinity"):
        assert usable_cores() == len(os.sched_getaffinity(0))
        monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cores() == (getattr(os, "process_cpu_count", os.cpu_count)() or 1) >= 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    assert usable_cores() == 1


def checked_runner(*args, **kw) -> dict:
    """fake_runner, in a worker that really lacks the Linux-only functions."""
    assert not hasattr(os, "sched_getaffinity") and not hasattr(os, "setpgrp")
    with pytest.raises(ImportError):
        import fcntl  # noqa: F401
    return fake_runner(*args, **kw)


def test_two_worker_sweep_without_linux_only_functions(tmp_path: Path) -> None:
    """`domadapt sweep --workers 2` as on macOS / Windows: no CPU affinity, no fcntl (filelock
    then locks without it), no process groups; every cell runs once, in two workers."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WITHOUT_LINUX_ONLY)
    code = f"""
import json, os, sys
sys.path.insert(0, {str(TESTS)!r})
import filelock, test_portable, test_sweep
from domadapt.sweep import ProcessLauncher, make_launcher, run_sweep
assert not hasattr(os, "sched_getaffinity") and not filelock.has_fcntl
launcher = make_launcher("local", workers=2, device="cpu", sweep_dir=sys.argv[1])
assert isinstance(launcher, ProcessLauncher) and launcher.workers == 2
report = run_sweep(test_sweep.toy_plan(), sys.argv[1], launcher, quiet=True,
                   runner=test_portable.checked_runner)
print(json.dumps({{"ran": report.ran, "failed": len(report.failed)}}))
"""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sweep")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ran": 10, "failed": 0}
    runs = list((tmp_path / "sweep" / "runs").iterdir())
    pids = {json.loads((d / "calls.jsonl").read_text())["pid"] for d in runs}
    assert len(runs) == 10 and len(pids) == 2  # each cell once, two worker processes


def test_bin_run_without_a_c_compiler(tmp_path: Path) -> None:
    """No compiler on PATH: a BIN run trains on the torch path, says so in one stderr line,
    and config.json records it."""
    tree = tmp_path / "data"
    _write_tree(tree, per_class=4)
    args = _cli_args(_options(tree, iters=2, eval_every=2, checkpoint_every=2, batch_size=4))
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "DOMADAPT_BIN_KERNEL")}
    env |= {"PATH": str(empty), "PYTHONPATH": str(REPO), "DOMADAPT_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-m", "cli", "train", *args, "--out",
                           str(tmp_path / "run"), "--quiet", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "torch path" in ln]
    assert len(lines) == 1 and "no C compiler" in lines[0]
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["provenance"]["bin_kernel"]["kernel"] == "torch"
    assert "no C compiler" in info["provenance"]["bin_kernel"]["reason"]
