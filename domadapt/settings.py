"""The three settings: which data a run trains and evaluates on, and how its result is summed up.

- transfer: train on *all* labelled source images and, for a method that uses it, *all*
  unlabelled target images; report accuracy on the whole target domain. `source_acc` is
  measured on the source training images (eval mode): a fit diagnostic, not a held-out number.
- multidomain: one source-only model on the train split of every domain pooled; report each
  domain's test split accuracy (`domain_acc`) and their mean (`avg_acc`, also `target_acc`);
  there is no source domain (`source_acc` is null; `train_acc` shows the fit).
- dg (domain generalization, DomainBed's protocol): one source-only model on every domain but
  the target, pooled; report accuracy on the whole target domain, which training never reads
  (no target batch, no target statistics; the evaluations score it with the model in eval
  mode, as they do in transfer). `source_acc` is null; --source-val-fraction (default 0.2)
  holds out that share of each training domain, pooled into `source_val`, whose accuracy is
  `val_source` (training-domain validation: `--select source`). The validators that read
  the target's images (val_entropy, val_snd, val_dev) stay empty: no selection rule sees it.
With --source-val-fraction > 0 a transfer run holds out that share of its source likewise.
With --eval-max-images N every evaluation set is a fixed stratified subset of at most N images
(`domadapt.data.subset`): a fast check, whose numbers then describe that subset only.
Target labels are only ever used to report, never to pick anything.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from domadapt.config import RunConfig, with_weights_hash
from domadapt.data import (
    DatasetSpec,
    DomainDataset,
    build_transform,
    domain_items,
    get_dataset,
    resolve_root,
)
from domadapt.data.manifest import Items, fingerprint, split_items
from domadapt.data.subset import stratified_subset
from domadapt.errors import UserError
from domadapt.methods import get_method
from domadapt.nn.domains import SOURCE, TARGET
from domadapt.norms import get_norm


@dataclass
class RunData:
    """Datasets of one run. `train`: "source" (multidomain: all train splits pooled; dg: every
    domain but the target, pooled) and, for a method that uses it, "target"; `evals`: "source"
    (transfer) and "target" (transfer, dg), plus "source_val", the held-out source (dg: of each
    training domain, pooled), with --source-val-fraction > 0; or one entry per domain's test
    split (multidomain); `targets`: the evals whose accuracy is the result."""

    classes: list[str]
    train: dict[str, DomainDataset]
    evals: dict[str, DomainDataset]
    domains: list[str]
    targets: list[str]
    info: dict[str, Any]


def resolve_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with full domain names, the absolute dataset root (styledigits: generated) and
    the weights file's hash (`with_weights_hash`); what its setting cannot run refused
    (`check_protocol`)."""
    cfg = with_weights_hash(cfg)
    check_protocol(cfg)
    spec = get_dataset(cfg.dataset)
    root = resolve_root(spec, cfg.root)
    if cfg.setting == "multidomain":
        return cfg.replace(dataset=spec.name, root=str(root), source=None, target=None)
    if cfg.setting == "dg":
        held_out_domains(spec, root)
        return cfg.replace(dataset=spec.name, root=str(root),
                           target=spec.resolve_domain(str(cfg.target), root))
    source = spec.resolve_domain(str(cfg.source), root)
    target = spec.resolve_domain(str(cfg.target), root)
    return cfg.replace(dataset=spec.name, root=str(root), source=source, target=target)


def check_protocol(cfg: RunConfig) -> None:
    """One-line UserErrors for what a setting's protocol cannot run: a norm that needs each
    image's domain where it is undefined (`check_domains_defined`); a method other than
    source-only (ERM) in multidomain or dg, which train no target; --adabn in dg (it would
    re-estimate statistics on the target's images)."""
    check_domains_defined(cfg)
    if cfg.setting != "transfer" and cfg.method != "source-only":
        why = ("" if cfg.setting != "dg" else f": {cfg.method} trains on target images, which a "
               "dg run never reads, and aligning the training domains with each other "
               "(multi-source) is not implemented")
        raise UserError(f"a {cfg.setting} run is source-only (ERM), got --method {cfg.method}"
                        f"{why}")
    if cfg.setting == "dg" and cfg.adabn:
        raise UserError("--adabn re-estimates the norm statistics on the target's images, which "
                        "a dg run never reads; leave it off")


def held_out_domains(spec: DatasetSpec, root: str | Path | None) -> list[str]:
    """The domains a dg run may hold out: every domain of the dataset, which needs at least
    two (one held out, the others trained on); else a one-line UserError."""
    domains = spec.domain_names(root)
    if len(domains) < 2:
        raise UserError(f"dg needs a dataset with at least 2 domains (one held out, the others "
                        f"trained on); {spec.name} at {root} has {len(domains)}: "
                        f"{', '.join(domains)}")
    return domains


