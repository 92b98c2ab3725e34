"""Gate knockout: how much of a trained BIN model's accuracy its instance-normalised share carries.

A BIN layer computes y = gamma * (rho * BN(x) + (1 - rho) * IN(x)) + beta. Setting every gate
to 1 leaves y = gamma * BN(x) + beta in every layer: the same weights, the batch path alone.
Each BIN run is evaluated up to four times on its scored domains (transfer: the target;
multi-domain: every domain's test split, averaged):

    trained             the gates as trained
    gates=1             every gate 1, running statistics unchanged ("as-is")
    gates=1 restat      every gate 1 and every BN running mean / variance re-estimated on the
                        run's source training images (eval transform; multi-domain: the pooled
                        train splits), exactly as AdaBN does (`nn.adabn`); no target image
    gates=1 restat train
                        (transfer runs of a method that trains on target images, e.g. DANN)
                        every gate 1 and the statistics re-estimated on what training
                        normalised: batches [x_s; x_t] of batch_size source and batch_size
                        target training images each (eval transform, no label), as DANN's
                        forward concatenates them. Exploratory: added after the interim
                        results of results/pacs-long (not in its pre-registration), because
                        `restat` also moves a DANN model's statistics toward the source domain

and the comparisons are

    trained - gates=1          the test-time share of (1 - rho) IN(x) *plus* the shift that
                               removing it causes in the statistics every later layer sees
                               (its running statistics were estimated with the IN share mixed
                               in): a drop here cannot tell the two apart
    trained - gates=1 restat   the same with that shift removed: the later layers' statistics
                               match the batch-only network again, so what is left is what the
                               IN share carries (and the network's fit to it); for a model
                               trained on source + target batches (DANN) the statistics also
                               move from the training mix toward the source domain
    trained - gates=1 restat train
                               the shift removed without that move: the batch-only network with
                               statistics of the images it was trained on, as it was trained
    gates=1 [restat] - BN      the BIN model's batch path against the BN run of the same task,
                               method and seed
    trained - BN               the usual BIN - BN difference (as in comparison.md)

On a BN network converted to BIN (rho = 1 from the start) the re-estimated variant gives back the
BN network whose statistics were estimated on the same images, to float rounding (tested).

Each run's two accuracies go to RUN_DIR/gate_knockout.json (a small record, committed with the
run), so the summary is rebuilt without checkpoints; evaluating needs the run's checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from domadapt.config import RunConfig
from domadapt.errors import UserError
from domadapt.io import atomic_write_json, read_json

RECORD = "gate_knockout.json"
TRAINED, GATES_ONE, RESTAT, BN = "BIN", "BIN gates=1", "BIN gates=1 restat", "BN"
RESTAT_TRAIN = "BIN gates=1 restat train"
COMPARISONS = ((TRAINED, GATES_ONE), (TRAINED, RESTAT), (TRAINED, RESTAT_TRAIN), (GATES_ONE, BN),
               (RESTAT, BN), (RESTAT_TRAIN, BN), (TRAINED, BN))
# the record's keys, in order, with their labels
VARIANTS = {"trained": TRAINED, "gates_one": GATES_ONE, "gates_one_restat": RESTAT,
            "gates_one_restat_train": RESTAT_TRAIN}
MULTIDOMAIN_ROW = "Avg"  # a multi-domain run's mean over its domains, as in comparison.md
COLUMNS = ("setting", "task", "method", "seed", "mean_gate",
           *(f"acc_{v}" for v in VARIANTS), "acc_bn", "run_dir")


def set_gates(model: nn.Module, value: float) -> int:
    """Set every BIN gate of `model` to `value` in place; returns the number of layers."""
    from domadapt.nn import BatchInstanceNorm2d

    layers = [m for m in model.modules() if isinstance(m, BatchInstanceNorm2d)]
    with torch.no_grad():
        for m in layers:
            m.rho.fill_(value)
    return len(layers)


def applicable_variants(setting: str, method: str) -> tuple[str, ...]:
    """The VARIANTS a run of `setting` and `method` is evaluated in: `gates_one_restat_train`
    only for transfer runs of a method that trains on target images (elsewhere training
    normalised the source images alone, which `gates_one_restat` already re-estimates on)."""
    from domadapt.methods import get_method

    mix = setting == "transfer" and get_method(method).uses_target
    return tuple(v for v in VARIANTS if mix or v != "gates_one_restat_train")


def knockout_run(run_dir: Path, *, device: str = "cpu", root: str | None = None,
                 quiet: bool = False, keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a finished BIN run in its `applicable_variants` (module docstring); write and
    return the record {"iters", "trained": {domain: acc}, "gates_one": {...}, ...}
    (accuracies as fractions). `keep`: an earlier record of the same iteration whose variants
    are kept as they are; only the missing ones are evaluated."""
    from domadapt.analysis.report import analysis_sets, load_run
    from domadapt.evaluation import accuracy, predict
    from domadapt.progress import progress

    cfg, model = load_run(run_dir, device)
    if root is not None:
        cfg = cfg.replace(root=str(Path(root).resolve()))
    sets, scored, _ = analysis_sets(cfg)
    gates_one = copy.deepcopy(model)
    if set_gates(gates_one, 1.0) == 0:
        raise UserError(f"{run_dir}: the run has no BIN layers (norm={cfg.norm})")
    build = {"trained": lambda: model, "gates_one": lambda: gates_one,
             "gates_one_restat": lambda: restat_on_source(gates_one, cfg, device=device),
             "gates_one_restat_train": lambda: restat_on_training_mix(gates_one, cfg,
                                                                      device=device)}
    record: dict[str, Any] = {"iters": cfg.iters}
    for name in applicable_variants(cfg.setting, cfg.method):
        if keep and name in keep:
            record[name] = keep[name]
            continue
        variant, record[name] = build[name](), {}
        for domain in progress(scored, quiet=quiet, desc=f"{run_dir.name} {name}", leave=False):
            preds, labels = predict(variant, sets[domain], batch_size=2 * cfg.batch_size,
                                    num_workers=cfg.num_workers, device=torch.device(device))
            record[name][domain] = accuracy(preds, labels)
    atomic_write_json(run_dir / RECORD, record)
    return record


