"""Training: one run of a RunConfig into a run directory, resumable at any point.

Protocol (standard unsupervised DA, as in the DANN / BIN Office-Home experiments):
- transfer: train on *all* labelled source images and *all* unlabelled target images; report
  accuracy on the whole target domain. `source_acc` is measured on the source training
  images (eval mode) -- a fit diagnostic, not a held-out number.
- multidomain: one source-only model on the train split of every domain pooled; report each
  domain's test-split accuracy (`domain_acc`) and their mean (`avg_acc`, also `target_acc`);
  there is no source domain (`source_acc` is null; `train_acc` shows the fit).
- No model selection: the reported numbers are those of the LAST iteration. Target labels
  are only ever used to report, never to pick anything.

Optimization: SGD (Nesterov) with per-group multipliers from `build_sgd` (backbone 0.1x, BIN
gates 10x, gates clamped to [0, 1] after each step), lr(p) = lr0 (1 + gamma p)^-decay with
p = iteration / iters, batch = `batch_size` source (+ `batch_size` target for DANN) images.

Run directory:
    config.json   {"config": RunConfig fields (resolved), "key", "name", "data": {"classes",
                  "num_images", ...}, "runtime": {"device", "world_size", "torch", "command", ...}}
    log.csv       one row per evaluation: iter, cls_loss, domain_loss, train_acc (means over the
                  iterations since the previous row), source_acc, target_acc, disc_acc,
                  grl_coeff, mean_gate, lr, images_per_second (+ acc_<domain> for multidomain)
    checkpoint.pt everything needed to continue bit-identically (atomic, every checkpoint_every)
    checkpoint.prev.pt  the checkpoint before it, resumed from when checkpoint.pt is unreadable
                  (removed once metrics.json is written)
    metrics.json  written last, only when the run is complete (the done marker):
                  target_acc, source_acc, per_class_target_acc, cls_loss, domain_loss, disc_acc,
                  train_acc (means over the last log window), mean_gate, gate_frac_below_0.1
                  (null without BIN), iters, wall_seconds, train_seconds, images_per_second,
                  run_key, name, world_size, device; multidomain adds domain_acc and avg_acc
                  (source_acc null, per-class accuracy over all test splits pooled).

Distributed (torchrun): `batch_size` is the global batch per domain, split over the ranks;
gradients are averaged by DDP, so the lr recipe is unchanged. See `Trainer` for BN statistics.
The training-window numbers in log.csv / metrics.json (cls_loss, domain_loss, train_acc,
disc_acc) are rank 0's share of each batch; evaluation numbers cover the whole domain.
"""

from __future__ import annotations

import contextlib
import csv
import io
import platform
import random
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from domadapt.config import RunConfig
from domadapt.data import (
    DomainDataset,
    InfiniteLoader,
    build_transform,
    domain_items,
    eval_loader,
    get_dataset,
    resolve_root,
)
from domadapt.distributed import DistContext, distributed_context
from domadapt.errors import UserError
from domadapt.io import (
    CorruptFile,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    read_json,
    verify_zip,
)
from domadapt.methods import build_method
from domadapt.models import DomainAdaptModel, build_model
from domadapt.nn import GATE_LOW, build_sgd, gate_fraction_below, mean_gate, set_lr
from domadapt.progress import progress

T = TypeVar("T")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.csv"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
CHECKPOINT_FORMAT = 1


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: training stops, the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Data of a run
# ---------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """Datasets of one run. `train`: "source" (multidomain: all train splits pooled) and, for
    DANN, "target"; `evals`: "source" and "target" (transfer) or one entry per domain's test
    split (multidomain)."""

    classes: list[str]
    train: dict[str, DomainDataset]
    evals: dict[str, DomainDataset]
    domains: list[str]
    info: dict[str, Any]


def resolve_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with full domain names and the absolute dataset root (styledigits: generated)."""
    spec = get_dataset(cfg.dataset)
    root = resolve_root(spec, cfg.root)
    if cfg.setting == "multidomain":
        if cfg.method != "source-only":
            raise UserError(f"a multidomain run is source-only (ERM), got --method {cfg.method}")
        return cfg.replace(dataset=spec.name, root=str(root), source=None, target=None)
    source = spec.resolve_domain(str(cfg.source), root)
    target = spec.resolve_domain(str(cfg.target), root)
    return cfg.replace(dataset=spec.name, root=str(root), source=source, target=target)


