"""Fault injection: what long runs and sweeps meet, and that nothing finished is ever lost.

Each test injects real faults (ENOSPC from the kernel's sync call, truncated or overwritten
files, SIGKILL of a sweep worker or of a whole sweep, SIGTERM at a random batch), then checks
that the run or sweep resumes and ends with the numbers of an uninterrupted run, and that no
finished result is missing or half-written. With DOMADAPT_FAULT_LOG set, every injection
appends {"fault", "recovered", "lost"} there (benchmarks/fault_report.py makes the README
figure from it); the record is written before the asserts, so a failure is counted too.
`lost` counts finished results (cells of a sweep) damaged by the fault; it is None where no
result had finished before the fault (a single run: what it risks is its progress, and
"recovered" says whether that came back exactly).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FOREGROUND_SIGINT

from domadapt.config import make_config
from domadapt.data.dataset import DomainDataset
from domadapt.data.loaders import InfiniteLoader
from domadapt.data.testing import write_image_tree
from domadapt.errors import UserError
from domadapt.rundir import RunDir, cell_dir
from domadapt.sweep import FAILED, LocalLauncher, ProcessLauncher, plan_sweep, run_sweep
from domadapt.train import run

TESTS = Path(__file__).resolve().parent
TIMING_KEYS = {"wall_seconds", "train_seconds", "images_per_second"}
ITERS, EVERY = 20, 5


def read_checkpoint(path: Path) -> dict:
    return RunDir(path.parent).read_checkpoint(path=path)


# -- set-up -------------------------------------------------------------------------------------

def add_archive_leftovers(root: Path) -> None:
    """What a macOS zip unpacked in a notebook leaves: every run here trains on such a root."""
    (root / "__MACOSX" / "alpha" / "one").mkdir(parents=True)
    (root / "__MACOSX" / "alpha" / "one" / "._img0.png").write_bytes(b"\x00\x05\x16\x07")
    (root / ".DS_Store").write_bytes(b"Bud1")
    (root / "alpha" / ".ipynb_checkpoints").mkdir()
    (root / "beta" / "two" / "._img1.png").write_bytes(b"not an image")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = write_image_tree(tmp_path_factory.mktemp("faults") / "data", ["alpha", "beta"],
                            ["one", "three", "two"], 8, size=16)
    add_archive_leftovers(root)
    return root


def options(tree: Path, **kw) -> dict:
    base = {"dataset": "folder", "root": str(tree), "source": "alpha", "target": "beta",
            "method": "dann", "norm": "bin", "backbone": "digitnet", "pretrained": "none",
            "iters": ITERS, "batch_size": 8, "image_size": 16, "resize_size": 18,
            "bottleneck_dim": 16, "disc_hidden": 32, "lr": 0.05, "backbone_lr_mult": 1.0,
            "eval_every": EVERY, "checkpoint_every": EVERY, "num_workers": 0, "seed": 0}
    return base | kw


def numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> dict:
    """Metrics of the uninterrupted run every faulted run must end with."""
    return numbers(run(make_config(**options(tree)), tmp_path_factory.mktemp("ref") / "run",
                       device="cpu", quiet=True))


@pytest.fixture
def record():
    """record(fault, recovered, lost): one injection for the README figure (if logging)."""
    def _record(fault: str, recovered: bool, lost: int | None = None) -> None:
        if path := os.environ.get("DOMADAPT_FAULT_LOG"):
            with open(path, "a") as f:
                f.write(json.dumps({"fault": fault, "recovered": bool(recovered),
                                    "lost": lost}) + "\n")
    return _record


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted atomic writes."""
    return sorted(p.name for p in folder.rglob(".*.tmp"))


# -- injectors ----------------------------------------------------------------------------------

@contextmanager
def disk_full_at(name: str, occurrence: int = 1) -> Iterator[list[str]]:
    """The `occurrence`-th sync of a file being written as `name` fails with ENOSPC, after
    half its data reached the disk (delayed allocation reports a full disk this late). Yields
    the list of files it failed."""
    real_fsync, seen, failed = os.fsync, [0], []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if Path(path).name.startswith(f".{name}."):
            seen[0] += 1
            if seen[0] == occurrence:
                os.truncate(path, os.fstat(fd).st_size // 2)
                failed.append(path)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "fsync", fsync)
    try:
        yield failed
    finally:
        mp.undo()


@contextmanager
def file_size_limit_from_batch(batch: int, limit: int) -> Iterator[None]:
    """From training batch `batch` on, the kernel refuses to grow any file of this process past
    `limit` bytes (RLIMIT_FSIZE; with SIGXFSZ ignored, write() fails with EFBIG): a real
    failing write, as on a full disk."""
    real_next, count = InfiniteLoader.__next__, [0]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def __next__(self):
        count[0] += 1
        if count[0] == batch:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        return real_next(self)

    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    mp = pytest.MonkeyPatch()
    mp.setattr(InfiniteLoader, "__next__", __next__)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        mp.undo()
        signal.signal(signal.SIGXFSZ, previous)


