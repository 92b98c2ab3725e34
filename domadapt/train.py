"""One run of a RunConfig into a run directory, resumable at any point (`run`), and loading a
trained run back (`load_trained`).

The protocol per setting is in `domadapt.settings`, the loop and its log in `domadapt.engine`,
the files in `domadapt.rundir`. metrics.json (written last: the done marker) holds the numbers
of the LAST iteration's evaluation: target_acc, source_acc, per_class_target_acc, the method's
statistics over the last log window (e.g. cls_loss, domain_loss, disc_acc, train_acc), the
norm's diagnostics (e.g. mean_gate, gate_frac_below_0.1), iters, wall_seconds, train_seconds,
images_per_second, run_key, name, world_size, device; multidomain adds domain_acc and avg_acc
(dg: target_acc is the held-out domain's).
No model selection: target labels are only ever used to report, never to pick anything.
"""

from __future__ import annotations

import contextlib
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torchvision

from domadapt.config import NON_KEY_FIELDS, RunConfig
from domadapt.data.registry import check_outside_root
from domadapt.distributed import DistContext, distributed_context
from domadapt.engine import NonFiniteLoss, Trainer
from domadapt.errors import UserError
from domadapt.io import atomic_torch_save
from domadapt.models import DomainAdaptModel, build_model
from domadapt.nn.bin import BatchInstanceNorm2d
from domadapt.nn.bin_kernel import kernel_info
from domadapt.nn.compiled import check_compiler, compile_info
from domadapt.provenance import (
    code_version,
    hardware,
    host_hash,
    portable_command,
    portable_path,
)
from domadapt.rundir import LOCK, METRICS, RunDir, run_lock
from domadapt.settings import RunData, build_data, resolve_config

__all__ = ["NonFiniteLoss", "build_data", "load_trained", "reestimate_adabn", "resolve_config",
           "run"]

T = TypeVar("T")


def run(cfg: RunConfig, run_dir: Path, *, device: str = "auto",
        quiet: bool = False) -> dict[str, Any]:
    """Train `cfg` into `run_dir` and return its metrics (the content of metrics.json).

    A finished run (metrics.json present) is not retrained: its stored metrics are returned.
    An unfinished one continues from its checkpoint, ending with the same numbers an
    uninterrupted run would have (bit-identical on CPU). A run_dir holding a different
    configuration is refused (UserError). Under torchrun, trains with DDP (rank 0 writes).
    Global RNG states of the caller are restored on return. The run directory is locked
    (`run_lock`) from start to end: a second writer is refused (UserError) instead of
    mixing its files with this run's.
    """
    rd = RunDir(run_dir)
    with distributed_context(device) as ctx, _isolated_rng(ctx.device):
        cfg = _agree(ctx, lambda: resolve_config(cfg))  # rank 0 generates styledigits if needed
        check_outside_root(rd.path, str(cfg.root))
        with _exclusive(rd, ctx):
            finished = _agree(ctx, lambda: _check_run_dir(cfg, rd))
            if finished is not None:
                return finished
            if cfg.compile:  # before any work: no C++ compiler is one line
                check_compiler(ctx.device)
            data = build_data(cfg)
            _agree(ctx, lambda: _check_same_data(rd, data))
            trainer = Trainer(cfg, data, rd, ctx, quiet=quiet)  # bad weights etc. fail here
            trainer.load_checkpoint()
            if ctx.is_main:
                _record_launch(cfg, data, rd, ctx, trainer.model,
                               channels_last=trainer.channels_last,
                               iteration=trainer.state.iteration)
            trainer.fit()
            metrics = trainer.metrics()
            if ctx.is_main:
                for name, table in trainer.norm.records(trainer.model).items():
                    rd.write_table(name, table)
                rd.write_metrics(metrics)
            ctx.barrier()
            return metrics


def load_trained(run_dir: Path, device: str = "cpu", *, require_finished: bool = True
                 ) -> tuple[RunConfig, DomainAdaptModel]:
    """(config, model in eval mode with the checkpoint's weights) of a run directory."""
    rd = RunDir(run_dir)
    cfg, info = rd.read_config()
    if require_finished and not rd.is_done():
        raise UserError(f"{rd.path}: the run is not finished (no {METRICS})")
    retrain = (f"to rebuild it, delete {rd.metrics_path} and re-run the command in "
               f"{rd.config_path} (runtime.command): the run trains again")
    if not rd.checkpoint_path.is_file():
        raise UserError(f"{rd.checkpoint_path}: no checkpoint (committed sweeps leave them "
                        f"out); {retrain}")
    try:
        ckpt = rd.read_checkpoint(map_location="cpu")
    except UserError as e:
        if not rd.is_done():
            raise
        raise UserError(f"{e}; the trained model of this finished run is lost: {retrain}"
                        ) from None
    model = build_model(cfg, len(info["data"]["classes"]), load_pretrained=False)
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in ckpt["method"].items()
                           if k.startswith(prefix)})
    return cfg, model.to(torch.device(device)).eval()


def export_backbone(run_dir: Path, out: Path) -> int:
    """Write a finished `--norm bn` run's trained backbone to `out` as a state dict that
    `--pretrained OUT` loads (two-stage training: a source-only BN model first, then an
    adaptation run, with any norm, that starts from it). Other norms are refused: their
    converted layers hold tensors (BIN's gates, IBN's instance halves) that a backbone built
    with BatchNorm, as `--pretrained` loads it, does not have. Returns the number of tensors."""
    cfg, model = load_trained(run_dir)
    if cfg.norm != "bn":
        raise UserError(f"{run_dir}: a --norm {cfg.norm} run; only BN runs export a backbone "
                        f"that --pretrained can load")
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    atomic_torch_save(state, out)
    return len(state)


def reestimate_adabn(run_dir: Path, *, device: str = "auto", root: str | None = None,
                     quiet: bool = True) -> tuple[float | None, float | None]:
    """Recompute a finished --adabn run's final `target_acc_adabn` from its checkpoint with
    this code (for runs whose AdaBN estimate predates a change to it). The checkpoint is first
    evaluated as the run's last evaluation was, and refused (UserError) unless its target
    accuracy equals metrics.json's bit for bit: the same model under the same numerics. Then
    the new value replaces the old one in metrics.json and in log.csv's last row (earlier rows
    keep what was logged at the time), and config.json's `reevaluations` gains an event (time,
    host, hardware, code, command, what changed from what to what). On CPU it evaluates with
    the run's recorded torch thread count (reductions over more threads round differently).
    Returns (before, after)."""
    rd = RunDir(run_dir)
    if not rd.is_done():
        raise UserError(f"{rd.path}: not a finished run (no {METRICS})")
    cfg, _ = rd.read_config()
    if not cfg.adabn:
        raise UserError(f"{rd.path}: trained without --adabn; its records have no AdaBN accuracy")
    if root is not None:
        cfg = cfg.replace(root=str(Path(root).resolve()))
    with distributed_context(device) as ctx, _isolated_rng(ctx.device):
        if ctx.distributed:
            raise UserError("re-estimating AdaBN runs in one process, not under torchrun")
        cfg = resolve_config(cfg)
        threads = torch.get_num_threads()
        recorded = rd.read_config_dict().get("runtime", {}).get("threads")
        with _exclusive(rd, ctx), contextlib.ExitStack() as restore:
            if ctx.device.type == "cpu" and recorded:
                torch.set_num_threads(recorded)
                restore.callback(torch.set_num_threads, threads)
            data = build_data(cfg)
            _check_same_data(rd, data)
            trainer = Trainer(cfg, data, rd, ctx, quiet=quiet)
            if not trainer.load_checkpoint() or trainer.state.iteration != cfg.iters:
                raise UserError(f"{rd.checkpoint_path}: no checkpoint of the finished run's "
                                f"last iteration ({cfg.iters})")
            evaluation = trainer.evaluate()
            metrics = rd.read_metrics()
            if evaluation["acc"]["target"] != metrics["target_acc"]:
                raise UserError(
                    f"{rd.path}: the checkpoint scores {evaluation['acc']['target']!r} on the "
                    f"target, metrics.json records {metrics['target_acc']!r}: another model or "
                    f"other numerics (CPU kernel set, threads, code); nothing was changed")
            before = metrics.get("target_acc_adabn")
            after = evaluation["validators"]["target_acc_adabn"]
            rd.amend_last_log_row({"target_acc_adabn": after})
            rd.write_metrics(metrics | {"target_acc_adabn": after})
            info = rd.read_config_dict()
            info.setdefault("reevaluations", []).append({
                "time": _now(), **_who(ctx),
                "changed": {"target_acc_adabn": {"before": before, "after": after}}})
            rd.write_config(info)
            return before, after


# -- helpers ------------------------------------------------------------------------------------

