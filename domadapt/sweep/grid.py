"""The grid: the command line's lists parsed into RunConfigs, one per cell (times the trials of
a hyper-parameter search, `domadapt.hparam_search`), and the sweep's record (`plan_sweep`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domadapt.config import RunConfig, make_config
from domadapt.errors import UserError
from domadapt.tables import Layout, dataset_layout

SOURCE_FIELD = "{source}"  # in --pretrained: each transfer cell's source domain


@dataclass(frozen=True)
class SweepPlan:
    """The cells of a sweep, how its tables are laid out, and its record for sweep.json."""

    configs: tuple[RunConfig, ...]
    layout: Layout
    record: dict[str, Any]


def split_list(text: str, option: str) -> list[str]:
    """`a,b,,a` -> [a, b]: comma-separated, stripped, de-duplicated; UserError when empty."""
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not items:
        raise UserError(f"{option} is empty")
    return items


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in split_list(text, "--seeds"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise UserError(f"--seeds: {item!r} is not an integer") from None
    return seeds


def resolve_tasks(dataset: str, root: str | Path | None, text: str) -> list[tuple[str, str]]:
    """`all` -> every ordered pair of distinct domains; `none` -> no transfer task (a sweep of
    multi-domain / dg cells only); else `S:T,S:T` (full or short names, `S->T` also
    accepted) resolved to full names, in the dataset's canonical order."""
    from domadapt.data import get_dataset

    spec = get_dataset(dataset)
    canonical = spec.tasks(root)
    choice = text.strip().lower()
    if choice == "all":
        return canonical
    if choice == "none":
        return []
    tasks = set()
    for item in split_list(text, "--tasks"):
        source, sep, target = item.replace("->", ":").partition(":")
        if not sep or not source.strip() or not target.strip():
            raise UserError(f"--tasks: {item!r} is not SOURCE:TARGET")
        task = (spec.resolve_domain(source, root), spec.resolve_domain(target, root))
        if task[0] == task[1]:
            raise UserError(f"--tasks: {item!r} has the same source and target domain")
        tasks.add(task)
    return [t for t in canonical if t in tasks]


def build_grid(
    tasks: Sequence[tuple[str, str]],
    methods: Sequence[str],
    norms: Sequence[str],
    seeds: Sequence[int],
    *,
    multidomain: bool,
    dg_domains: Sequence[str] = (),
    preset: str | None = None,
    **options: Any,
) -> list[RunConfig]:
    """Every cell: seeds outermost (a whole seed finishes first), then tasks, methods, norms;
    with `multidomain`, one multi-domain cell per norm follows, then one leave-one-domain-out
    (dg) cell per held-out domain in `dg_domains` and norm. Multi-domain and dg cells are
    source-only (ERM). `options` are RunConfig fields (None = preset/default); a `{source}`
    in `pretrained` becomes each transfer cell's source domain (`_of_source`)."""
    cells = []
    pretrained = options.pop("pretrained", None)
    for seed in seeds:
        cells += [make_config(preset, **options, setting="transfer", source=s, target=t,
                              method=m, norm=n, seed=seed,
                              pretrained=_of_source(pretrained, s))
                  for s, t in tasks for m in methods for n in norms]
        if not multidomain and not dg_domains:
            continue
        erm = {**options, "pretrained": _of_source(pretrained, None), "method": "source-only",
               "seed": seed}
        if multidomain:
            cells += [make_config(preset, **erm, setting="multidomain", norm=n) for n in norms]
        cells += [make_config(preset, **erm, setting="dg", target=d, norm=n)
                  for d in dg_domains for n in norms]
    return cells


def _of_source(pretrained: str | None, source: str | None) -> str | None:
    """`--pretrained` for a cell with this source domain: `{source}` in the path replaced by it
    (two-stage sweeps: each task starts from its own source's model, e.g. exported with
    `domadapt export-backbone`). Cells without one source (multi-domain, dg): UserError."""
    if pretrained is None or SOURCE_FIELD not in pretrained:
        return pretrained
    if source is None:
        raise UserError(f"--pretrained {pretrained}: {SOURCE_FIELD} names one source domain; "
                        f"multi-domain and dg cells have none")
    path = pretrained.replace(SOURCE_FIELD, source)
    if not Path(path).expanduser().is_file():
        raise UserError(f"--pretrained {pretrained}: no file {path} for source {source}")
    return path