@contextmanager
def signal_at_batch(batch: int, signum: int) -> Iterator[None]:
    """Send this process `signum` while the loaders hand out their `batch`-th training batch
    (counted over all loaders: a DANN iteration draws two), i.e. in the middle of an iteration."""
    real_next, count = InfiniteLoader.__next__, [0]

    def __next__(self):
        count[0] += 1
        if count[0] == batch:
            os.kill(os.getpid(), signum)
        return real_next(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(InfiniteLoader, "__next__", __next__)
    try:
        yield
    finally:
        mp.undo()


@contextmanager
def signal_at_image(image: int, signum: int) -> Iterator[list[int]]:
    """Send this process `signum` while the `image`-th image of the run is read, counting
    training batches and evaluation passes alike (num_workers=0: all in this process). Yields
    a one-item list: how many images were read so far."""
    real_getitem, count = DomainDataset.__getitem__, [0]

    def __getitem__(self, key):
        count[0] += 1
        if count[0] == image:
            os.kill(os.getpid(), signum)
        return real_getitem(self, key)

    mp = pytest.MonkeyPatch()
    mp.setattr(DomainDataset, "__getitem__", __getitem__)
    try:
        yield count
    finally:
        mp.undo()


class StraySignal(Exception):
    pass


@pytest.fixture
def sigterm_guard():
    """SIGTERM outside a run's own handler must fail the test, not kill pytest."""
    def stray(signum, frame):
        raise StraySignal
    previous = signal.signal(signal.SIGTERM, stray)
    yield
    signal.signal(signal.SIGTERM, previous)


# -- disk full ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,occurrence", [("checkpoint.pt", 2), ("log.csv", 3),
                                             ("metrics.json", 1)])
def test_disk_full_during_a_run_write_keeps_the_last_good_state(tree, reference, tmp_path,
                                                                  record, name, occurrence):
    cfg, out = make_config(**options(tree)), tmp_path / "run"
    with disk_full_at(name, occurrence) as failed, pytest.raises(UserError) as info:
        run(cfg, out, device="cpu", quiet=True)
    message = str(info.value)
    ckpt = read_checkpoint(out / "checkpoint.pt")["state"]["iteration"]
    tmp = leftovers(out)
    metrics = run(cfg, out, device="cpu", quiet=True)  # disk freed: re-run
    record("disk full (run file)", numbers(metrics) == reference)

    assert len(failed) == 1 and message.count("\n") == 0
    assert message.startswith(f"no space left to write {out / name}") and "re-run" in message
    assert tmp == []
    assert ckpt == {"checkpoint.pt": EVERY, "log.csv": 2 * EVERY, "metrics.json": ITERS}[name]
    assert numbers(metrics) == reference


def test_a_real_failing_write_of_a_checkpoint_keeps_the_previous_one(tree, reference, tmp_path,
                                                                     record):
    cfg, out = make_config(**options(tree)), tmp_path / "run"
    with file_size_limit_from_batch(2 * 7, 4096), pytest.raises(UserError) as info:
        run(cfg, out, device="cpu", quiet=True)
    ckpt = read_checkpoint(out / "checkpoint.pt")["state"]["iteration"]
    tmp = leftovers(out)
    metrics = run(cfg, out, device="cpu", quiet=True)
    record("file-size limit hit by a checkpoint write (kernel EFBIG)",
           numbers(metrics) == reference)

    assert str(info.value).startswith(f"no space left to write {out / 'checkpoint.pt'} "
                                      f"(File too large)")
    assert ckpt == EVERY and tmp == []  # the write at iteration 10 failed, 5 is kept
    assert numbers(metrics) == reference


def _plan(tree: Path):
    """4 tiny DANN cells: alpha->beta and beta->alpha, each with BN and BIN."""
    o = options(tree)
    return plan_sweep(dataset="folder", root=str(tree), tasks="alpha:beta,beta:alpha",
                      methods="dann", norms="bn,bin", seeds="0", multidomain=False,
                      **{k: o[k] for k in ("backbone", "pretrained", "iters", "batch_size",
                                           "image_size", "resize_size", "bottleneck_dim",
                                           "disc_hidden", "lr", "backbone_lr_mult",
                                           "eval_every", "checkpoint_every", "num_workers")})


def finished(sweep_dir: Path) -> dict[str, dict]:
    """{cell: metrics numbers} of every finished cell (parsing them: none may be half-written)."""
    return {p.parent.name: numbers(json.loads(p.read_text()))
            for p in sorted((sweep_dir / "runs").glob("*/metrics.json"))}


@pytest.fixture(scope="module")
def sweep_reference(tree, tmp_path_factory) -> dict[str, dict]:
    """The numbers of every cell of `_plan`, run without faults."""
    sweep_dir = tmp_path_factory.mktemp("sweep-ref")
    run_sweep(_plan(tree), sweep_dir, LocalLauncher(), device="cpu", quiet=True)
    return finished(sweep_dir)


def test_disk_full_during_a_table_write_loses_no_result(tree, sweep_reference, tmp_path, record):
    plan = _plan(tree)
    with disk_full_at("runs.csv", 2), pytest.raises(UserError) as info:  # tables per cell
        run_sweep(plan, tmp_path, LocalLauncher(), device="cpu", quiet=True, tables_interval=0)
    before = finished(tmp_path)
    table = pd.read_csv(tmp_path / "runs.csv")  # whole: rebuilt on the way out
    tmp = leftovers(tmp_path)
    report = run_sweep(plan, tmp_path, LocalLauncher(), device="cpu", quiet=True)
    after = finished(tmp_path)
    lost = sum(after.get(cell) != m for cell, m in before.items())
    record("disk full (table)", after == sweep_reference, lost)

    assert str(info.value).startswith(f"no space left to write {tmp_path / 'runs.csv'}")
    assert len(before) == 2 and len(table) == 2 and tmp == []
    assert report.skipped == 2 and report.ran == len(plan.configs) - 2 and not report.failed
    assert after == sweep_reference and lost == 0
    assert len(pd.read_csv(tmp_path / "runs.csv")) == len(plan.configs)


# -- corrupt files ------------------------------------------------------------------------------

def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:  # bit rot in the middle of the file
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:])


def interrupted_run(cfg, out: Path, batch: int) -> int:
    """Run `cfg` until a SIGTERM at training batch `batch`; the iteration it stopped at."""
    with signal_at_batch(batch, signal.SIGTERM), pytest.raises(KeyboardInterrupt):
        run(cfg, out, device="cpu", quiet=True)
    assert not (out / "metrics.json").exists()
    return read_checkpoint(out / "checkpoint.pt")["state"]["iteration"]


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_corrupt_checkpoint_resumes_from_the_one_before(tree, reference, tmp_path, record,
                                                        sigterm_guard, capsys, run_cli, how):
    cfg, out = make_config(**options(tree)), tmp_path / "run"
    stopped = interrupted_run(cfg, out, batch=2 * 13)  # iteration 13: previous one at 10
    assert read_checkpoint(out / "checkpoint.prev.pt")["state"]["iteration"] == 10
    corrupt(out / "checkpoint.pt", how)
    capsys.readouterr()
    metrics = run(cfg, out, device="cpu", quiet=True)
    warning = capsys.readouterr().err
    record("corrupt checkpoint (the one before loads)", numbers(metrics) == reference)

    assert stopped == 13
    assert warning.count("\n") == 1 and warning.startswith(f"warning: {out / 'checkpoint.pt'}")
    assert "resuming from checkpoint.prev.pt" in warning
    assert numbers(metrics) == reference
    assert not (out / "checkpoint.prev.pt").exists()  # a finished run keeps one checkpoint

    # neither loads: one line naming the file and what to do; doing it restarts the run
    out2 = tmp_path / "run2"
    interrupted_run(cfg, out2, batch=2 * 12)
    corrupt(out2 / "checkpoint.pt", how)
    corrupt(out2 / "checkpoint.prev.pt", how)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options(tree).items()]
    code, _, err = run_cli("train", *args, "--out", out2, "--device", "cpu", "--quiet")
    assert code != 0 and err.count("\n") == 1
    assert err.startswith(f"error: {out2 / 'checkpoint.pt'}: ") and "delete both" in err
    (out2 / "checkpoint.pt").unlink()
    (out2 / "checkpoint.prev.pt").unlink()
    again = run(cfg, out2, device="cpu", quiet=True)
    record("corrupt checkpoint and the one before", numbers(again) == reference)
    assert numbers(again) == reference


def test_killed_between_the_two_renames_resumes_from_the_previous_checkpoint(
        tree, reference, tmp_path, record, sigterm_guard, capsys):
    """A crash after checkpoint.pt moved to checkpoint.prev.pt, before the new one took its
    name, leaves only the previous checkpoint: resumed from it, silently and exactly."""
    cfg, out = make_config(**options(tree)), tmp_path / "run"
    interrupted_run(cfg, out, batch=2 * 13)
    os.replace(out / "checkpoint.pt", out / ".checkpoint.pt.x.tmp")  # the new one, unnamed
    capsys.readouterr()
    metrics = run(cfg, out, device="cpu", quiet=True)
    record("killed between the checkpoint renames", numbers(metrics) == reference)
    assert capsys.readouterr().err == ""
    assert numbers(metrics) == reference