def build_data(cfg: RunConfig) -> RunData:
    """Datasets of a resolved `cfg` (see the module docstring for the protocol)."""
    spec = get_dataset(cfg.dataset)
    root = Path(str(cfg.root))
    classes = spec.class_names(root)
    if len(classes) == 1:
        print(f"warning: {root} has one class ({classes[0]}): every prediction is right, "
              f"accuracy 1.0 measures nothing", file=sys.stderr)
    options = {"flip": spec.hflip, "resize_mode": cfg.resize_mode,
               "interpolation": cfg.interpolation,
               "crop_scale": (cfg.crop_scale_min, cfg.crop_scale_max)}
    train_tf = build_transform(cfg.image_size, cfg.resize_size, train=True, **options)
    eval_tf = build_transform(cfg.image_size, cfg.resize_size, train=False, **options)
    split = {"split_seed": cfg.split_seed, "test_fraction": cfg.test_fraction}
    if cfg.setting == "multidomain":
        domains = spec.domain_names(root)
        train_items = [it for d in domains for it in domain_items(spec, root, d, "train", **split)]
        tests = {d: domain_items(spec, root, d, "test", **split) for d in domains}
        if empty := [d for d, items in tests.items() if not items]:
            raise UserError(f"--test-fraction {cfg.test_fraction:g} leaves no test image in "
                            f"{', '.join(empty)}; raise it")
        evals = {d: DomainDataset(items, eval_tf) for d, items in tests.items()}
        counts = {"train": len(train_items)} | {f"test/{d}": len(v) for d, v in tests.items()}
        prints = {d: fingerprint(domain_items(spec, root, d), root) for d in domains}
        return capped(cfg, RunData(
            classes, {"source": DomainDataset(train_items, train_tf)}, evals, domains, domains,
            {"classes": classes, "domains": domains, "num_images": counts, "fingerprint": prints}))
    sources = ([d for d in spec.domain_names(root) if d != cfg.target] if cfg.setting == "dg"
               else [str(cfg.source)])
    full = {d: domain_items(spec, root, d) for d in sources}
    tgt = domain_items(spec, root, str(cfg.target))
    prints = {d: fingerprint(items, root) for d, items in full.items()}
    prints[str(cfg.target)] = fingerprint(tgt, root)
    parts = [held_out(cfg, items) for items in full.values()]
    src = [item for train, _ in parts for item in train]
    held = [item for _, heldout in parts for item in heldout]
    train = {"source": DomainDataset(src, train_tf)}
    if get_method(cfg.method).uses_target:
        train["target"] = DomainDataset(tgt, train_tf)
    evals = {"target": DomainDataset(tgt, eval_tf)}
    counts = {"source": len(src), "target": len(tgt)}
    if cfg.setting == "transfer":  # the fit on the training images (dg: val_source instead)
        evals = {"source": DomainDataset(src, eval_tf), **evals}
    if held:
        evals["source_val"] = DomainDataset(held, eval_tf)
        counts["source_val"] = len(held)
    trained = {"domains": sources, "held_out": cfg.target} if cfg.setting == "dg" else {}
    info = {"classes": classes, **trained, "num_images": counts, "fingerprint": prints}
    return capped(cfg, RunData(classes, train, evals, [*sources, str(cfg.target)], ["target"],
                               info))


def held_out(cfg: RunConfig, items: Items) -> tuple[Items, Items]:
    """(trained on, held out) of one source domain's items: --source-val-fraction of each
    class held out (`split_items`, --split-seed); none when it is 0."""
    if cfg.source_val_fraction > 0:
        return split_items(items, cfg.source_val_fraction, cfg.split_seed)
    return items, []


def capped(cfg: RunConfig, data: RunData) -> RunData:
    """`data` with every evaluation set cut to its --eval-max-images stratified subset (drawn
    with --split-seed) and `info["eval_images"]` = how many each scores; unchanged without."""
    n = cfg.eval_max_images
    if n is None:
        return data
    data.evals = {name: DomainDataset(stratified_subset(ds.items, n, cfg.split_seed),
                                      ds.transform) for name, ds in data.evals.items()}
    data.info["eval_images"] = {name: len(ds) for name, ds in data.evals.items()}
    return data


def eval_domain(cfg: RunConfig, name: str) -> int | None:
    """The domain label (`domadapt.nn.domains`) of evaluation set `name`: transfer: "source" and
    "source_val" SOURCE, "target" TARGET; None otherwise (multidomain's per-domain test sets,
    dg's sets: no domain-aware norm runs there)."""
    if cfg.setting != "transfer":
        return None
    return {"source": SOURCE, "source_val": SOURCE, "target": TARGET}.get(name)


def check_domains_defined(cfg: RunConfig) -> None:
    """A norm that needs each training image's domain (`NormKind.needs_domains`, DSBN) runs
    only where every training image has one of two known domains, both trained on: transfer
    with a method that trains on target images. Else a one-line UserError."""
    if not get_norm(cfg.norm).needs_domains:
        return
    if cfg.setting != "transfer":
        raise UserError(f"--norm {cfg.norm} needs each training image's domain (source or "
                        f"target): a {cfg.setting} run has no target domain to train")
    if not get_method(cfg.method).uses_target:
        raise UserError(f"--norm {cfg.norm} needs a method that trains on target images: "
                        f"--method {cfg.method} never sees the target, so its target branch "
                        f"would stay untrained")


def target_validators(cfg: RunConfig) -> bool:
    """Whether the validators that read the target's (unlabelled) images, val_entropy, val_snd
    and val_dev, are computed: not in dg, whose model selection sees only the training
    domains (DomainBed's training-domain validation); they are then empty."""
    return cfg.setting != "dg"


def result_accuracy(cfg: RunConfig, acc: dict[str, float], data: RunData) -> float:
    """The run's headline number: target accuracy (transfer; dg: the held-out domain's) or the
    mean of the domains' test accuracies (multidomain)."""
    return float(np.mean([acc[d] for d in data.targets]))


def setting_metrics(cfg: RunConfig, acc: dict[str, float], data: RunData) -> dict[str, Any]:
    """What metrics.json adds per setting (multidomain: domain_acc and avg_acc)."""
    if cfg.setting != "multidomain":
        return {}
    return {"domain_acc": {d: acc[d] for d in data.domains}, "avg_acc": acc["target"]}