def _applicable(configs: list[RunConfig]
                ) -> tuple[list[RunConfig], list[dict[str, Any]], set[tuple[str, str, str]]]:
    """(the cells a run would accept, the others as [{"reason", "cells"}], the (setting,
    method, norm) columns left without a cell): a grid crosses every method, norm and setting,
    and some crossings are refused by the protocol (`settings.check_protocol`, e.g. dsbn in a
    source-only or dg cell, whose images have no target domain); those cells are left out of
    the sweep and of its tables, and sweep.json says why. A grid with no cell left: the first
    reason, as a UserError."""
    from domadapt.settings import check_protocol

    kept, reasons = [], {}
    for cfg in configs:
        try:
            check_protocol(cfg)
        except UserError as e:
            reasons[str(e)] = reasons.get(str(e), 0) + 1
            continue
        kept.append(cfg)
    if configs and not kept:
        raise UserError(f"no cell of the grid can run: {next(iter(reasons))}")

    def columns(cells: list[RunConfig]) -> set[tuple[str, str, str]]:
        return {(c.setting, c.method, c.norm) for c in cells}

    return (kept, [{"reason": r, "cells": n} for r, n in reasons.items()],
            columns(configs) - columns(kept))


def plan_sweep(
    *,
    dataset: str,
    root: str | None,
    tasks: str,
    methods: str,
    norms: str,
    seeds: str,
    multidomain: bool,
    dg: bool = False,
    preset: str | None = None,
    command: str = "",
    n_hparams: int = 1,
    hparams_seed: int = 0,
    **options: Any,
) -> SweepPlan:
    """Parse the grid options (as typed on the command line) into a SweepPlan; `dg`: one
    leave-one-domain-out cell per domain (a dataset of fewer than 2 domains: UserError). With
    `n_hparams` K > 1 each cell becomes K trials, trial 0 first (`hparam_search.trial_configs`;
    the options given here are held fixed) and sweep.json records K and the seed."""
    from domadapt.data import get_dataset, resolve_root
    from domadapt.hparam_search import check_search, trial_configs
    from domadapt.settings import held_out_domains

    check_search(n_hparams, hparams_seed)
    method_list, norm_list = split_list(methods, "--methods"), split_list(norms, "--norms")
    seed_list = parse_seeds(seeds)
    spec = get_dataset(dataset)
    data_root = str(resolve_root(spec, root))
    task_list = resolve_tasks(spec.name, data_root, tasks)
    dg_domains = held_out_domains(spec, data_root) if dg else []
    configs = build_grid(task_list, method_list, norm_list, seed_list, multidomain=multidomain,
                         dg_domains=dg_domains, preset=preset, dataset=spec.name,
                         root=data_root, **options)
    if not configs:
        raise UserError("the grid is empty: --tasks none needs --multidomain or --dg")
    fixed = {k for k, v in options.items() if v is not None}
    configs = [t for cfg in configs for t in trial_configs(cfg, n_hparams, hparams_seed, fixed)]
    configs, left_out, empty_columns = _applicable(configs)
    layout = dataset_layout(spec.name, data_root, task_list, method_list, norm_list, multidomain,
                            dg=dg, left_out=empty_columns)
    record = {
        "command": command, "dataset": spec.name, "root": data_root, "preset": preset,
        "tasks": [list(t) for t in task_list], "methods": method_list, "norms": norm_list,
        "seeds": seed_list, "multidomain": multidomain, "dg": dg,
        "options": {k: v for k, v in options.items() if v is not None},
        **({"hparams": {"n_hparams": n_hparams, "hparams_seed": hparams_seed}}
           if n_hparams > 1 else {}),
        **({"left_out": left_out} if left_out else {}),
    }
    return SweepPlan(tuple(configs), layout, record)
