"""The training loop and its hooks (after detectron2's train loop).

The loop knows only that training runs one step at a time:

    for hook in hooks: hook.before_train(trainer)
    while trainer.state.iteration < cfg.iters:
        trainer.run_step()                    # one iteration of the method (one or more steps)
        for hook in hooks: hook.after_step(trainer)
    for hook in hooks: hook.after_train(trainer)     # also on an exception

Hooks, in this order (`default_hooks`): ProgressBar, Evaluate (every `eval_every`
iterations and at the end: evaluation, log row, log.csv), Clock (wall time), Checkpoint
(every `checkpoint_every` and at the end), StopOnSignal (after the first SIGINT/SIGTERM:
checkpoint, then KeyboardInterrupt). The trainer's state composes from its parts: the method's
`state_dict()` (model and every extra module), every optimizer, the grad scaler, every rank's
loader positions and RNG states, and `TrainState`.

Optimization: SGD (Nesterov) with per-group multipliers (`domadapt.nn.build_sgd`: backbone
`backbone_lr_mult` x, the norm's special parameters by their own rule), lr = lr0 x
(1 + gamma x)^-decay with x = iteration / iters or x = iteration (`lr_schedule`); batch = `batch_size` source (+ `batch_size`
target when the method uses the target) images. A method is one loss and one step of one SGD
over the whole network, unless it owns its update (`Method.owns_update`, e.g. MCD, ADDA): then
it builds its own optimizers with the same rules (`Trainer.sgd`) and steps them itself each
iteration through `Trainer.optimizer_step` (one loss, one or more optimizers: zero, backward,
step, clamp).

log.csv has one row per evaluation: iter, the means of the method's statistics since the
previous row (e.g. cls_loss, train_acc, domain_loss, disc_acc, grl_coeff), source_acc,
target_acc (multidomain: the mean of acc_<domain>; dg: the held-out domain's), the
validators, the norm's diagnostics (e.g. mean_gate), lr (the head lr), <label>_lr for
special parameters (e.g. gates_lr), images_per_second.

Distributed (torchrun): `batch_size` is the global batch per domain, split over the ranks;
gradients are averaged by DDP. Training-window statistics are rank 0's share of each batch;
evaluation numbers cover the whole domain.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from domadapt.backbones.base import use_channels_last
from domadapt.config import RunConfig
from domadapt.data import InfiniteLoader, eval_loader
from domadapt.distributed import DistContext
from domadapt.errors import UserError
from domadapt.evaluation import accuracy, outputs, per_class_accuracy, to_device, validators
from domadapt.methods import Step, build_method, get_method
from domadapt.models import DomainAdaptModel, build_model
from domadapt.nn import build_sgd, set_lr
from domadapt.nn.adabn import adapt_batch_stats, has_batch_stats
from domadapt.nn.compiled import check_compiler, compile_modules, eager
from domadapt.nn.domains import domain_labels
from domadapt.norms import get_norm
from domadapt.progress import progress
from domadapt.run_state import TrainState, Window, deferred_stop, derive_seed
from domadapt.rundir import RunDir
from domadapt.schedules import lr_factor
from domadapt.settings import RunData, eval_domain, result_accuracy, target_validators


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: training stops, the last good checkpoint is kept."""


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bfloat16 where supported (no loss scaling needed), else
    float16 (with a GradScaler); None (float32) on CPU and on MPS (Apple GPUs: float32, no
    autocast and no GradScaler until mixed precision has been tested there)."""
    if device.type != "cuda":
        return None
    native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8  # Ampere+; no emulation
    return torch.bfloat16 if native_bf16 else torch.float16


# -- hooks --------------------------------------------------------------------------------------

class Hook:
    """Called by `Trainer.fit` around the loop; override what you need."""

    def before_train(self, trainer: Trainer) -> None: ...
    def after_step(self, trainer: Trainer) -> None: ...
    def after_train(self, trainer: Trainer) -> None: ...


def due(trainer: Trainer, every: int) -> bool:
    """True every `every` iterations and at the last one."""
    it = trainer.state.iteration
    return it % every == 0 or it == trainer.cfg.iters


class ProgressBar(Hook):
    def before_train(self, trainer: Trainer) -> None:
        st = trainer.state
        self.bar = progress(total=trainer.cfg.iters, initial=st.iteration, quiet=trainer.quiet,
                            desc=trainer.cfg.name(), unit="it")

    def after_step(self, trainer: Trainer) -> None:
        self.bar.update(1)
        st = trainer.state
        if st.iteration % 10 == 0 or st.iteration == trainer.cfg.iters:
            last = st.last_eval["acc"]["target"] if st.last_eval else float("nan")
            self.bar.set_postfix(loss=f"{trainer.last_stats.get('cls_loss', float('nan')):.3f}",
                                 tgt_acc=f"{last:.3f}", refresh=False,
                                 img_s=f"{trainer.last_images / max(trainer.last_dt, 1e-9):.0f}")

    def after_train(self, trainer: Trainer) -> None:
        self.bar.close()


class Evaluate(Hook):
    """Evaluate, append a log row, rewrite log.csv, start a new statistics window."""

    def after_step(self, trainer: Trainer) -> None:
        if due(trainer, trainer.cfg.eval_every):
            trainer.evaluate_and_log()


class Clock(Hook):
    def before_train(self, trainer: Trainer) -> None:
        self.start, self.wall0 = time.perf_counter(), trainer.state.wall_seconds

    def after_step(self, trainer: Trainer) -> None:
        trainer.state.wall_seconds = self.wall0 + time.perf_counter() - self.start


class Checkpoint(Hook):
    def after_step(self, trainer: Trainer) -> None:
        if due(trainer, trainer.cfg.checkpoint_every):
            trainer.save_checkpoint()


class StopOnSignal(Hook):
    """After the first SIGINT / SIGTERM: checkpoint at the end of the step, then stop."""

    def before_train(self, trainer: Trainer) -> None:
        self._ctx = deferred_stop(enabled=not trainer.ctx.distributed)
        self.interrupted = self._ctx.__enter__()

    def after_step(self, trainer: Trainer) -> None:
        if self.interrupted():
            trainer.save_checkpoint()
            raise KeyboardInterrupt

    def after_train(self, trainer: Trainer) -> None:
        self._ctx.__exit__(None, None, None)


def default_hooks() -> list[Hook]:
    return [ProgressBar(), Evaluate(), Clock(), Checkpoint(), StopOnSignal()]


# -- the trainer --------------------------------------------------------------------------------

class Trainer:
    """Trains `cfg` on `data`; rank 0 of `ctx` writes log, checkpoints and metrics."""

    def __init__(self, cfg: RunConfig, data: RunData, run_dir: RunDir, ctx: DistContext,
                 *, quiet: bool = False, hooks: list[Hook] | None = None) -> None:
        if cfg.batch_size % ctx.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the "
                            f"{ctx.world_size} processes")
        self.cfg, self.data, self.run_dir, self.ctx = cfg, data, run_dir, ctx
        self.quiet = quiet or not ctx.is_main
        self.hooks = default_hooks() if hooks is None else hooks
        self.device = ctx.device
        cuda = self.device.type == "cuda"
        self.channels_last = use_channels_last(cfg.backbone, self.device.type, cfg.channels_last)
        self.amp_dtype = autocast_dtype(self.device) if cfg.amp else None
        self.norm = get_norm(cfg.norm)

        if ctx.distributed and get_method(cfg.method).owns_update:
            raise UserError(f"--method {cfg.method} runs its own optimisation steps, which have "
                            f"no distributed (torchrun) version; train it in one process")
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        self.model: DomainAdaptModel = build_model(cfg, len(data.classes))
        self.method = build_method(cfg.method, self.model, cfg.method_options,
                                   num_classes=len(data.classes)).to(self.device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if cfg.compile:  # in place: parameters, state_dict keys and references unchanged
            check_compiler(self.device)
            compile_modules(self.method)
        self.train_module: nn.Module = self.method
        if ctx.distributed:
            # BN / BIN statistics stay per process (b source + b target images each), not
            # SyncBatchNorm: the fused BIN layer has no synchronized variant, and per-process
            # statistics over a mixed batch are what single-GPU DANN training computes too.
            # Running statistics are rank 0's (DDP broadcasts buffers every forward).
            self.train_module = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[self.device.index] if cuda else None)
        self.special = self.norm.special_params(self.model, cfg.norm_hparams)
        if self.method.owns_update:
            self.optimizers = self.method.build_optimizers(self.sgd)
        else:
            self.optimizers = {"sgd": self.sgd(backbone=[self.model.backbone],
                                               heads=self.method.heads())}
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        per_rank = cfg.batch_size // ctx.world_size
        self.loaders = {
            name: InfiniteLoader(ds, per_rank, seed=derive_seed(cfg.seed, name),
                                 num_workers=cfg.num_workers, rank=ctx.rank,
                                 world_size=ctx.world_size, pin_memory=cuda)
            for name, ds in data.train.items()
        }
        self.state = TrainState()
        self.lrs: dict[str, float] = {}
        self.last_stats: dict[str, float] = {}
        self.last_images, self.last_dt = 0, 0.0
        torch.manual_seed(derive_seed(cfg.seed, "train"))

    def sgd(self, *, backbone: Sequence[nn.Module] = (),
            heads: Sequence[nn.Module] = ()) -> torch.optim.SGD:
        """An SGD over `backbone` (at backbone_lr_mult x lr0) and `heads` (at lr0) with the
        run's momentum, weight decay and the norm's special parameters (own groups, no weight
        decay, clamped after every step); `run_step` sets its lr every iteration."""
        cfg = self.cfg
        return build_sgd(list(backbone), heads, lr=cfg.lr, momentum=cfg.momentum,
                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                         backbone_lr_mult=cfg.backbone_lr_mult, special=self.special)

    # -- checkpoints ------------------------------------------------------------------------
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
            self.run_dir.save_checkpoint({
                "key": self.cfg.key(),
                "world_size": self.ctx.world_size,
                "method": self.method.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "scaler": self.scaler.state_dict(),
                "ranks": rank_states,
                "state": self.state.to_dict(),
            })
        self.ctx.barrier()

    def load_checkpoint(self) -> bool:
        """Continue from the run directory's checkpoint if there is one; True if loaded."""
        path = self.run_dir.checkpoint_path
        ckpt = self.run_dir.read_latest_checkpoint(map_location=self.device)
        if ckpt is None:
            return False
        if not self.cfg.has_key(ckpt.get("key")):
            raise UserError(f"{path}: belongs to a different run configuration")
        if ckpt["world_size"] != self.ctx.world_size:
            raise UserError(f"{path}: written by {ckpt['world_size']} processes, "
                            f"resume with the same number (now {self.ctx.world_size})")
        self.method.load_state_dict(ckpt["method"])
        states = ckpt["optimizers"] if "optimizers" in ckpt else {"sgd": ckpt["optimizer"]}
        if set(states) != set(self.optimizers):  # same key, same method: a foreign file
            raise UserError(f"{path}: holds optimizers {sorted(states)}, the method has "
                            f"{sorted(self.optimizers)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[name])
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
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    @property
    def eval_workers(self) -> int:
        """Data-loading processes of an evaluation pass: none on CPU, where the dataset's
        decoded-image cache (`domadapt.data.dataset`) then lives in this process and is reused
        by every later pass (workers would decode every image again on every pass, on the
        cores the forward pass needs); --num-workers on an accelerator. Same batches either
        way, so the same numbers."""
        return 0 if self.device.type == "cpu" else self.cfg.num_workers

    def _outputs(self, model: nn.Module, name: str) -> tuple[Tensor, Tensor, Tensor]:
        return outputs(model, self.data.evals[name], batch_size=2 * self.cfg.batch_size,
                       num_workers=self.eval_workers, device=self.device,
                       autocast=self.autocast(), channels_last=self.channels_last,
                       domain=eval_domain(self.cfg, name))

    def evaluate(self) -> dict[str, Any]:
        """Accuracy on every evaluation set, per-class accuracy on the result domains (pooled),
        the validators, AdaBN accuracy (if asked), the norm's diagnostics. Eager under
        --compile (`domadapt.nn.compiled.eager`): only training steps are compiled."""
        with eager(self.cfg.compile):
            return self._evaluate()

    def _evaluate(self) -> dict[str, Any]:
        acc: dict[str, float] = {}
        scored = {name: self._outputs(self.model, name) for name in self.data.evals}
        for name, (logits, _, labels) in scored.items():
            acc[name] = accuracy(logits.argmax(1), labels)
        acc["target"] = result_accuracy(self.cfg, acc, self.data)
        logits, features, labels = (torch.cat([scored[d][i] for d in self.data.targets])
                                    for i in range(3))
        source_features = scored["source"][1] if "source" in scored else None
        checks = validators(logits, features, source_features=source_features,
                            holdout=scored.get("source_val"), seed=self.cfg.seed,
                            use_target=target_validators(self.cfg))
        if self.cfg.adabn:
            checks["target_acc_adabn"] = self._adabn_accuracy()
        return {"acc": acc, "per_class": per_class_accuracy(logits.argmax(1), labels,
                                                           self.data.classes),
                "validators": checks, "diagnostics": self.norm.diagnostics(self.model)}

    def _adabn_accuracy(self) -> float | None:
        """Target accuracy with the norm layers' batch statistics re-estimated on each target
        domain's images (AdaBN, Li et al., 2016), read in the fixed random order of the run's
        seed (`nn.adabn`: batches must represent the domain); None when the model has no such
        layers."""
        if not has_batch_stats(self.model):
            return None
        acc = {}
        for name in self.data.targets:
            batches = (to_device(x, self.device, self.channels_last) for x, _ in
                       eval_loader(self.data.evals[name], 2 * self.cfg.batch_size,
                                   self.eval_workers, pin_memory=self.device.type == "cuda",
                                   seed=self.cfg.seed))
            with self.autocast(), domain_labels(self.model, eval_domain(self.cfg, name)):
                adapted = adapt_batch_stats(self.model, batches)
            logits, _, labels = self._outputs(adapted, name)
            acc[name] = accuracy(logits.argmax(1), labels)
        return result_accuracy(self.cfg, acc, self.data)

    def _log_row(self, ev: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"iter": self.state.iteration, **self.state.window.means(),
                               "source_acc": ev["acc"].get("source"),
                               "target_acc": ev["acc"]["target"], **ev["validators"],
                               **ev["diagnostics"],
                               "lr": self.lrs.get("heads")}
        if self.special is not None:  # the backbone's, where the gates are (else the heads')
            label = self.special.label
            row[f"{label}_lr"] = self.lrs.get(f"backbone/{label}", self.lrs.get(f"heads/{label}"))
        row["images_per_second"] = (self.state.window.images
                                    / max(self.state.window.seconds, 1e-9))
        if self.cfg.setting == "multidomain":
            row |= {f"acc_{d}": ev["acc"][d] for d in self.data.domains}
        return row

    def evaluate_and_log(self) -> None:
        st = self.state
        ev = self.evaluate() if self.ctx.is_main else None
        ev = self.ctx.broadcast_object(ev)
        st.log.append(self._log_row(ev))
        st.last_eval = ev
        st.last_window = st.window.means()
        st.window = Window()
        if self.ctx.is_main:
            self.run_dir.write_log(st.log)

    # -- the loop ---------------------------------------------------------------------------
    def _batch(self, name: str) -> tuple[Tensor, Tensor]:
        x, y = next(self.loaders[name])
        return to_device(x, self.device, self.channels_last), y.to(self.device, non_blocking=True)

    def run_step(self) -> None:
        """One iteration (one SGD step, or the method's own steps); updates the state's
        counters and statistics window."""
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        step = Step(st.iteration, cfg.iters)
        base = cfg.lr * lr_factor(st.iteration, cfg.iters, form=cfg.lr_schedule,
                                  gamma=cfg.lr_gamma, decay=cfg.lr_decay)
        self.lrs = {}
        for optimizer in self.optimizers.values():  # logged: a group name's first optimizer's
            for name, lr in set_lr(optimizer, base).items():
                self.lrs.setdefault(name, lr)
        x_s, y_s = self._batch("source")
        x_t = self._batch("target")[0] if "target" in self.loaders else None
        if self.method.owns_update:
            with self.autocast():
                stats = self.method.update(x_s, y_s, x_t, step, self.optimizer_step)
        else:
            with self.autocast():
                loss, stats = self.train_module(x_s, y_s, x_t, step)
            self.optimizer_step("sgd", loss, stats)
        images = (x_s.shape[0] + (x_t.shape[0] if x_t is not None else 0)) * self.ctx.world_size
        self.last_stats = {k: float(v) for k, v in stats.items()}
        self.last_dt, self.last_images = time.perf_counter() - t0, images
        st.iteration += 1
        st.window.add(self.last_stats, images, self.last_dt)
        st.train_seconds += self.last_dt
        st.train_images += images

    def optimizer_step(self, names: str | Sequence[str], loss: Tensor,
                       stats: dict[str, Tensor] | None = None) -> None:
        """One step of the optimizer(s) `names` on `loss`: refuse a non-finite loss (on any
        rank), zero their gradients, back-propagate once (loss-scaled under float16), step
        each; the clamp of special parameters runs after each step (`attach_clamp`)."""
        chosen = [self.optimizers[n] for n in ([names] if isinstance(names, str) else names)]
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if int(self.ctx.all_reduce_sum(finite)) != self.ctx.world_size:
            label = names if isinstance(names, str) else "+".join(names)
            self._diverged(self.state.iteration + 1,
                           stats if stats is not None else {f"{label}_loss": loss.detach()},
                           "the loss")
        for optimizer in chosen:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for optimizer in chosen:
            self.scaler.step(optimizer)
        self.scaler.update()

    def _diverged(self, iteration: int, stats: dict[str, Tensor], what: str) -> None:
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in stats.items() if k.endswith("loss"))
        path = self.run_dir.checkpoint_path
        kept = (f"last good checkpoint kept: {path}" if path.is_file()
                else "no checkpoint was written yet")
        raise NonFiniteLoss(
            f"training diverged: {what} became non-finite at iteration {iteration}"
            f"{f' ({shown})' if shown else ''}; lower --lr (now {self.cfg.lr}); {kept}")

    def fit(self) -> None:
        """Train from `state.iteration` to `cfg.iters`, calling the hooks (module docstring)."""
        self.method.train()
        started: list[Hook] = []
        try:
            for hook in self.hooks:
                hook.before_train(self)
                started.append(hook)
            while self.state.iteration < self.cfg.iters:
                self.run_step()
                for hook in self.hooks:
                    hook.after_step(self)
        finally:
            for hook in reversed(started):
                hook.after_train(self)

    def metrics(self) -> dict[str, Any]:
        """Final metrics of a finished run (numbers of the last iteration's evaluation)."""
        from domadapt.settings import setting_metrics

        st, ev, w = self.state, self.state.last_eval, self.state.last_window
        assert ev is not None and st.iteration == self.cfg.iters
        return {
            "run_key": self.cfg.key(), "name": self.cfg.name(),
            "target_acc": ev["acc"]["target"], "source_acc": ev["acc"].get("source"),
            "per_class_target_acc": ev["per_class"], **w, **ev["validators"],
            **ev["diagnostics"],
            **oracle(st.log),
            "iters": st.iteration, "wall_seconds": st.wall_seconds,
            "train_seconds": st.train_seconds,
            "images_per_second": st.train_images / max(st.train_seconds, 1e-9),
            "world_size": self.ctx.world_size, "device": str(self.device),
            **setting_metrics(self.cfg, ev["acc"], self.data),
        }


def oracle(log: list[dict[str, Any]]) -> dict[str, Any]:
    """The best logged target accuracy and its iteration (the earliest on a tie): selected WITH
    target labels, as Transfer-Learning-Library reports; an oracle, never the headline."""
    best = max(log, key=lambda row: row["target_acc"])
    return {"oracle_target_acc": best["target_acc"], "oracle_iter": best["iter"]}


def _as_tuples(obj: Any) -> Any:
    """random.setstate needs tuples where serialization may have produced lists."""
    return tuple(_as_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj
