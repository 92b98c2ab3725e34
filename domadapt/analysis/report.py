"""File-producing analysis reports behind `domadapt gates | analyze | compare`.

The numbers come from the pure modules (gates, adistance, confusion, tsne, features); this
module loads runs and data, writes CSV/JSON atomically and renders the figures.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn
from torch.utils.data import Dataset, Subset

from domadapt.analysis.adistance import C_GRID, proxy_a_distance
from domadapt.analysis.confusion import confusion_frame, confusion_matrix, per_class_accuracy
from domadapt.analysis.features import Features, extract_features
from domadapt.analysis.tsne import subsample_indices, tsne_embedding
from domadapt.config import RunConfig
from domadapt.errors import UserError
from domadapt.io import atomic_write_csv, atomic_write_json, read_json
from domadapt.norms.gates import HIGH, LOW, gate_totals, summarize_gates

ANALYSIS_DIRNAME = "analysis"
FEATURE_KINDS = ("backbone", "bottleneck")  # where the proxy A-distance is measured
TSNE_FEATURES = "bottleneck"  # what the domain discriminator sees
ADISTANCE_TEST_FRACTION = 0.5
MIN_ANALYSED = 20  # images per domain: room for the probe's held-out half and 3-fold CV


def write_csv(df: pd.DataFrame, path: Path, index: bool = False) -> None:
    atomic_write_csv(path, df, index=index, float_format="%.6g")


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[RunConfig, nn.Module]:
    """(config, trained model in eval mode) of a run directory; UserError if it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    from domadapt.train import load_trained

    cfg, model = load_trained(run_dir, device=device)
    return cfg, model.eval()


def run_title(cfg: RunConfig) -> str:
    return f"{cfg.dataset}: {cfg.name()}"