def test_corrupt_metrics_json_names_the_file_and_finishes_from_the_checkpoint(
        tree, reference, tmp_path, record, run_cli):
    cfg, out = make_config(**options(tree)), tmp_path / "run"
    run(cfg, out, device="cpu", quiet=True)
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    corrupt(out / "metrics.json", "truncated")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options(tree).items()]
    code, _, err = run_cli("train", *args, "--out", out, "--device", "cpu", "--quiet")
    (out / "metrics.json").unlink()  # what the message says to do
    metrics = run(cfg, out, device="cpu", quiet=True)
    record("corrupt metrics.json", numbers(metrics) == reference,
           lost=int(numbers(metrics) != reference))  # the finished result, back or not

    assert code != 0 and err.count("\n") == 1
    assert err.startswith(f"error: corrupt {out / 'metrics.json'}") and "delete it" in err
    assert numbers(metrics) == reference
    assert (out / "checkpoint.pt").stat().st_mtime_ns == stamp  # finished without retraining


# -- SIGTERM at random points -------------------------------------------------------------------

@pytest.fixture(scope="module")
def images_in_a_run(tree, tmp_path_factory) -> int:
    """How many images one run reads (training batches and evaluations)."""
    with signal_at_image(0, signal.SIGTERM) as count:
        run(make_config(**options(tree)), tmp_path_factory.mktemp("count") / "run",
            device="cpu", quiet=True)
    return count[0]


@pytest.mark.parametrize("seed", range(20))
def test_sigterm_at_a_random_point_resumes_exactly(tree, reference, images_in_a_run, tmp_path,
                                                   record, sigterm_guard, seed):
    """SIGTERM while image k is read, k uniform over every image the run reads (in a training
    batch or an evaluation pass): the run checkpoints at the end of that iteration and stops
    (exit code 130 from the CLI); resumed, it ends with the uninterrupted run's numbers."""
    image = int(np.random.default_rng(seed).integers(1, images_in_a_run + 1))
    cfg, out = make_config(**options(tree)), tmp_path / "run"
    with signal_at_image(image, signal.SIGTERM), pytest.raises(KeyboardInterrupt):
        run(cfg, out, device="cpu", quiet=True)
    stopped = read_checkpoint(out / "checkpoint.pt")["state"]["iteration"]
    done = (out / "metrics.json").exists()
    metrics = run(cfg, out, device="cpu", quiet=True)
    record("SIGTERM at a random point", numbers(metrics) == reference)

    assert 1 <= stopped <= ITERS and not done
    assert numbers(metrics) == reference


# -- sweeps: SIGKILL of a worker, of a whole sweep ----------------------------------------------

def killing_runner(cfg, run_dir: Path, *, kill: str, batch: int, **kw) -> dict:
    """train.run; the first process to run a cell whose name contains `kill` SIGKILLs itself
    (as the OOM killer does) at training batch `batch`. Each completion is logged once to
    SWEEP_DIR/completions.txt."""
    run_dir = Path(run_dir)
    try:
        fd = os.open(run_dir / "killed", os.O_CREAT | os.O_EXCL) if kill in run_dir.name else None
    except FileExistsError:
        fd = None
    if fd is not None:
        os.close(fd)
        with signal_at_batch(batch, signal.SIGKILL):
            run(cfg, run_dir, **kw)
    metrics = run(cfg, run_dir, **kw)
    with open(run_dir.parent.parent / "completions.txt", "a") as f:
        f.write(f"{run_dir.name} {os.getpid()}\n")
    return metrics


def completions(sweep_dir: Path) -> list[str]:
    path = sweep_dir / "completions.txt"
    return sorted(line.split()[0] for line in path.read_text().splitlines()) if path.exists() else []


def test_sigkilled_sweep_worker_fails_its_cell_which_reruns_next_time(
        tree, sweep_reference, tmp_path, record):
    plan = _plan(tree)
    victim = cell_dir(tmp_path, plan.configs[0]).name
    runner = partial(killing_runner, kill=victim, batch=2 * 12)
    report = run_sweep(plan, tmp_path, ProcessLauncher(workers=2), runner=runner,
                       device="cpu", quiet=True)
    first = finished(tmp_path)
    stopped = read_checkpoint(tmp_path / "runs" / victim / "checkpoint.pt")["state"]["iteration"]
    again = run_sweep(plan, tmp_path, LocalLauncher(), runner=runner, device="cpu", quiet=True)
    after = finished(tmp_path)
    lost = sum(after.get(cell) != m for cell, m in first.items())
    record("SIGKILL of a sweep worker", after == sweep_reference, lost)

    assert [(f.run_dir.name, f.status) for f in report.failed] == [(victim, FAILED)]
    assert "worker process died (exit code -9)" in str(report.failed[0].error)
    assert report.ran == len(plan.configs) - 1 and victim not in first and stopped == 10
    assert again.skipped == len(plan.configs) - 1 and again.ran == 1 and not again.failed
    assert after == sweep_reference and lost == 0
    assert completions(tmp_path) == sorted(sweep_reference)


