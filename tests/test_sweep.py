"""Sweep orchestration with a stand-in for train.run: grid, skip/resume, locks, launchers,
concurrent sweeps, kill-and-resume, one-line errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from conftest import FOREGROUND_SIGINT, REPO

from cli.main import stop_on_sigterm
from domadapt.config import RunConfig
from domadapt.errors import UserError
from domadapt.io import atomic_write_json
from domadapt.rundir import cell_dir, run_lock
from domadapt.sweep import (
    FAILED,
    LocalLauncher,
    ProcessLauncher,
    SubmititLauncher,
    SweepPlan,
    build_grid,
    make_launcher,
    parse_seeds,
    run_sweep,
    split_list,
)
from domadapt.sweep.launchers.local import _worker_main
from domadapt.system import usable_cores
from domadapt.tables import Layout

TESTS = Path(__file__).resolve().parent
DOMAINS = ("Alpha", "Beta", "Gamma")
LAYOUT = Layout("toy", DOMAINS, {d: d[:2] for d in DOMAINS},
                tasks=(("Alpha", "Beta"), ("Beta", "Gamma")), methods=("source-only", "dann"),
                norms=("bn", "bin"), multidomain=True)


def fake_runner(cfg: RunConfig, run_dir: Path, *, device: str = "auto", quiet: bool = False,
                seconds: float = 0.0, fail: str | None = None, die: str | None = None,
                child: bool = False) -> dict:
    """Stands in for train.run: logs the call, takes `seconds`, writes config.json then
    metrics.json (the done marker) with an accuracy that depends on the cell. A cell whose
    name contains `fail` raises; one containing `die` ends its process abruptly. `child`
    starts a long-lived child process, as a data loader's workers are."""
    run_dir = Path(run_dir)
    kid = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL,  # not the test's pipes
                           stderr=subprocess.DEVNULL) if child else None
    call = {"pid": os.getpid(), "child": kid and kid.pid, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "tables": _count_rows(run_dir.parent.parent / "runs.csv"), "device": device,
            "quiet": quiet}
    with open(run_dir / "calls.jsonl", "a") as f:
        f.write(json.dumps(call) + "\n")
    atomic_write_json(run_dir / "config.json", {"config": cfg.to_dict(), "key": cfg.key()})
    time.sleep(seconds)
    if die is not None and die in run_dir.name:
        os._exit(3)
    if fail is not None and fail in run_dir.name:
        raise RuntimeError(f"diverged in {run_dir.name}")
    acc = 0.5 + 0.1 * (cfg.norm == "bin") + 0.01 * cfg.seed
    metrics = {"target_acc": acc, "mean_gate": None, "wall_seconds": seconds}
    if cfg.setting == "multidomain":
        metrics.update(domain_acc={d: acc for d in DOMAINS}, avg_acc=acc)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def _count_rows(path: Path) -> int:
    return len(pd.read_csv(path)) if path.is_file() else 0


def calls(run_dir: Path) -> list[dict]:
    path = run_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def toy_plan(seeds: tuple[int, ...] = (0,)) -> SweepPlan:
    """2 tasks x 2 methods x 2 norms + 2 multi-domain cells per seed; no dataset needed."""
    configs = build_grid(LAYOUT.tasks, LAYOUT.methods, LAYOUT.norms, seeds, multidomain=True,
                         dataset="toy", iters=10)
    return SweepPlan(tuple(configs), LAYOUT, {"command": "domadapt sweep ...", "multidomain": True})


def sweep_main(sweep_dir: str, seconds: float, workers: int = 1, child: bool = False) -> None:
    """Entry for sweeps run in subprocesses by the tests below, with the CLI's signal set-up."""
    stop_on_sigterm()
    launcher = LocalLauncher() if workers == 1 else ProcessLauncher(workers)
    report = run_sweep(toy_plan(), sweep_dir, launcher, quiet=True,
                       runner=partial(fake_runner, seconds=seconds, child=child))
    print(json.dumps({"ran": report.ran, "skipped": report.skipped,
                      "elsewhere": report.finished_elsewhere, "failed": len(report.failed)}))