def build_data(cfg: RunConfig) -> RunData:
    """Datasets of a resolved `cfg` (see the module docstring for the protocol)."""
    spec = get_dataset(cfg.dataset)
    root = Path(str(cfg.root))
    classes = spec.class_names(root)
    train_tf = build_transform(cfg.image_size, cfg.resize_size, train=True, flip=spec.hflip)
    eval_tf = build_transform(cfg.image_size, cfg.resize_size, train=False, flip=spec.hflip)
    split = {"split_seed": cfg.split_seed, "test_fraction": cfg.test_fraction}
    if cfg.setting == "multidomain":
        domains = spec.domain_names(root)
        train_items = [it for d in domains for it in domain_items(spec, root, d, "train", **split)]
        tests = {d: domain_items(spec, root, d, "test", **split) for d in domains}
        evals = {d: DomainDataset(items, eval_tf) for d, items in tests.items()}
        counts = {"train": len(train_items)} | {f"test/{d}": len(v) for d, v in tests.items()}
        return RunData(classes, {"source": DomainDataset(train_items, train_tf)}, evals, domains,
                       {"classes": classes, "domains": domains, "num_images": counts})
    src = domain_items(spec, root, str(cfg.source))
    tgt = domain_items(spec, root, str(cfg.target))
    train = {"source": DomainDataset(src, train_tf)}
    if cfg.method != "source-only":
        train["target"] = DomainDataset(tgt, train_tf)
    evals = {"source": DomainDataset(src, eval_tf), "target": DomainDataset(tgt, eval_tf)}
    return RunData(classes, train, evals, [str(cfg.source), str(cfg.target)],
                   {"classes": classes, "num_images": {"source": len(src), "target": len(tgt)}})


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, dataset: DomainDataset, *, batch_size: int, num_workers: int,
            device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
            channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """(predicted labels, true labels) of every image of `dataset`, model in eval mode."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for x, y in eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda"):
        x = _to_device(x, device, channels_last)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        preds.append(logits.argmax(1).cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def accuracy(preds: Tensor, labels: Tensor) -> float:
    return float((preds == labels).float().mean()) if len(labels) else float("nan")


def per_class_accuracy(preds: Tensor, labels: Tensor,
                       classes: list[str]) -> dict[str, float | None]:
    """{class: accuracy over that class's images} (None for a class without images)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(classes):
        mask = labels == i
        out[name] = accuracy(preds[mask], labels[mask]) if bool(mask.any()) else None
    return out


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    """Sums of per-iteration statistics since the last evaluation."""

    sums: dict[str, float] = field(default_factory=dict)
    iters: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, stats: dict[str, float], images: int, seconds: float) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.iters += 1
        self.images += images
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        return {k: v / self.iters for k, v in self.sums.items()} if self.iters else {}


@dataclass
class TrainState:
    """Progress of a run besides the modules: what a checkpoint stores next to the weights."""

    iteration: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    window: Window = field(default_factory=Window)
    last_window: dict[str, float] = field(default_factory=dict)  # means of the last full window
    last_eval: dict[str, Any] | None = None
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    train_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration, "log": self.log, "window": vars(self.window),
            "last_window": self.last_window, "last_eval": self.last_eval,
            "wall_seconds": self.wall_seconds, "train_seconds": self.train_seconds,
            "train_images": self.train_images,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        d = dict(d)
        d["window"] = Window(**d["window"])
        return cls(**d)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bfloat16 where supported (no loss scaling needed), else
    float16 (with a GradScaler); None (float32) on CPU."""
    if device.type != "cuda":
        return None
    native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8  # Ampere+; no emulation
    return torch.bfloat16 if native_bf16 else torch.float16


def derive_seed(seed: int, stream: str) -> int:
    """An independent 32-bit seed for one named random stream of a run."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1)[0])