def sweep_main(tree: str, sweep_dir: str, kill: str) -> None:
    """A sweep in its own process (the tests below start two on one directory)."""
    from cli.main import stop_on_sigterm

    stop_on_sigterm()
    report = run_sweep(_plan(Path(tree)), sweep_dir, LocalLauncher(), device="cpu", quiet=True,
                       runner=partial(killing_runner, kill=kill, batch=2 * 12))
    print(json.dumps({"skipped": report.skipped, "ran": report.ran,
                      "elsewhere": report.finished_elsewhere, "failed": len(report.failed)}))


def test_two_sweeps_on_one_directory_one_killed_run_each_cell_once(
        tree, sweep_reference, tmp_path, record):
    plan = _plan(tree)
    victim = cell_dir(tmp_path, plan.configs[1]).name  # second cell: both sweeps are running
    code = (FOREGROUND_SIGINT + f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
            f"import test_faults; test_faults.sweep_main({str(tree)!r}, {str(tmp_path)!r}, "
            f"{victim!r})")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    after = finished(tmp_path)
    record("SIGKILL of one of two sweeps sharing a directory", after == sweep_reference,
           sum(after.get(cell) != m for cell, m in sweep_reference.items()))

    assert codes == [-signal.SIGKILL, 0], outs
    survivor = json.loads(next(o for p, (o, _) in zip(procs, outs)
                               if p.returncode == 0).strip().splitlines()[-1])
    assert survivor["failed"] == 0
    assert survivor["skipped"] + survivor["ran"] + survivor["elsewhere"] == len(plan.configs)
    assert completions(tmp_path) == sorted(sweep_reference)  # each cell finished exactly once
    assert after == sweep_reference
    again = run_sweep(plan, tmp_path, LocalLauncher(), device="cpu", quiet=True)
    assert again.skipped == len(plan.configs) and again.ran == 0


# -- real-world folders -------------------------------------------------------------------------

def test_a_root_unpacked_from_a_macos_archive_trains(tree, reference):
    """The shared tree carries __MACOSX/, .DS_Store, .ipynb_checkpoints/ and a `._` fork."""
    assert (tree / "__MACOSX").is_dir() and (tree / "beta" / "two" / "._img1.png").is_file()
    assert reference["iters"] == ITERS
    assert sorted(reference["per_class_target_acc"]) == ["one", "three", "two"]


# -- a hostile user (issue #28): each probe ends in one line, and nothing is written ------------

def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): what a refusal must leave as it was."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def one_line_error(code: int, err: str) -> bool:
    return code != 0 and err.count("\n") == 1 and err.startswith("error: ")


@pytest.fixture
def small_tree(tmp_path) -> Path:
    """A fresh 2-domain, 2-class tree this test may change."""
    return write_image_tree(tmp_path / "data", ["alpha", "beta"], ["one", "two"], 3, size=16)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_manifest_cannot_lead_outside_its_root(small_tree, tmp_path, run_cli, record,
                                                  where):
    """`data cache` with --out beside --root once overwrote the image `../victim/...` named
    (its temporary folder lies beside --out)."""
    victim = tmp_path / "victim" / "photo.png"
    victim.parent.mkdir()
    victim.write_bytes((small_tree / "alpha" / "one" / "img0.png").read_bytes())
    before = victim.read_bytes()
    assert run_cli("data", "manifest", "--dataset", "folder", "--root", small_tree)[0] == 0
    line = "../victim/photo.png" if where == "relative" else str(victim)
    with open(small_tree / "manifests" / "alpha.txt", "a") as f:
        f.write(f"{line} 0\n")
    root = ["--dataset", "folder", "--root", small_tree]
    for args in (["data", "cache", *root, "--size", "8", "--out", tmp_path / "copy"],
                 ["data", "check", *root],
                 ["train", *root, "--source", "alpha", "--target", "beta", "--backbone",
                  "digitnet", "--pretrained", "none", "--out", tmp_path / "run"]):
        code, _, err = run_cli(*args)
        record("input: manifest path outside its root (data cache, data check, train)",
               one_line_error(code, err) and "outside the dataset root" in err
               and victim.read_bytes() == before)
        assert one_line_error(code, err) and "outside the dataset root" in err, (args, err)
    assert victim.read_bytes() == before
    assert not (tmp_path / "copy").exists() and not (tmp_path / "run" / "config.json").exists()


def test_a_manifest_label_must_be_ascii_digits(small_tree, run_cli, record):
    assert run_cli("data", "manifest", "--dataset", "folder", "--root", small_tree)[0] == 0
    with open(small_tree / "manifests" / "alpha.txt", "a") as f:
        f.write("alpha/one/img0.png \u00b2\n")  # superscript two: str.isdigit() says yes
    code, _, err = run_cli("data", "check", "--dataset", "folder", "--root", small_tree)
    record("input: manifest label not an ASCII number", one_line_error(code, err))
    assert one_line_error(code, err) and "bad manifest line" in err