def restat_on_source(model: nn.Module, cfg: RunConfig, *, device: str = "cpu") -> nn.Module:
    """A copy of `model` whose BN / BIN running statistics are re-estimated (`adapt_batch_stats`)
    on the run's source training images with the eval transform (multi-domain: the pooled train
    splits; dg: the training domains' images trained on), in the fixed random order of the
    run's seed, as AdaBN reads them (`nn.adabn`). No target image is read."""
    from domadapt.data import DomainDataset
    from domadapt.data.loaders import eval_loader
    from domadapt.nn.adabn import adapt_batch_stats
    from domadapt.settings import build_data

    data = build_data(cfg)
    images = data.evals["source"] if cfg.setting == "transfer" else DomainDataset(
        data.train["source"].items, next(iter(data.evals.values())).transform)
    batches = (x.to(device) for x, _ in eval_loader(images, 2 * cfg.batch_size,
                                                     cfg.num_workers, seed=cfg.seed))
    return adapt_batch_stats(model, batches)


def restat_on_training_mix(model: nn.Module, cfg: RunConfig, *,
                           device: str = "cpu") -> nn.Module:
    """A copy of `model` whose BN / BIN running statistics are re-estimated (`adapt_batch_stats`)
    on batches [x_s; x_t] as a transfer method that trains on target images normalises them:
    batch_size source and batch_size target training images each (eval transform; no label is
    read). Each domain is read in the fixed random order of the run's seed, repeated, for
    ceil(larger domain / batch_size) batches: the larger domain is read once (its last batch
    filled from its start), the smaller one as often as that takes."""
    from domadapt.data import DomainDataset
    from domadapt.data.loaders import eval_loader, fixed_order
    from domadapt.nn.adabn import adapt_batch_stats
    from domadapt.settings import build_data

    data = build_data(cfg)
    if cfg.setting != "transfer" or "target" not in data.train:
        raise UserError(f"--method {cfg.method} ({cfg.setting}) does not train on target "
                        "images: there is no source + target mix to re-estimate on")
    domains = [data.train["source"].items, data.train["target"].items]
    b = cfg.batch_size
    n = b * -(-max(len(items) for items in domains) // b)
    transform = data.evals["target"].transform
    loaders = []
    for items in domains:
        order = fixed_order(len(items), cfg.seed)
        stream = [items[order[i % len(items)]] for i in range(n)]
        loaders.append(eval_loader(DomainDataset(stream, transform), b, cfg.num_workers))
    return adapt_batch_stats(model, (torch.cat([xs, xt]).to(device)
                                     for (xs, _), (xt, _) in zip(*loaders, strict=True)))


def knockout_frame(sweep_dir: Path, *, device: str = "cpu", root: str | None = None,
                   quiet: bool = False) -> tuple[pd.DataFrame, int]:
    """(one row per finished BIN run with a record, COLUMNS, accuracies in percent; the number
    of BIN runs left out for want of both a record and a checkpoint). Runs without a record
    are evaluated first (`knockout_run`)."""
    from domadapt.progress import progress
    from domadapt.rundir import RunDir
    from domadapt.tables import load_sweep, relative_path
    from domadapt.tables.records import config_task

    layout, runs, _ = load_sweep(sweep_dir)
    bins = [r for r in runs if r.config["norm"] == "bin"]
    if not bins:
        raise UserError(f"{sweep_dir}: no finished BIN runs (train with --norm bin)")
    records, missing = {}, 0
    for run in progress(bins, quiet=quiet, desc="gate knockout"):
        path = run.run_dir / RECORD
        record = read_json(path) if path.is_file() else {}
        current = record.get("iters") == run.config["iters"]
        has_checkpoint = RunDir(run.run_dir).checkpoint_path.is_file()
        complete = all(v in record for v in applicable_variants(run.config["setting"],
                                                                run.config["method"]))
        if current and (complete or not has_checkpoint):
            records[run.run_dir] = record  # one made before a variant existed: as it is
        elif has_checkpoint:  # the missing variants are evaluated, the others kept
            records[run.run_dir] = knockout_run(run.run_dir, device=device, root=root,
                                                quiet=quiet, keep=record if current else None)
        else:
            missing += 1

    def cell(cfg: dict[str, Any]) -> tuple[Any, ...]:
        task = (MULTIDOMAIN_ROW if cfg["setting"] == "multidomain"
                else config_task(cfg, layout))
        return cfg["setting"], task, cfg["method"], cfg["seed"]

    bn = {cell(r.config): _percent(_scored(r.metrics)) for r in runs if r.config["norm"] == "bn"}
    rows = [dict(zip(COLUMNS, (*cell(run.config), run.metrics.get("mean_gate"),
                               *(_percent(rec[v]) if v in rec else None for v in VARIANTS),
                               bn.get(cell(run.config)), relative_path(run.run_dir, sweep_dir)),
                     strict=True))
            for run in bins if (rec := records.get(run.run_dir)) is not None]
    return pd.DataFrame(rows, columns=list(COLUMNS)), missing


def knockout_comparison(frame: pd.DataFrame) -> pd.DataFrame:
    """`tables.COMPARISON_COLUMNS` for COMPARISONS within each setting and method: per task
    the seeds' mean difference and t interval, then rows `all` (pairs) and `task means`
    (`stats.paired_comparison`), in percentage points."""
    from domadapt.stats import paired_comparison
    from domadapt.tables import COMPARISON_COLUMNS, stack_comparison

    long = frame.melt(id_vars=["setting", "task", "method", "seed"],
                      value_vars=[*(f"acc_{v}" for v in VARIANTS), "acc_bn"],
                      var_name="variant", value_name="accuracy").dropna(subset=["accuracy"])
    long["variant"] = long["variant"].map(
        {f"acc_{v}": label for v, label in VARIANTS.items()} | {"acc_bn": BN})
    long["accuracy"] = long["accuracy"].round(9)
    order = {t: i for i, t in enumerate(dict.fromkeys(frame["task"]))}
    records: list[dict[str, Any]] = []
    for (setting, method), part in long.groupby(["setting", "method"], sort=False):
        for a, b in COMPARISONS:
            per_task, overall = paired_comparison(part, "variant", a, b)
            if per_task.empty:
                continue
            within = f"method={method}"
            overall = overall[(overall["unit"] == "pairs") | (overall["n"] >= 2)]  # one task
            records += stack_comparison(per_task.assign(within=within),
                                        overall.assign(within=within), setting, order)
    return pd.DataFrame(records, columns=list(COMPARISON_COLUMNS)).round(
        {"mean_diff": 4, "ci_low": 4, "ci_high": 4})


NOTE = (
    "Gate knockout (`domadapt.analysis.knockout`): every finished BIN run evaluated with its "
    "gates as trained (`BIN`), with every gate set to 1 (`BIN gates=1`: y = gamma BN(x) + "
    "beta in every layer, same weights and running statistics) and with every gate set to 1 "
    "and the BN running statistics re-estimated on the source training images (`BIN gates=1 "
    "restat`, no target image), on the target (multi-domain: the mean over the domains' test "
    "splits, row `Avg`), at the run's last iteration; `BN`: the BN run of the same task, method "
    "and seed. `BIN - BIN gates=1` mixes what the instance-normalised share (1 - rho) IN(x) "
    "contributes at test time with the statistics shift its removal causes in later layers; "
    "`BIN - BIN gates=1 restat` removes that shift, but for a model trained on source + target "
    "batches (DANN) it also moves the statistics toward the source domain. `BIN gates=1 restat "
    "train` (transfer runs of methods that train on target images; exploratory, added after "
    "the interim results of results/pacs-long, not pre-registered) re-estimates them on batches "
    "of source + target training images as training normalised them (no label): the shift "
    "removed without that move. `... - BN` compares the BIN model's batch "
    "path with a BN model. Differences in percentage points, paired by task and seed; "
    "intervals and tests as in comparison.md (row `task means`: the tasks as the units). "
    "Records made before a variant existed (no checkpoint left to re-evaluate) lack its "
    "column; their rows are left out of that variant's comparisons.")


def knockout_report(sweep_dir: str | Path, *, device: str = "cpu", root: str | None = None,
                    quiet: bool = False) -> list[Path]:
    """gate_knockout.csv (one row per BIN run) and gate_knockout.md (the paired comparisons)
    beside the sweep's tables (`report.find_tables`)."""
    from domadapt.analysis.report import find_tables
    from domadapt.tables import comparison_sections, write_csv_atomic, write_markdown_parts

    sweep_dir = Path(sweep_dir)
    tables_dir = find_tables(sweep_dir)
    frame, missing = knockout_frame(sweep_dir, device=device, root=root, quiet=quiet)
    if frame.empty:
        raise UserError(f"{sweep_dir}: no BIN run has a {RECORD} or a checkpoint to evaluate")
    note = NOTE + (f" {missing} BIN run(s) have neither a record nor a checkpoint and are "
                   "left out." if missing else "")
    csv = write_csv_atomic(frame.round(4), tables_dir / "gate_knockout.csv", index=False)
    md = write_markdown_parts(tables_dir / "gate_knockout.md", "Gate knockout", note,
                              comparison_sections(knockout_comparison(frame)),
                              f"domadapt gate-knockout {sweep_dir}")
    return [csv, md]


def _scored(metrics: dict[str, Any]) -> dict[str, float]:
    """The accuracies a run is scored on: {target: acc} or the multi-domain {domain: acc}."""
    return metrics.get("domain_acc") or {"target": metrics["target_acc"]}


def _percent(accs: dict[str, float]) -> float:
    return 100.0 * sum(accs.values()) / len(accs)