class Trainer:
    """Trains `cfg` on `data`; rank 0 of `ctx` writes log, checkpoints and metrics."""

    def __init__(self, cfg: RunConfig, data: RunData, run_dir: Path, ctx: DistContext,
                 *, quiet: bool = False) -> None:
        if cfg.batch_size % ctx.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the "
                            f"{ctx.world_size} processes")
        self.cfg, self.data, self.run_dir, self.ctx = cfg, data, run_dir, ctx
        self.quiet = quiet or not ctx.is_main
        self.device = ctx.device
        cuda = self.device.type == "cuda"
        self.channels_last = cuda and cfg.channels_last
        self.amp_dtype = autocast_dtype(self.device) if cfg.amp else None

        torch.manual_seed(derive_seed(cfg.seed, "init"))
        self.model: DomainAdaptModel = build_model(cfg, len(data.classes))
        self.method = build_method(cfg, self.model).to(self.device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.train_module: nn.Module = self.method
        if ctx.distributed:
            # BN / BIN statistics stay per process (b source + b target images each), not
            # SyncBatchNorm: the fused BIN layer has no synchronized variant, and per-process
            # statistics over a mixed batch are what single-GPU DANN training computes too.
            # Running statistics are rank 0's (DDP broadcasts buffers every forward).
            self.train_module = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[self.device.index] if cuda else None)
        self.optimizer = build_sgd(
            self.model.backbone, self.method.heads(), lr=cfg.lr, momentum=cfg.momentum,
            nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
            backbone_lr_mult=cfg.backbone_lr_mult, gate_lr_mult=cfg.gate_lr_mult)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        per_rank = cfg.batch_size // ctx.world_size
        self.loaders = {
            name: InfiniteLoader(ds, per_rank, seed=derive_seed(cfg.seed, name),
                                 num_workers=cfg.num_workers, rank=ctx.rank,
                                 world_size=ctx.world_size, pin_memory=cuda)
            for name, ds in data.train.items()
        }
        self.state = TrainState()
        torch.manual_seed(derive_seed(cfg.seed, "train"))

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    def _rank_state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        cuda = self.device.type == "cuda"
        return {
            "loaders": {k: v.state_dict() for k, v in self.loaders.items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if cuda else None,
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                          *np_state[2:]],
                "python": random.getstate(),
            },
        }

    def save_checkpoint(self) -> None:
        """Atomically write everything needed to continue bit-identically (rank 0 writes,
        every rank contributes its loader positions and RNG states)."""
        if not all(bool(torch.isfinite(t).all()) for t in self.method.state_dict().values()
                   if t.is_floating_point()):
            self._diverged(self.state.iteration, {}, "the weights")  # keep the good checkpoint
        rank_states = self.ctx.all_gather_object(self._rank_state())
        if self.ctx.is_main:
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT,
                "key": self.cfg.key(),
                "world_size": self.ctx.world_size,
                "model": self.model.state_dict(),
                "discriminator": (self.method.discriminator.state_dict()
                                  if hasattr(self.method, "discriminator") else None),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ranks": rank_states,
                "state": self.state.to_dict(),
            }, self.checkpoint_path, keep_previous=self.run_dir / PREVIOUS_CHECKPOINT_FILE)
        self.ctx.barrier()

    def load_checkpoint(self) -> bool:
        """Continue from run_dir's checkpoint if there is one; True if one was loaded."""
        ckpt = read_latest_checkpoint(self.run_dir, map_location=self.device)
        if ckpt is None:
            return False
        if ckpt.get("key") != self.cfg.key():
            raise UserError(f"{self.checkpoint_path}: belongs to a different run configuration")
        if ckpt["world_size"] != self.ctx.world_size:
            raise UserError(f"{self.checkpoint_path}: written by {ckpt['world_size']} processes, "
                            f"resume with the same number (now {self.ctx.world_size})")
        self.model.load_state_dict(ckpt["model"])
        if ckpt["discriminator"] is not None:
            disc: nn.Module = self.method.discriminator  # type: ignore[union-attr]
            disc.load_state_dict(ckpt["discriminator"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when saved without loss scaling (CPU, bf16)
            self.scaler.load_state_dict(ckpt["scaler"])
        mine = ckpt["ranks"][self.ctx.rank]
        for name, loader in self.loaders.items():
            loader.load_state_dict(mine["loaders"][name])
        rng = mine["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        np_state = rng["numpy"]
        np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
        random.setstate(_as_tuples(rng["python"]))
        self.state = TrainState.from_dict(ckpt["state"])
        return True

    # -- evaluation -------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def evaluate(self) -> dict[str, Any]:
        """Accuracy on every evaluation set, per-class accuracy on the target (multidomain:
        on all test splits pooled), BIN gate summary."""
        acc: dict[str, float] = {}
        scored: dict[str, tuple[Tensor, Tensor]] = {}
        for name, ds in self.data.evals.items():
            scored[name] = predict(self.model, ds, batch_size=2 * self.cfg.batch_size,
                                   num_workers=self.cfg.num_workers, device=self.device,
                                   autocast=self._autocast(), channels_last=self.channels_last)
            acc[name] = accuracy(*scored[name])
        if self.cfg.setting == "multidomain":
            acc["target"] = float(np.mean([acc[d] for d in self.data.domains]))
            target = [scored[d] for d in self.data.domains]
        else:
            target = [scored["target"]]
        preds = torch.cat([p for p, _ in target])
        labels = torch.cat([y for _, y in target])
        mean, frac_low = mean_gate(self.model), gate_fraction_below(self.model)
        return {"acc": acc, "per_class": per_class_accuracy(preds, labels, self.data.classes),
                "mean_gate": mean, "gate_frac_low": frac_low}

    def _log_row(self, ev: dict[str, Any], lr: float) -> dict[str, Any]:
        w = self.state.window.means()
        row: dict[str, Any] = {
            "iter": self.state.iteration,
            "cls_loss": w.get("cls_loss"), "domain_loss": w.get("domain_loss"),
            "train_acc": w.get("train_acc"),
            "source_acc": ev["acc"].get("source"), "target_acc": ev["acc"]["target"],
            "disc_acc": w.get("disc_acc"), "grl_coeff": w.get("grl_coeff"),
            "mean_gate": ev["mean_gate"], "lr": lr,
            "images_per_second": self.state.window.images / max(self.state.window.seconds, 1e-9),
        }
        if self.cfg.setting == "multidomain":
            row |= {f"acc_{d}": ev["acc"][d] for d in self.data.domains}
        return row

    # -- the loop ---------------------------------------------------------------------------
    def _batch(self, name: str) -> tuple[Tensor, Tensor]:
        x, y = next(self.loaders[name])
        return _to_device(x, self.device, self.channels_last), y.to(self.device, non_blocking=True)

    def _step(self, p: float) -> tuple[dict[str, float], int, float]:
        """One SGD iteration at progress p: (stats, images used on all ranks, base lr)."""
        cfg = self.cfg
        lr = set_lr(self.optimizer, cfg.lr, p, gamma=cfg.lr_gamma, decay=cfg.lr_decay)
        x_s, y_s = self._batch("source")
        x_t = self._batch("target")[0] if "target" in self.loaders else None
        with self._autocast():
            loss, stats = self.train_module(x_s, y_s, x_t, p)
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if int(self.ctx.all_reduce_sum(finite)) != self.ctx.world_size:
            self._diverged(self.state.iteration + 1, stats, "the loss")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        images = (x_s.shape[0] + (x_t.shape[0] if x_t is not None else 0)) * self.ctx.world_size
        return {k: float(v) for k, v in stats.items()}, images, lr

    def _diverged(self, iteration: int, stats: dict[str, Tensor], what: str) -> None:
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in stats.items() if k.endswith("loss"))
        if self.checkpoint_path.is_file():
            kept = f"last good checkpoint kept: {self.checkpoint_path}"
        else:
            kept = "no checkpoint was written yet"
        raise NonFiniteLoss(
            f"training diverged: {what} became non-finite at iteration {iteration}"
            f"{f' ({shown})' if shown else ''}; lower --lr (now {self.cfg.lr}); {kept}")

    def fit(self) -> None:
        """Train from `state.iteration` to `cfg.iters`, evaluating and checkpointing on the way."""
        cfg, st = self.cfg, self.state
        self.method.train()
        bar = progress(total=cfg.iters, initial=st.iteration, quiet=self.quiet,
                       desc=cfg.name(), unit="it")
        last_acc = st.last_eval["acc"]["target"] if st.last_eval else float("nan")
        start, wall0 = time.perf_counter(), st.wall_seconds
        try:
            with _deferred_stop(enabled=not self.ctx.distributed) as interrupted:
                while st.iteration < cfg.iters:
                    t0 = time.perf_counter()
                    stats, images, lr = self._step(st.iteration / cfg.iters)
                    dt = time.perf_counter() - t0
                    st.iteration += 1
                    st.window.add(stats, images, dt)
                    st.train_seconds += dt
                    st.train_images += images
                    bar.update(1)
                    if st.iteration % 10 == 0 or st.iteration == cfg.iters:
                        bar.set_postfix(loss=f"{stats['cls_loss']:.3f}", tgt_acc=f"{last_acc:.3f}",
                                        img_s=f"{images / max(dt, 1e-9):.0f}", refresh=False)
                    if st.iteration % cfg.eval_every == 0 or st.iteration == cfg.iters:
                        self._evaluate_and_log(lr)
                        last_acc = st.last_eval["acc"]["target"]  # type: ignore[index]
                    st.wall_seconds = wall0 + time.perf_counter() - start
                    if st.iteration % cfg.checkpoint_every == 0 or st.iteration == cfg.iters:
                        self.save_checkpoint()
                    if interrupted():
                        self.save_checkpoint()
                        raise KeyboardInterrupt
        finally:
            bar.close()

    def _evaluate_and_log(self, lr: float) -> None:
        st = self.state
        ev = self.evaluate() if self.ctx.is_main else None
        ev = self.ctx.broadcast_object(ev)
        st.log.append(self._log_row(ev, lr))
        st.last_eval = ev
        st.last_window = st.window.means()
        st.window = Window()
        if self.ctx.is_main:
            write_log(self.run_dir / LOG_FILE, st.log)

    def metrics(self) -> dict[str, Any]:
        """Final metrics of a finished run (numbers of the last iteration's evaluation)."""
        st, ev, w = self.state, self.state.last_eval, self.state.last_window
        assert ev is not None and st.iteration == self.cfg.iters
        m: dict[str, Any] = {
            "run_key": self.cfg.key(), "name": self.cfg.name(),
            "target_acc": ev["acc"]["target"], "source_acc": ev["acc"].get("source"),
            "per_class_target_acc": ev["per_class"],
            "cls_loss": w.get("cls_loss"), "domain_loss": w.get("domain_loss"),
            "disc_acc": w.get("disc_acc"), "train_acc": w.get("train_acc"),
            "mean_gate": ev["mean_gate"], f"gate_frac_below_{GATE_LOW}": ev["gate_frac_low"],
            "iters": st.iteration, "wall_seconds": st.wall_seconds,
            "train_seconds": st.train_seconds,
            "images_per_second": st.train_images / max(st.train_seconds, 1e-9),
            "world_size": self.ctx.world_size, "device": str(self.device),
        }
        if self.cfg.setting == "multidomain":
            m["domain_acc"] = {d: ev["acc"][d] for d in self.data.domains}
            m["avg_acc"] = ev["acc"]["target"]
        return m


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def run(cfg: RunConfig, run_dir: Path, *, device: str = "auto",
        quiet: bool = False) -> dict[str, Any]:
    """Train `cfg` into `run_dir` and return its metrics (the content of metrics.json).

    A finished run (metrics.json present) is not retrained: its stored metrics are returned.
    An unfinished one continues from its checkpoint, ending with the same numbers an
    uninterrupted run would have (bit-identical on CPU). A run_dir holding a different
    configuration is refused (UserError). Under torchrun, trains with DDP (rank 0 writes).
    Global RNG states of the caller are restored on return.
    """
    run_dir = Path(run_dir)
    with distributed_context(device) as ctx, _isolated_rng(ctx.device):
        cfg = _agree(ctx, lambda: resolve_config(cfg))  # rank 0 generates styledigits if needed
        finished = _agree(ctx, lambda: _check_run_dir(cfg, run_dir))
        if finished is not None:
            return finished
        data = build_data(cfg)
        trainer = Trainer(cfg, data, run_dir, ctx, quiet=quiet)  # bad weights etc. fail here
        if ctx.is_main:
            _write_config(cfg, data, run_dir, ctx)
        trainer.load_checkpoint()
        trainer.fit()
        metrics = trainer.metrics()
        if ctx.is_main:
            atomic_write_json(run_dir / METRICS_FILE, metrics)
            (run_dir / PREVIOUS_CHECKPOINT_FILE).unlink(missing_ok=True)
        ctx.barrier()
        return metrics


def load_trained(run_dir: Path, device: str = "cpu", *, require_finished: bool = True
                 ) -> tuple[RunConfig, DomainAdaptModel]:
    """(config, model in eval mode with the checkpoint's weights) of a run directory."""
    run_dir = Path(run_dir)
    cfg, info = read_run_config(run_dir)
    if require_finished and not (run_dir / METRICS_FILE).is_file():
        raise UserError(f"{run_dir}: the run is not finished (no {METRICS_FILE})")
    ckpt_path = run_dir / CHECKPOINT_FILE
    if not ckpt_path.is_file():
        raise UserError(f"{ckpt_path}: no checkpoint (committed sweeps leave them out); to "
                        f"rebuild it, delete {run_dir / METRICS_FILE} and re-run the command in "
                        f"{run_dir / CONFIG_FILE} (runtime.command): the run trains again")
    ckpt = read_checkpoint(ckpt_path, map_location="cpu")
    model = build_model(cfg, len(info["data"]["classes"]), load_pretrained=False)
    model.load_state_dict(ckpt["model"])
    return cfg, model.to(torch.device(device)).eval()


def read_run_config(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """(RunConfig, whole config.json) of a run directory; UserError if missing or corrupt."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: not a run directory (no {CONFIG_FILE})")
    try:
        info = read_json(path)
        return RunConfig.from_dict(info["config"]), info
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: corrupt run config ({e})") from None


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        verify_zip(path)  # torch.load would take a bit-rotted tensor as it is
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated / foreign file: many types)
        why = str(e) if isinstance(e, CorruptFile) else type(e).__name__
        raise UserError(f"{path}: unreadable checkpoint ({why}); delete it to "
                        f"restart the run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a domadapt checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def read_latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu"
                           ) -> dict[str, Any] | None:
    """The newest readable checkpoint of `run_dir`: checkpoint.pt, else (with one line on
    stderr naming the bad file) checkpoint.prev.pt; None if there is neither. UserError naming
    the file(s) and what to do when none loads (truncated by a crash, corrupted on disk)."""
    bad: list[tuple[Path, str]] = []
    for path in (run_dir / CHECKPOINT_FILE, run_dir / PREVIOUS_CHECKPOINT_FILE):
        if not path.is_file():
            continue
        try:
            ckpt = read_checkpoint(path, map_location)
        except UserError as e:
            bad.append((path, str(e).removeprefix(f"{path}: ").split(";")[0]))
            continue
        if bad:
            print(f"warning: {bad[0][0]}: {bad[0][1]}; resuming from {path.name}, the "
                  f"checkpoint before it", file=sys.stderr)
        return ckpt
    if len(bad) == 2:
        raise UserError(f"{bad[0][0]}: {bad[0][1]}, and so is {bad[1][0].name}; delete both "
                        f"to restart the run from the beginning")
    if bad:
        raise UserError(f"{bad[0][0]}: {bad[0][1]}; delete it to restart the run from the "
                        f"beginning")
    return None


def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """log.csv: one row per evaluation (rewritten atomically as a whole)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _check_run_dir(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """Refuse a run_dir of another configuration; the stored metrics if the run is finished."""
    if not (run_dir / CONFIG_FILE).is_file():
        return None
    stored, _ = read_run_config(run_dir)
    if stored.key() != cfg.key():
        diff = [f"{k}: {v!r} -> {getattr(cfg, k)!r}" for k, v in stored.to_dict().items()
                if getattr(cfg, k) != v and k != "root"]
        raise UserError(f"{run_dir} holds a different run ({'; '.join(diff[:4])}); "
                        f"choose another --out")
    if (run_dir / METRICS_FILE).is_file():
        try:
            return read_json(run_dir / METRICS_FILE)
        except ValueError as e:
            raise UserError(f"corrupt {run_dir / METRICS_FILE} ({e}); delete it to re-run") from None
    return None


def _write_config(cfg: RunConfig, data: RunData, run_dir: Path, ctx: DistContext) -> None:
    """config.json: the resolved config, its key, the data and the runtime of this launch."""
    atomic_write_json(run_dir / CONFIG_FILE, {
        "config": cfg.to_dict(), "key": cfg.key(), "name": cfg.name(), "data": data.info,
        "runtime": {
            "device": str(ctx.device), "world_size": ctx.world_size,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            **_hardware(ctx.device), "command": shlex.join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    })


def _hardware(device: torch.device) -> dict[str, Any]:
    """What floating-point results depend on besides the config: the CPU model and the kernel
    set torch picked for it (AVX2, AVX512, ...), the thread count, and the GPU if one is used.
    The same config on another CPU model or thread count gives other numbers."""
    model = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    info = {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


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


def _to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


def _as_tuples(obj: Any) -> Any:
    """random.setstate needs tuples where serialization may have produced lists."""
    return tuple(_as_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; `kill`, Slurm's stop/preempt signal


@contextlib.contextmanager
def _deferred_stop(enabled: bool = True) -> Iterator[Any]:
    """Turn the first SIGINT or SIGTERM into a flag the loop checks between iterations (so the
    checkpoint it then writes is consistent); a second one interrupts at once. A signal the
    process ignores (SIGINT of a job a script put in the background) stays ignored. Main
    thread only."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = [False]
    previous = {s: h for s in STOP_SIGNALS if (h := signal.getsignal(s)) != signal.SIG_IGN}

    def handler(signum: int, frame: FrameType | None) -> None:
        if hit[0]:
            raise KeyboardInterrupt
        hit[0] = True

    for s in previous:
        signal.signal(s, handler)
    try:
        yield lambda: hit[0]
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: set outside Python