def start_sweep(sweep_dir: Path, seconds: float, workers: int = 1, *, child: bool = False,
                background: bool = False) -> subprocess.Popen:
    """`background`: start with SIGINT ignored, as a script's `domadapt sweep ... &` is."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_sweep; "
            f"test_sweep.sweep_main({str(sweep_dir)!r}, {seconds}, {workers}, {child})")
    argv = [sys.executable, "-c", code if background else FOREGROUND_SIGINT + code]
    if background:  # the shell ignores SIGINT, exec keeps it ignored
        argv = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 90) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


# -- grid -----------------------------------------------------------------------------------------

def test_grid_cells_and_run_dirs() -> None:
    tasks = [(s, t) for s in DOMAINS for t in DOMAINS if s != t]
    cells = build_grid(tasks, ["source-only", "dann"], ["bn", "bin"], [0, 1], multidomain=True,
                       dataset="toy")
    assert len(cells) == 2 * (len(tasks) * 4 + 2)
    assert [c.seed for c in cells] == [0] * 26 + [1] * 26  # a whole seed first
    multi = [c for c in cells if c.setting == "multidomain"]
    assert [(c.norm, c.method) for c in multi[:2]] == [("bn", "source-only"),
                                                        ("bin", "source-only")]
    dirs = {cell_dir(Path("S"), c) for c in cells}
    assert len(dirs) == len(cells)
    first = cell_dir(Path("S"), cells[0])
    assert first == Path("S/runs") / f"Alpha-Beta_source-only_bn_s0-{cells[0].key()}"


def test_grid_applies_preset_then_options() -> None:
    (cell,) = build_grid([("Alpha", "Beta")], ["dann"], ["bin"], [3], multidomain=False,
                         preset="styledigits", iters=7)
    assert (cell.backbone, cell.iters, cell.seed) == ("digitnet", 7, 3)


def test_grid_pretrained_per_source(tmp_path: Path) -> None:
    """`{source}` in --pretrained: each transfer cell starts from its own source's weights, and
    its key hashes that file's content."""
    import torch

    for i, domain in enumerate(DOMAINS[:2]):
        torch.save({"w": torch.full((2,), float(i))}, tmp_path / f"{domain}.pth")
    template = str(tmp_path / "{source}.pth")
    tasks = [(DOMAINS[0], DOMAINS[1]), (DOMAINS[1], DOMAINS[0])]
    cells = build_grid(tasks, ["dann"], ["bn", "bin"], [0], multidomain=False,
                       dataset="toy", pretrained=template)
    assert [c.pretrained for c in cells] == [str(tmp_path / f"{s}.pth")
                                             for s, _ in tasks for _ in "ab"]
    assert len({c.pretrained_sha256 for c in cells}) == 2 and None not in {
        c.pretrained_sha256 for c in cells}
    with pytest.raises(UserError, match="multi-domain and dg cells have none"):
        build_grid(tasks, ["dann"], ["bn"], [0], multidomain=True, dataset="toy",
                   pretrained=template)
    with pytest.raises(UserError, match=f"no file .*{DOMAINS[2]}.pth for source {DOMAINS[2]}"):
        build_grid([(DOMAINS[2], DOMAINS[0])], ["dann"], ["bn"], [0], multidomain=False,
                   dataset="toy", pretrained=template)


@pytest.mark.parametrize("text, option, message", [
    ("", "--methods", "--methods is empty"), (" , ", "--norms", "--norms is empty")])
def test_split_list_empty(text: str, option: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        split_list(text, option)


def test_parsing() -> None:
    assert split_list("dann, source-only,dann", "--methods") == ["dann", "source-only"]
    assert parse_seeds("2,0") == [2, 0]
    with pytest.raises(UserError, match="--seeds: 'x' is not an integer"):
        parse_seeds("0,x")


# -- one sweep --------------------------------------------------------------------------------

def test_sweep_runs_every_cell_once_and_updates_tables(tmp_path: Path) -> None:
    plan = toy_plan()
    report = run_sweep(plan, tmp_path, LocalLauncher(), quiet=True, runner=fake_runner,
                       tables_interval=0)
    assert (report.total, report.ran, report.skipped, report.failed) == (10, 10, 0, [])
    dirs = [cell_dir(tmp_path, c) for c in plan.configs]
    assert all(len(calls(d)) == 1 for d in dirs)
    assert sorted(calls(d)[0]["tables"] for d in dirs) == list(range(10))  # rebuilt per cell
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["runs"] == [str(d.relative_to(tmp_path)) for d in dirs]
    assert Layout.from_dict(record["layout"]) == LAYOUT
    table = pd.read_csv(tmp_path / "transfer_table.csv", index_col=0, keep_default_na=False)
    assert table.at["Al->Be", "dann/bin"] == "60.0" and table.at["Avg", "dann BIN - BN"] == "+10.0"
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 10

    again = run_sweep(plan, tmp_path, LocalLauncher(), quiet=True, runner=fake_runner)
    assert (again.ran, again.skipped) == (0, 10)
    assert all(len(calls(d)) == 1 for d in dirs)


def test_failed_cell_is_reported_and_retried(tmp_path: Path) -> None:
    plan = toy_plan()
    report = run_sweep(plan, tmp_path, LocalLauncher(), quiet=True,
                       runner=partial(fake_runner, fail="Beta-Gamma_dann_bin"))
    assert report.ran == 9 and len(report.failed) == 1
    bad = report.failed[0]
    assert bad.status == FAILED and "RuntimeError: diverged" in bad.error
    assert "Traceback" in (bad.run_dir / "error.txt").read_text()
    table = pd.read_csv(tmp_path / "transfer_table.csv", index_col=0, keep_default_na=False)
    assert table.at["Be->Ga", "dann/bin"] == "" and table.at["Avg", "dann/bin"] == ""

    retry = run_sweep(plan, tmp_path, LocalLauncher(), quiet=True, runner=fake_runner)
    assert (retry.ran, retry.skipped, retry.failed) == (1, 9, [])
    assert not (bad.run_dir / "error.txt").exists()


def test_locked_cell_is_skipped_then_waited_for(tmp_path: Path) -> None:
    """A cell held by another process is not run twice: the sweep runs the others, waits for
    the lock, and counts the cell as finished elsewhere."""
    plan = toy_plan()
    held = cell_dir(tmp_path, plan.configs[0])
    locked, release = threading.Event(), threading.Event()

    def other_sweep() -> None:
        with run_lock(held) as mine:
            assert mine
            locked.set()
            release.wait(30)
            fake_runner(plan.configs[0], held)

    thread = threading.Thread(target=other_sweep)
    thread.start()
    locked.wait(10)

    def runner(cfg: RunConfig, run_dir: Path, **kw) -> dict:
        if run_dir.name.endswith(plan.configs[-1].key()):
            release.set()  # the other sweep finishes while we are busy elsewhere
        return fake_runner(cfg, run_dir, **kw)

    report = run_sweep(plan, tmp_path, LocalLauncher(), quiet=True, runner=runner)
    thread.join()
    assert (report.ran, report.finished_elsewhere, report.failed) == (9, 1, [])
    assert len(calls(held)) == 1
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 10


def test_cell_left_unfinished_elsewhere_is_taken_over(tmp_path: Path) -> None:
    plan = toy_plan()
    held = cell_dir(tmp_path, plan.configs[3])
    sweep = threading.Thread(target=run_sweep, args=(plan, tmp_path, LocalLauncher()),
                             kwargs={"quiet": True, "runner": fake_runner})
    with run_lock(held) as mine:  # another sweep, which will die without finishing the cell
        assert mine
        sweep.start()
        deadline = time.time() + 30
        while _count_rows(tmp_path / "runs.csv") < 9 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert calls(held) == [] and sweep.is_alive()  # waiting for the lock
    sweep.join(30)
    assert len(calls(held)) == 1 and (held / "metrics.json").is_file()
    assert _count_rows(tmp_path / "runs.csv") == 10


# -- launchers --------------------------------------------------------------------------------

def test_process_launcher_pins_gpus_and_threads(tmp_path: Path) -> None:
    plan = toy_plan()
    launcher = ProcessLauncher(workers=2, threads=1, gpus=("3", "5"))
    report = run_sweep(plan, tmp_path, launcher, quiet=False, device="cpu",
                       runner=partial(fake_runner, seconds=0.2))
    assert report.ran == 10
    runs = [calls(cell_dir(tmp_path, c))[0] for c in plan.configs]
    by_pid = {r["pid"]: r["cuda"] for r in runs}
    assert len(by_pid) == 2 and sorted(by_pid.values()) == ["3", "5"]  # one GPU per worker
    assert os.getpid() not in by_pid
    assert {(r["threads"], r["device"], r["quiet"]) for r in runs} == {("1", "cpu", True)}


def test_process_launcher_replaces_a_dead_worker(tmp_path: Path) -> None:
    plan = toy_plan()
    report = run_sweep(plan, tmp_path, ProcessLauncher(workers=2), quiet=True,
                       runner=partial(fake_runner, die="Alpha-Beta_dann_bn"))
    assert report.ran == 9 and len(report.failed) == 1
    assert "worker process died (exit code 3)" in report.failed[0].error
    assert len({call["pid"] for c in plan.configs for call in calls(cell_dir(tmp_path, c))}) == 3


def test_worker_exits_quietly_when_the_sweep_closes_its_pipe(capfd) -> None:
    """A sweep that goes away with a result unread resets the pipe (ECONNRESET, not EOF):
    the worker, waiting for its next cell, exits 0 without a traceback."""
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    worker = ctx.Process(target=_worker_main, args=(child, os.path.join, None, 1, os.getpid()))
    worker.start()
    child.close()
    conn.send(("a", "b"))
    assert conn.poll(60)  # the result is waiting, unread
    conn.close()
    worker.join(30)
    assert worker.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum, background", [(signal.SIGINT, False),
                                                (signal.SIGTERM, False), (signal.SIGTERM, True)])
def test_interrupted_process_sweep_stops_its_workers(tmp_path: Path, signum: int,
                                                     background: bool) -> None:
    """Ctrl-C or `kill` to the sweep, also one a script started in the background (SIGINT
    ignored): busy workers get one SIGINT (train.run would checkpoint), idle ones exit; no
    cell starts afterwards and no worker outlives the sweep."""
    proc = start_sweep(tmp_path, 1.0, workers=2, background=background)
    dirs = [cell_dir(tmp_path, c) for c in toy_plan().configs]
    deadline = time.time() + 240  # generous: a loaded 2-core machine starts workers slowly
    while sum((d / "metrics.json").is_file() for d in dirs) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    proc.communicate(timeout=120)  # the workers checkpoint first; slow under load
    assert proc.returncode == -signal.SIGINT  # stopped through KeyboardInterrupt, not killed
    started = sum(len(calls(d)) for d in dirs)
    pids = {call["pid"] for d in dirs for call in calls(d)}
    time.sleep(1.5)
    assert sum(len(calls(d)) for d in dirs) == started < len(dirs)
    assert not any(_alive(pid) for pid in pids)
    finished = sum((d / "metrics.json").is_file() for d in dirs)  # tables rebuilt on the way out
    assert finished >= 2 and len(pd.read_csv(tmp_path / "runs.csv")) == finished


def test_tables_are_rebuilt_at_most_every_interval_and_at_the_end(tmp_path: Path) -> None:
    """Default interval (10 s) and instant cells: one rebuild after the first cell, none for
    the next nine, and a last one when the sweep ends."""
    plan = toy_plan()
    run_sweep(plan, tmp_path, LocalLauncher(), quiet=True, runner=fake_runner)
    dirs = [cell_dir(tmp_path, c) for c in plan.configs]
    assert sorted(calls(d)[0]["tables"] for d in dirs) == [0] + [1] * 9
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 10


def test_make_launcher(tmp_path: Path) -> None:
    one = make_launcher("local", workers=1, device="cpu", sweep_dir=tmp_path)
    assert isinstance(one, LocalLauncher)
    many = make_launcher("local", workers=2, device="cpu", sweep_dir=tmp_path)
    assert many == ProcessLauncher(2, threads=max(1, usable_cores() // 2))
    slurm = make_launcher("submitit", workers=None, device="auto", sweep_dir=tmp_path,
                          slurm={"slurm_partition": "gpu", "timeout_min": 60})
    assert isinstance(slurm, SubmititLauncher) and slurm.folder == tmp_path / "submitit"
    assert slurm.parameters["slurm_partition"] == "gpu" and slurm.parameters["timeout_min"] == 60
    with pytest.raises(UserError, match="unknown launcher 'no-such-launcher'"):
        make_launcher("no-such-launcher", workers=None, device="cpu", sweep_dir=tmp_path)
    with pytest.raises(UserError, match="--workers must be >= 1"):
        make_launcher("local", workers=0, device="cpu", sweep_dir=tmp_path)


def test_a_registered_launcher_is_found_by_name(tmp_path: Path, monkeypatch) -> None:
    """Launchers are a registry: a plug-in registers a builder, make_launcher finds it by name
    and hands it the sweep's options; a name registered twice is refused."""
    from domadapt.sweep import LAUNCHERS, register_launcher

    monkeypatch.setattr(LAUNCHERS, "_items", dict(LAUNCHERS._items))  # restored afterwards
    seen = {}

    @register_launcher("x-serial")
    def build(*, workers, device, sweep_dir, slurm):
        seen.update(workers=workers, device=device, sweep_dir=sweep_dir, slurm=slurm)
        return LocalLauncher()

    assert isinstance(make_launcher("x-serial", workers=3, device="cpu", sweep_dir=tmp_path),
                      LocalLauncher)
    assert seen == {"workers": 3, "device": "cpu", "sweep_dir": tmp_path, "slurm": None}
    assert LAUNCHERS.names() == ("local", "submitit", "x-serial")
    with pytest.raises(ValueError, match="registered twice"):
        register_launcher("local")(build)


def test_launcher_help_and_completion_come_from_the_registry(run_cli) -> None:
    code, out, _ = run_cli("sweep", "--help")
    assert code == 0 and "local | submitit" in out
    from cli.options import complete

    assert complete("launcher")("sub") == ["submitit"]


def test_submitit_launcher_one_job_per_cell(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("submitit")
    path = [str(TESTS), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))  # the jobs import fake_runner
    plan = toy_plan()
    launcher = SubmititLauncher(tmp_path / "submitit", {"timeout_min": 5}, cluster="local",
                                poll_seconds=0.2)
    report = run_sweep(plan, tmp_path / "sweep", launcher, quiet=True, runner=fake_runner)
    assert (report.ran, report.failed) == (10, [])
    pids = {calls(cell_dir(tmp_path / "sweep", c))[0]["pid"] for c in plan.configs}
    assert len(pids) == 10 and os.getpid() not in pids  # a job (process) per cell
    assert len(pd.read_csv(tmp_path / "sweep" / "runs.csv")) == 10


# -- several processes ------------------------------------------------------------------------

def test_two_concurrent_sweeps_run_each_cell_once(tmp_path: Path) -> None:
    first, second = start_sweep(tmp_path, 0.3), start_sweep(tmp_path, 0.3)
    a, b = finish(first), finish(second)
    assert a["ran"] + b["ran"] == 10 and a["failed"] == b["failed"] == 0
    assert a["ran"] > 0 and b["ran"] > 0  # they shared the work
    plan = toy_plan()
    assert all(len(calls(cell_dir(tmp_path, c))) == 1 for c in plan.configs)
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 10 and runs.run_key.is_unique
    table = pd.read_csv(tmp_path / "transfer_table.csv", index_col=0, keep_default_na=False)
    assert (table.loc[["Al->Be", "Be->Ga", "Avg"]] != "").all().all()
    assert not list(tmp_path.glob(".*.tmp"))


def test_killed_sweep_takes_its_workers_children_along(tmp_path: Path) -> None:
    """SIGKILL to the sweep: each orphaned worker kills its process group, so neither it nor
    the processes it started (a data loader's workers) keep running."""
    proc = start_sweep(tmp_path, 30.0, workers=2, child=True)
    dirs = [cell_dir(tmp_path, c) for c in toy_plan().configs]
    deadline = time.time() + 60
    while len(started := [c for d in dirs for c in calls(d)]) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    pids = {c["pid"] for c in started} | {c["child"] for c in started}
    assert len(pids) == 4
    deadline = time.time() + 10
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_and_resume(tmp_path: Path, workers: int) -> None:
    """SIGKILL a sweep after a cell finished; the re-run does not redo finished cells."""
    proc = start_sweep(tmp_path, 0.4, workers)
    plan = toy_plan()
    dirs = [cell_dir(tmp_path, c) for c in plan.configs]
    deadline = time.time() + 240  # generous: workers import torch first, slow on a busy machine
    while not any((d / "metrics.json").is_file() for d in dirs) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = {d: (d / "metrics.json").stat().st_mtime_ns
            for d in dirs if (d / "metrics.json").is_file()}
    assert 1 <= len(done) < len(dirs)

    result = finish(start_sweep(tmp_path, 0.0, workers))
    assert result["failed"] == 0 and result["ran"] + result["skipped"] + result["elsewhere"] == 10
    assert result["skipped"] >= len(done)
    for d in dirs:
        assert (d / "metrics.json").is_file()
        if d in done:
            assert (d / "metrics.json").stat().st_mtime_ns == done[d]
            assert len(calls(d)) == 1


# -- command line -----------------------------------------------------------------------------

@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    """A `folder` dataset with three domains (enough to plan a grid; nothing is trained)."""
    root = tmp_path / "data"
    for domain in ("Art", "Clipart", "Photo"):
        (root / domain / "cat").mkdir(parents=True)
    return root


@pytest.mark.parametrize("args, named", [
    (["--tasks", "Art:Sketch"], "'Sketch'"),
    (["--tasks", "Art-Clipart"], "'Art-Clipart'"),
    (["--tasks", "Art:A"], "'Art:A'"),
    (["--tasks", ""], "--tasks is empty"),
    (["--methods", ""], "--methods is empty"),
    (["--methods", "dann,no-such-method"], "'no-such-method'"),
    (["--norms", "bn,no-such-norm"], "'no-such-norm'"),
    (["--seeds", "0,one"], "'one'"),
    (["--launcher", "no-such-launcher"], "'no-such-launcher'"),
    (["--workers", "0"], "--workers"),
    (["--slurm", "partition"], "'partition'"),
])
def test_cli_bad_input_is_one_line(run_cli, folder_dataset: Path, tmp_path: Path,
                                   args: list[str], named: str) -> None:
    code, _, err = run_cli("sweep", "--dataset", "folder", "--root", folder_dataset,
                           "--out", tmp_path / "sweep", *args)
    assert code != 0
    assert named in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "sweep" / "runs").exists()  # nothing started


def test_cli_unwritable_out(run_cli, folder_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    for option in ("--out", "--results"):
        args = {"--out": tmp_path / "sweep", "--results": tmp_path / "results",
                option: blocker / "x"}
        code, _, err = run_cli("sweep", "--dataset", "folder", "--root", folder_dataset,
                               *[str(a) for kv in args.items() for a in kv])
        assert code != 0 and "Traceback" not in err and err.count("\n") == 1
        assert str(blocker / "x") in err


def test_cli_unknown_dataset_root(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("sweep", "--dataset", "folder", "--root", tmp_path / "none",
                           "--out", tmp_path / "sweep")
    assert code != 0 and str(tmp_path / "none") in err and "Traceback" not in err


def test_committed_sweeps_keep_their_run_records_but_not_checkpoints() -> None:
    """A sweep committed under results/ must resume in a new checkout, so git keeps each run's
    config.json, metrics.json (the done marker) and log.csv; checkpoints, locks and tracebacks
    stay out, and so does the scratch runs/ folder of `make demo`."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        code = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False).returncode
        assert code in (0, 1), f"git check-ignore failed on {path}"
        return code == 0

    run = "results/pacs/runs/photo-sketch_dann_bin_s0-0123456789ab"
    assert not any(ignored(f"{run}/{name}") for name in ("config.json", "metrics.json", "log.csv"))
    assert all(ignored(f"{run}/{name}") for name in ("checkpoint.pt", ".lock", "error.txt"))
    assert ignored("runs/styledigits-demo/sweep.json")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_sweep_stopped_while_its_workers_start_prints_no_traceback(tmp_path: Path,
                                                                      signum: int) -> None:
    """Stopped while its spawned workers were still importing, a sweep printed about 100
    interleaved KeyboardInterrupt traceback lines (theirs); a worker not yet ready is now
    killed, holding no cell, and no interrupt cuts a worker's start in two."""
    proc = start_sweep(tmp_path, 1.0, workers=2)
    deadline = time.time() + 60
    while len(_children(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.005)
    workers = _children(proc.pid)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT
    # the sweep's own (this harness runs it bare, without the CLI's one line), none of theirs
    assert err.count("Traceback") == 1, err
    deadline = time.time() + 10  # multiprocessing's resource tracker leaves in its own time
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)