def test_an_output_inside_the_dataset_root_is_refused(small_tree, run_cli, record):
    before = snapshot(small_tree)
    root = ["--dataset", "folder", "--root", small_tree]
    for args in (["train", *root, "--source", "alpha", "--target", "beta", "--backbone",
                  "digitnet", "--pretrained", "none", "--out", small_tree / "runs"],
                 ["data", "cache", *root, "--size", "8", "--out", small_tree / "alpha" / "c"],
                 ["sweep", *root, "--tasks", "alpha:beta", "--out", small_tree / "sweep"],
                 ["data", "manifest", *root, "--out", small_tree / "alpha" / "m"]):
        code, _, err = run_cli(*args)
        record("input: --out inside the dataset root (train, sweep, data cache, data manifest)",
               one_line_error(code, err) and snapshot(small_tree) == before)
        assert one_line_error(code, err) and "inside the dataset root" in err, (args, err)
    assert snapshot(small_tree) == before and sorted(p.name for p in small_tree.iterdir()) == [
        "alpha", "beta"]


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`'s lock until its stdin closes."""
    code = ("import sys; from domadapt.rundir import run_lock\n"
            f"with run_lock({str(run_dir)!r}) as mine:\n"
            "    print(mine, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(TESTS.parent)})
    assert proc.stdout.readline().strip() == "True"
    return proc


def test_a_second_writer_of_a_run_directory_is_refused(tree, tmp_path, run_cli, record):
    """Two `train` on one --out once mixed their files; the one that finds the run directory
    locked now ends with one line and writes nothing. The same directory run as a sweep cell
    (which holds that lock itself) trains."""
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        args = [f"--{k.replace('_', '-')}={v}" for k, v in options(tree, iters=2).items()]
        code, _, err = run_cli("train", *args, "--out", out, "--device", "cpu", "--quiet")
    finally:
        holder.communicate("")
    record("second writer of a locked run directory", one_line_error(code, err) and sorted(
        p.name for p in out.iterdir()) == [".lock"])
    assert one_line_error(code, err) and "in use by another run" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    cfg = make_config(**options(tree, iters=2))
    from domadapt.sweep import RAN, run_cell
    assert run_cell(cfg, out, device="cpu").status == RAN


def test_resume_over_changed_data_is_refused_and_changes_no_file(small_tree, tmp_path,
                                                                 sigterm_guard, record):
    cfg = make_config(**options(small_tree, iters=10, batch_size=4))
    out = tmp_path / "run"
    interrupted_run(cfg, out, batch=2 * 7)
    before = snapshot(out)
    write_image_tree(tmp_path / "more", ["alpha"], ["one"], 3, size=16, seed=1)
    for k in range(3):
        (tmp_path / "more" / "alpha" / "one" / f"img{k}.png").rename(
            small_tree / "alpha" / "one" / f"new{k}.png")
    with pytest.raises(UserError, match="alpha changed since the run started"):
        run(cfg.replace(num_workers=1), out, device="cpu", quiet=True)
    record("SIGTERM, then 3 images added and the run resumed (refused)", snapshot(out) == before)
    assert snapshot(out) == before


def test_a_refusal_lists_only_what_changes_the_result(tree, tmp_path):
    out = tmp_path / "run"
    run(make_config(**options(tree, iters=2)), out, device="cpu", quiet=True)
    other = make_config(**options(tree, iters=2, lr=0.02, num_workers=1, eval_every=1))
    with pytest.raises(UserError, match="holds a different run") as e:
        run(other, out, device="cpu", quiet=True)
    assert "lr: 0.05 -> 0.02" in str(e.value)
    assert "num_workers" not in str(e.value) and "eval_every" not in str(e.value)


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--momentum", "inf"),
                                        ("--weight-decay", "nan"), ("--adv-weight", "-inf"),
                                        ("--gate-lr-mult", "inf"), ("--crop-scale-min", "nan")])
def test_a_non_finite_option_is_refused(tree, tmp_path, run_cli, record, flag, value):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options(tree, iters=2).items()]
    code, _, err = run_cli("train", *args, flag, value, "--out", tmp_path / "run")
    record("input: NaN or infinite float option", one_line_error(code, err)
           and not (tmp_path / "run").exists())
    assert one_line_error(code, err) and f"{flag} must be a finite number" in err
    assert not (tmp_path / "run").exists()


def test_an_interrupted_data_command_says_so(tmp_path, record):
    """typer turned KeyboardInterrupt into a silent exit 130; every command now prints it."""
    env = os.environ | {"PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sd"
    proc = subprocess.Popen([sys.executable, "-c", FOREGROUND_SIGINT + "from cli.main import "
                             "main; main()", "data", "styledigits", "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not list(tmp_path.glob(".sd.*")):  # the build has started
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    record("SIGTERM to a data command (one line, exit 130)",
           proc.returncode == 130 and err == "error: interrupted\n" and not out.exists())
    assert proc.returncode == 130 and err == "error: interrupted\n"
    assert not out.exists()


def test_a_file_size_limit_in_data_cache_fails_naming_the_file(small_tree, tmp_path, record):
    """Under `ulimit -f 1` every cached image was cut to 1,024 bytes and the command said it
    had resized them all; now the short write is caught, named, and no copy is left."""
    out = tmp_path / "cache"
    big = write_image_tree(tmp_path / "big", ["alpha"], ["one"], 1, size=128)
    (big / "alpha" / "one" / "img0.png").rename(small_tree / "alpha" / "one" / "big.png")

    def limit() -> None:  # the child's files may not grow past 1 KiB (EFBIG; SIGXFSZ ignored)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(
            resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run([sys.executable, "-m", "cli", "data", "cache", "--dataset", "folder",
                           "--root", str(small_tree), "--size", "128", "--out", str(out),
                           "--quiet"], cwd=TESTS.parent, preexec_fn=limit, capture_output=True,
                          text=True, check=False, env=os.environ | {"PYTHONPATH": str(TESTS.parent)})
    record("file-size limit hit by data cache (kernel EFBIG)", proc.returncode != 0
           and proc.stderr.count("\n") == 1 and not out.exists())
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: no space left to write {out / 'alpha' / 'one'}")
    assert not out.exists() and not list(tmp_path.glob(".cache.*"))


def test_every_csv_neutralises_spreadsheet_formulas(tmp_path, record):
    """Domain names that a spreadsheet would execute (=, @) reach runs.csv and the tables as
    text starting with a single quote; negative numbers stay numbers."""
    import csv

    root = write_image_tree(tmp_path / "data", ["=cmd", "@two"], ["+one", "-two"], 4, size=16)
    o = options(root, iters=2, batch_size=4, eval_every=2, checkpoint_every=2)
    plan = plan_sweep(dataset="folder", root=str(root), tasks="=cmd:@two", methods="dann",
                      norms="bin", seeds="0", multidomain=False,
                      **{k: o[k] for k in ("backbone", "pretrained", "iters", "batch_size",
                                           "image_size", "resize_size", "bottleneck_dim",
                                           "disc_hidden", "lr", "backbone_lr_mult",
                                           "eval_every", "checkpoint_every", "num_workers")})
    sweep_dir = tmp_path / "sweep"
    assert run_sweep(plan, sweep_dir, LocalLauncher(), device="cpu", quiet=True).ran == 1
    cells = [cell for path in sorted(sweep_dir.rglob("*.csv"))
             for row in csv.reader(path.open()) for cell in row]
    assert "'=cmd" in cells and any(c.startswith("'=cmd") for c in cells)
    dangerous = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    record("input: domain names a spreadsheet executes, in every CSV", "'=cmd" in cells
           and all(is_number(c) for c in dangerous))
    assert all(is_number(c) for c in dangerous), dangerous  # only numbers may start so
    assert "'@two" in cells


def test_a_sixteen_bit_png_keeps_its_range(tmp_path, record):
    from PIL import Image

    from domadapt.data.dataset import load_image
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    decoded = np.asarray(load_image(tmp_path / "wide.png"), dtype=np.float64)[..., 0]
    record("input: 16-bit PNG", np.abs(decoded - ramp / 257).max() <= 0.5)
    assert np.abs(decoded - ramp / 257).max() <= 0.5  # convert('RGB') alone: almost all 255


def test_unknown_image_types_and_lost_found_are_listed_as_skipped(small_tree, run_cli,
                                                                  record):
    for ext in (".webp", ".tif", ".gif"):
        (small_tree / "alpha" / "one" / f"photo{ext}").write_bytes(b"not read")
    (small_tree / "lost+found").mkdir()
    code, out, _ = run_cli("data", "check", "--dataset", "folder", "--root", small_tree)
    record("input: .webp/.tif/.gif files and lost+found (listed as skipped)",
           code == 0 and "skipped 4 entries" in out)
    assert code == 0 and "skipped 4 entries" in out
    for name in ("lost+found/", "alpha/one/photo.webp", "alpha/one/photo.tif",
                 "alpha/one/photo.gif"):
        assert f"  {name}\n" in out
    assert "lost+found " not in out.split("skipped")[1].split("\n", 5)[-1]  # not a domain row
    from domadapt.data import get_dataset
    assert get_dataset("folder").domain_names(small_tree) == ["alpha", "beta"]


def test_one_class_warns_and_an_empty_test_split_is_refused_before_training(tmp_path, capsys,
                                                                           record):
    root = write_image_tree(tmp_path / "one", ["alpha", "beta"], ["only"], 6, size=16)
    run(make_config(**options(root, iters=2, batch_size=4)), tmp_path / "r1", device="cpu",
        quiet=True)
    err = capsys.readouterr().err
    record("input: a one-class dataset (warned)", "has one class (only)" in err)
    assert err.startswith("warning: ") and "has one class (only)" in err
    cfg = make_config(**{k: v for k, v in options(root, iters=2, batch_size=4).items()
                         if k not in ("source", "target", "method")},
                      setting="multidomain", method="source-only", test_fraction=0.001)
    with pytest.raises(UserError, match="leaves no test image"):
        run(cfg, tmp_path / "r2", device="cpu", quiet=True)
    record("input: multidomain --test-fraction 0.001 (empty test split)",
           not (tmp_path / "r2" / "config.json").exists())
    assert not (tmp_path / "r2" / "config.json").exists()


def test_data_split_with_a_negative_seed_is_one_line(small_tree, run_cli, record):
    code, _, err = run_cli("data", "split", "--dataset", "folder", "--root", small_tree,
                           "--seed", "-5")
    record("input: data split --seed -5", one_line_error(code, err))
    assert one_line_error(code, err) and "seed must be >= 0" in err


@pytest.mark.parametrize("command", ["gates", "analyze"])
def test_a_bad_checkpoint_of_a_finished_run_is_named_truly(tree, tmp_path, run_cli, record,
                                                           command):
    """`gates` and `analyze` said "delete it to restart the run", which restarts nothing."""
    out = tmp_path / "run"
    run(make_config(**options(tree, iters=2)), out, device="cpu", quiet=True)
    corrupt(out / "checkpoint.pt", "truncated")
    code, _, err = run_cli(command, out)
    record("corrupt checkpoint of a finished run (gates, analyze)",
           one_line_error(code, err) and "restart" not in err)
    assert one_line_error(code, err) and "restart" not in err
    assert err.startswith(f"error: {out / 'checkpoint.pt'}: unreadable checkpoint")
    assert f"delete {out / 'metrics.json'} and re-run" in err


@pytest.mark.parametrize("extra,message", [
    (["--method", "source-only", "--batch-size", "1"], "--batch-size must be at least 2"),
    (["--image-size", "2", "--resize-size", "2"], "--image-size 2 is too small for the digitnet"),
])
def test_options_a_network_cannot_take_are_refused_before_training(tree, tmp_path, run_cli,
                                                                   record, extra, message):
    """A BatchNorm over one sample, or a crop that digitnet's pooling shrinks to nothing,
    raised inside the first training step."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options(tree, iters=2).items()]
    code, _, err = run_cli("train", *args, *extra, "--out", tmp_path / "run", "--quiet")
    record("input: --batch-size 1 or --image-size 2 (digitnet)", one_line_error(code, err))
    assert one_line_error(code, err) and message in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def two_datasets(tree, tmp_path_factory) -> Path:
    """A directory of finished runs on two different folder datasets (no sweep.json)."""
    sweep = tmp_path_factory.mktemp("two-datasets")
    other = write_image_tree(tmp_path_factory.mktemp("other") / "data", ["color", "gray"],
                             ["one", "three", "two"], 4, size=16)
    run(make_config(**options(tree, iters=2)), sweep / "runs" / "a", device="cpu", quiet=True)
    run(make_config(**options(other, iters=2, source="color", target="gray", batch_size=4)),
        sweep / "runs" / "b", device="cpu", quiet=True)
    return sweep


def test_tables_over_runs_of_two_folder_datasets_work(two_datasets, tmp_path, run_cli, record):
    code, _, err = run_cli("tables", two_datasets, "--out", tmp_path / "t")
    record("input: tables over runs of two folder datasets (work)", code == 0)
    assert code == 0, err
    assert sorted(pd.read_csv(tmp_path / "t" / "runs.csv")["task"]) == ["alpha->beta",
                                                                      "color->gray"]


@pytest.mark.parametrize("file,damage", [
    ("metrics.json", lambda d: d.pop("target_acc")),
    ("metrics.json", lambda d: d.update(target_acc="0.9")),
    ("config.json", lambda d: d["config"].pop("seed")),
    ("config.json", lambda d: d["config"].update(setting=3)),
])
def test_tables_on_valid_json_lacking_a_field_is_one_line(two_datasets, tmp_path, run_cli,
                                                          record, file, damage):
    """A KeyError or TypeError before; a sweep rebuilding its tables died of it."""
    import shutil
    sweep = tmp_path / "sweep"
    shutil.copytree(two_datasets, sweep)
    path = sweep / "runs" / "a" / file
    content = json.loads(path.read_text())
    damage(content)
    path.write_text(json.dumps(content))
    code, _, err = run_cli("tables", sweep)
    record("config.json or metrics.json lacking a field (tables)", one_line_error(code, err))
    assert one_line_error(code, err) and err.startswith(f"error: corrupt {path}: ")