def default_out(run_dir: Path, out_dir: str | Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else run_dir / ANALYSIS_DIRNAME


# ---------------------------------------------------------------------------- gates


def gates_report(run_dir: str | Path, out_dir: str | Path | None = None
                 ) -> tuple[pd.DataFrame, dict[str, float | int]]:
    """gates.csv (`summarize_gates` columns) and gates.png of a BIN run, into `out_dir`
    (default RUN_DIR/analysis). Returns (per-layer summary, network totals)."""
    from domadapt import plots
    from domadapt.nn import gate_values

    plots.require_matplotlib()
    run_dir = Path(run_dir)
    cfg, model = load_run(run_dir)
    gates = gate_values(model)
    if not gates:
        raise UserError(f"{run_dir}: the run has no BIN layers (norm={cfg.norm}); "
                        "gates exist only for --norm bin runs")
    summary = summarize_gates(gates)
    totals = gate_totals(summary)
    out = default_out(run_dir, out_dir)
    write_csv(summary, out / "gates.csv")
    title = (f"BIN gates ρ — {run_title(cfg)}\n{totals['channels']} channels in "
             f"{totals['layers']} layers: mean ρ {totals['mean']:.3f}, "
             f"{totals[f'frac_below_{LOW}']:.1%} < {LOW}, {totals[f'frac_above_{HIGH}']:.1%} > {HIGH}")
    values = [v.detach().float().cpu().numpy() for v in gates.values()]
    plots.save_png(plots.gates_figure(values, list(summary["layer"]), title), out / "gates.png")
    return summary, totals


# ---------------------------------------------------------------------------- analyze


@dataclass(frozen=True)
class AnalysisResult:
    out_dir: Path
    adistance: pd.DataFrame  # one row per (features, domain pair)
    per_class: pd.DataFrame  # per-class accuracy on the scored images
    accuracy: dict[str, float]  # accuracy per scored domain


def analysis_sets(cfg: RunConfig) -> tuple[dict[str, Dataset], tuple[str, ...], list[str]]:
    """(eval datasets per domain, the domains scored for classification, class names), from
    the run's own data protocol (`train.build_data`, eval transform):

    transfer:    the whole source domain (trained on) and the whole target domain (adapted
                 to); classification is scored on the target, as in metrics.json.
    multidomain: every domain's test split; scored on all of them (confusion pooled).
    dg:          every training domain whole (held-out part included) and the held-out domain;
                 classification is scored on the held-out domain, as in metrics.json.
    """
    from domadapt.data import DomainDataset, domain_items, get_dataset
    from domadapt.settings import build_data

    data = build_data(cfg)
    if cfg.setting == "transfer":
        assert cfg.source is not None and cfg.target is not None
        sets = {cfg.source: data.evals["source"], cfg.target: data.evals["target"]}
        return sets, (cfg.target,), list(data.classes)
    if cfg.setting == "dg":
        assert cfg.target is not None and cfg.root is not None
        spec, target = get_dataset(cfg.dataset), data.evals["target"]
        sets = {d: DomainDataset(domain_items(spec, cfg.root, d), target.transform)
                for d in data.domains if d != cfg.target}
        return sets | {cfg.target: target}, (cfg.target,), list(data.classes)
    return {d: data.evals[d] for d in data.domains}, tuple(data.domains), list(data.classes)


def _subsample(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """At most `n` items of `dataset`, a seeded random subset in the original order."""
    if n is None or len(dataset) <= n:
        return dataset
    return Subset(dataset, sorted(random.Random(seed).sample(range(len(dataset)), n)))


def analyze_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    max_per_domain: int | None = None,
    tsne_per_domain: int = 500,
    root: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    quiet: bool = False,
) -> AnalysisResult:
    """Features of every analysed domain through the trained model (eval mode, eval transform),
    then: proxy A-distance on backbone and bottleneck features (adistance.json/.csv), t-SNE of
    bottleneck features (tsne.png, tsne.csv), confusion matrix and per-class accuracy
    (confusion.csv/.png, per_class_acc.csv). Default `out_dir`: RUN_DIR/analysis."""
    from domadapt import plots
    from domadapt.data import eval_loader

    plots.require_matplotlib()
    if max_per_domain is not None and max_per_domain < MIN_ANALYSED:
        raise UserError(f"--max-per-domain must be at least {MIN_ANALYSED}, got {max_per_domain}")
    if tsne_per_domain < MIN_ANALYSED:
        raise UserError(f"--tsne-per-domain must be at least {MIN_ANALYSED}, got {tsne_per_domain}")
    run_dir = Path(run_dir)
    out = default_out(run_dir, out_dir)
    cfg, model = load_run(run_dir, device)
    if root is not None:
        cfg = cfg.replace(root=str(Path(root).resolve()))
    sets, scored, classes = analysis_sets(cfg)

    feats: dict[str, Features] = {}
    for domain, ds in sets.items():
        if len(ds) == 0:
            raise UserError(f"domain {domain} of {cfg.dataset} has no images to analyse")
        loader = eval_loader(_subsample(ds, max_per_domain, seed), 2 * cfg.batch_size,
                             cfg.num_workers)
        feats[domain] = extract_features(model, loader, device, quiet=quiet,
                                         desc=f"features {domain}")
    title = run_title(cfg)
    adist = _write_adistance(feats, cfg, out, max_per_domain=max_per_domain, seed=seed)
    per_class, accuracy = _write_confusion(feats, scored, classes, out, title)
    _write_tsne(feats, classes, adist, out, title, per_domain=tsne_per_domain, seed=seed)
    return AnalysisResult(out, adist, per_class, accuracy)


def _pairs_label(domains: list[str]) -> str:
    return f"{domains[0]} vs {domains[1]}" if len(domains) == 2 else \
        f"mean over {len(domains) * (len(domains) - 1) // 2} domain pairs"


def _write_adistance(feats: dict[str, Features], cfg: RunConfig, out: Path, *,
                     max_per_domain: int | None, seed: int) -> pd.DataFrame:
    """adistance.csv/.json: proxy A-distance for every feature kind x pair of domains."""
    domains = list(feats)
    rows = []
    for kind in FEATURE_KINDS:
        for a, b in itertools.combinations(domains, 2):
            res = proxy_a_distance(getattr(feats[a], kind), getattr(feats[b], kind),
                                   test_fraction=ADISTANCE_TEST_FRACTION, seed=seed)
            rows.append({"features": kind, "domain_a": a, "domain_b": b, **res.to_dict()})
    adist = pd.DataFrame(rows)
    write_csv(adist, out / "adistance.csv")
    atomic_write_json(out / "adistance.json", {
        "run": cfg.name(),
        "setting": cfg.setting,
        "d_a": {k: float(adist.loc[adist["features"] == k, "d_a"].mean()) for k in FEATURE_KINDS},
        "d_a_of": _pairs_label(domains),
        "probe": {
            "classifier": "StandardScaler + LogisticRegression(class_weight=balanced)",
            "C_grid": list(C_GRID),
            "cv_folds": 3,
            "test_fraction": ADISTANCE_TEST_FRACTION,
            "error": "balanced error on the held-out split, stratified by domain",
            "seed": seed,
        },
        "max_per_domain": max_per_domain,
        "pairs": adist.to_dict(orient="records"),
    })
    return adist


def _write_confusion(feats: dict[str, Features], scored: tuple[str, ...], classes: list[str],
                     out: Path, title: str) -> tuple[pd.DataFrame, dict[str, float]]:
    """confusion.csv/.png and per_class_acc.csv over the scored domains (pooled); returns
    (per-class accuracy, accuracy per scored domain)."""
    from domadapt import plots

    labels = np.concatenate([feats[d].labels for d in scored])
    preds = np.concatenate([feats[d].preds for d in scored])
    cm = confusion_matrix(labels, preds, len(classes))
    per_class = per_class_accuracy(cm, classes)
    write_csv(confusion_frame(cm, classes), out / "confusion.csv", index=True)
    write_csv(per_class, out / "per_class_acc.csv")
    where = f"target {scored[0]}" if len(scored) == 1 else "test splits of all domains"
    fig = plots.confusion_figure(cm, classes, f"{title}\n{where}: accuracy "
                                              f"{np.trace(cm) / cm.sum():.1%}")
    plots.save_png(fig, out / "confusion.png")
    accuracy = {d: float((feats[d].preds == feats[d].labels).mean()) for d in scored}
    return per_class, accuracy


def _write_tsne(feats: dict[str, Features], classes: list[str], adist: pd.DataFrame, out: Path,
                title: str, *, per_domain: int, seed: int) -> None:
    """tsne.csv/.png: t-SNE of `TSNE_FEATURES`, at most `per_domain` points per domain."""
    from domadapt import plots

    domains = list(feats)
    x = np.concatenate([getattr(feats[d], TSNE_FEATURES) for d in domains])
    dom = np.concatenate([np.full(len(feats[d]), i) for i, d in enumerate(domains)])
    cls = np.concatenate([feats[d].labels for d in domains])
    keep = subsample_indices(dom, per_domain, seed=seed)
    xy = tsne_embedding(x[keep], seed=seed)
    write_csv(pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1],
                            "domain": [domains[i] for i in dom[keep]],
                            "class": [classes[i] for i in cls[keep]]}), out / "tsne.csv")
    d_a = adist.loc[adist["features"] == TSNE_FEATURES, "d_a"].mean()
    fig = plots.tsne_figure(xy, dom[keep], domains, cls[keep], classes,
                            f"t-SNE of {TSNE_FEATURES} features — {title}\nproxy A-distance "
                            f"{d_a:.2f} ({_pairs_label(domains)})")
    plots.save_png(fig, out / "tsne.png")