def _check_run_dir(cfg: RunConfig, rd: RunDir) -> dict[str, Any] | None:
    """Refuse a run_dir of another configuration; the stored metrics if the run is finished."""
    if not rd.has_config():
        return None
    stored, _ = rd.read_config()
    if not cfg.has_key(stored.key()):
        mine, theirs = cfg.to_dict(), stored.to_dict()
        diff = [f"{k}: {v!r} -> {mine[k]!r}" for k, v in theirs.items()
                if mine.get(k) != v and k not in NON_KEY_FIELDS | {"pretrained_sha256"}]
        raise UserError(f"{rd.path} holds a different run ({'; '.join(diff[:4])}); "
                        f"choose another --out")
    if rd.is_done():
        return rd.read_metrics()
    return None


def _check_same_data(rd: RunDir, data: RunData) -> None:
    """Refuse to continue a run over data that changed since it started (images added,
    removed, relabelled or rewritten): its first iterations saw other images. Nothing is
    written before this check."""
    if not rd.has_config():
        return
    stored = (rd.read_config_dict().get("data") or {}).get("fingerprint")
    now = data.info["fingerprint"]
    if stored is None:  # a run started before data fingerprints existed
        return
    changed = sorted(d for d in set(stored) | set(now) if stored.get(d) != now.get(d))
    if changed:
        raise UserError(f"{rd.path}: the images of {', '.join(changed)} changed since the run "
                        f"started (data fingerprint differs); restore them, or choose another "
                        f"--out to train on the new data")


def _record_launch(cfg: RunConfig, data: RunData, rd: RunDir, ctx: DistContext,
                   model: torch.nn.Module, *, channels_last: bool, iteration: int) -> None:
    """config.json: the first start writes the resolved config, its key, the data (with its
    fingerprint), the provenance and the runtime; a later start (a resume) only appends an
    event to `resumes`, so what the first start recorded stays."""
    event = {"time": _now(), "iteration": iteration, **_who(ctx)}
    if rd.has_config():
        info = rd.read_config_dict()
        info.setdefault("resumes", []).append(event)
        rd.write_config(info)
        return
    uses_bin = any(isinstance(m, BatchInstanceNorm2d) for m in model.modules())
    rd.write_config({
        "config": cfg.to_dict() | {"root": portable_path(str(cfg.root))} | (
            {"pretrained": portable_path(cfg.pretrained)} if cfg.pretrained_sha256 else {}),
        "key": cfg.key(), "name": cfg.name(), "data": data.info,
        "provenance": {
            "code": code_version(), "pretrained_sha256": cfg.pretrained_sha256,
            "bin_kernel": (kernel_info() if ctx.device.type == "cpu" else
                           {"kernel": "torch", "reason": f"on {ctx.device.type}"})
            if uses_bin else None,
        },
        "runtime": {
            "device": str(ctx.device), "world_size": ctx.world_size,
            "memory_format": "channels_last" if channels_last else "NCHW",
            "compile": compile_info(ctx.device) if cfg.compile else None,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            **hardware(ctx.device), "host": host_hash(), "command": portable_command(sys.argv),
            "started": event["time"], "iteration": iteration,
        },
        "resumes": [],
    })


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _who(ctx: DistContext) -> dict[str, Any]:
    """What an event in config.json records about who wrote it: host hash, hardware, code,
    command."""
    return {"host": host_hash(), **hardware(ctx.device), "code": code_version(),
            "command": portable_command(sys.argv)}


@contextlib.contextmanager
def _exclusive(rd: RunDir, ctx: DistContext) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the block (already held by a sweep's cell in
    this thread: nested); UserError when another process trains into it."""
    def refuse_if_busy() -> None:
        if not mine:
            raise UserError(f"{rd.path} is in use by another run (its {LOCK} is locked); wait "
                            f"for it to end or choose another --out")

    with run_lock(rd.path) if ctx.is_main else contextlib.nullcontext(True) as mine:
        _agree(ctx, refuse_if_busy)
        yield


def _agree(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and hand its result (or its UserError) to every rank."""
    if not ctx.distributed:
        return fn()
    result: tuple[str, Any]
    if ctx.is_main:
        try:
            result = ("ok", fn())
        except UserError as e:
            result = ("error", str(e))
    else:
        result = ("ok", None)
    result = ctx.broadcast_object(result)
    if result[0] == "error":
        raise UserError(result[1])
    return result[1]


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Restore the caller's python / numpy / torch (CPU and `device`) RNG states afterwards."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