# ---------------------------------------------------------------------------- compare


SUMMARY = "summary.csv"  # written by domadapt.tables: setting,row,method,norm,n_seeds,mean,std
COMPARE_SETTINGS = (  # setting, figure, title, y label
    ("transfer", "transfer_table.png", "Transfer: target accuracy", "target accuracy (%)"),
    ("multidomain", "multidomain_table.png", "Multi-domain: test accuracy",
     "test accuracy (%)"),
    ("dg", "dg_table.png", "Domain generalization: held-out domain accuracy",
     "held-out domain accuracy (%)"),
)


def find_tables(sweep_dir: Path) -> Path:
    """The folder holding a sweep's tables: `sweep_dir` itself, or the `results` folder its
    sweep.json records (`domadapt sweep --results`)."""
    from domadapt.rundir import RECORD

    if not sweep_dir.is_dir():
        raise UserError(f"sweep directory not found: {sweep_dir}")
    record = sweep_dir / RECORD
    if (sweep_dir / SUMMARY).is_file() or not record.is_file():
        return sweep_dir
    try:
        results = read_json(record).get("results")
    except ValueError as e:
        raise UserError(f"corrupt JSON in {record}: {e}") from None
    # recorded relative to the sweep directory (older records: absolute)
    return Path(os.path.normpath(sweep_dir / results)) if results else sweep_dir


def read_summary(tables_dir: Path) -> pd.DataFrame:
    """`summary.csv` of a results directory, with a `column` label per method/norm."""
    from domadapt.tables import STAT_COLUMNS

    path = tables_dir / SUMMARY
    if not path.is_file():
        raise UserError(f"no {SUMMARY} in {tables_dir}: pass the directory the sweep wrote its "
                        "tables to (its --results, else the sweep directory)")
    try:
        stats = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"unreadable table {path}: {e}") from None
    if missing := [c for c in STAT_COLUMNS if c not in stats.columns]:
        raise UserError(f"{path}: missing columns {', '.join(missing)}")
    stats["row"] = stats["row"].astype(str)
    transfer = stats["setting"] == "transfer"
    stats["column"] = np.where(transfer, stats["method"].astype(str) + "/" + stats["norm"],
                               stats["norm"])
    return stats


def compare_report(sweep_dir: str | Path) -> list[Path]:
    """transfer_table.png (and multidomain_table.png, dg_table.png when those tables exist)
    beside the tables of a sweep (`find_tables`); the numbers are those of summary.csv. With
    BIN gate records (gates_by_layer.csv), also gates.png. Returns the figures."""
    from domadapt import plots

    plots.require_matplotlib()
    tables_dir = find_tables(Path(sweep_dir))
    stats = read_summary(tables_dir)
    written = []
    for setting, name, title, ylabel in COMPARE_SETTINGS:
        mine = stats[stats["setting"] == setting]
        if mine.empty or mine["mean"].isna().all():
            continue
        seeds = int(mine["n_seeds"].max())
        sub = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
        fig = plots.comparison_figure(mine, f"{title} — {tables_dir.name}\n{sub}", ylabel)
        plots.save_png(fig, tables_dir / name)
        written.append(tables_dir / name)
    from domadapt.tables import GATES_BY_LAYER

    if (gates_csv := tables_dir / GATES_BY_LAYER).is_file():
        fig = plots.gates_sweep_figure(pd.read_csv(gates_csv),
                                       f"BIN gates per layer — {tables_dir.name}")
        plots.save_png(fig, tables_dir / "gates.png")
        written.append(tables_dir / "gates.png")
    if not written:
        raise UserError(f"{tables_dir / SUMMARY}: no finished results to plot")
    return written


def versus_gates_report(out_dir: str | Path) -> Path | None:
    """versus_gates.png beside the versus_gates.csv of `domadapt versus` (the gates of both
    sweeps' paired runs, one colour per sweep and method); None when there is no such CSV."""
    from domadapt import plots
    from domadapt.tables import VERSUS_GATES

    csv = Path(out_dir) / VERSUS_GATES
    if not csv.is_file():
        return None
    plots.require_matplotlib()
    fig = plots.gates_sweep_figure(pd.read_csv(csv), "BIN gates per layer — A vs B (paired runs)",
                                   by=("sweep", "setting", "method", "norm"))
    plots.save_png(fig, csv.with_suffix(".png"))
    return csv.with_suffix(".png")
