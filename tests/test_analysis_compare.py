"""`domadapt compare` on tables built by domadapt.tables from hand-made run directories,
and the CLI's one-line errors for bad analysis inputs."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pandas as pd
import pytest

from domadapt.io import atomic_write_json

TASKS = [("gray", "color"), ("color", "sketch")]
DOMAINS = ["gray", "color", "texture", "sketch"]


def _acc(task: int, method: str, norm: str, seed: int) -> float:
    """A known target accuracy (fraction) per run."""
    return 0.5 + 0.1 * task + 0.05 * (method == "dann") + 0.02 * (norm == "bin") + 0.01 * seed


def _fake_run(run_dir, config: dict, metrics: dict) -> None:
    atomic_write_json(run_dir / "config.json", {"config": config})
    atomic_write_json(run_dir / "metrics.json", metrics)


@pytest.fixture
def sweep(tmp_path):
    """A sweep dir with finished transfer runs (2 tasks x 2 methods x 2 norms x 2 seeds) and
    multi-domain runs (2 norms x 2 seeds), tables written by domadapt.tables."""
    from domadapt.tables import write_tables

    base = {"dataset": "styledigits", "backbone": "digitnet", "iters": 10}
    for (t, (s, d)), m, n, seed in itertools.product(enumerate(TASKS), ["source-only", "dann"],
                                                      ["bn", "bin"], [0, 1]):
        _fake_run(tmp_path / "runs" / f"{s}-{d}_{m}_{n}_s{seed}",
                  {**base, "setting": "transfer", "source": s, "target": d, "method": m,
                   "norm": n, "seed": seed},
                  {"target_acc": _acc(t, m, n, seed)})
    for n, seed in itertools.product(["bn", "bin"], [0, 1]):
        domain_acc = {dom: 0.6 + 0.05 * i + 0.01 * seed for i, dom in enumerate(DOMAINS)}
        _fake_run(tmp_path / "runs" / f"multidomain_erm_{n}_s{seed}",
                  {**base, "setting": "multidomain", "source": None, "target": None,
                   "method": "source-only", "norm": n, "seed": seed},
                  {"target_acc": float(np.mean(list(domain_acc.values()))),
                   "domain_acc": domain_acc})
    write_tables(tmp_path)
    return tmp_path


def test_compare_plots_the_numbers_of_the_tables(sweep, run_cli):
    from domadapt.analysis.report import read_summary

    code, out, err = run_cli("compare", sweep)
    assert code == 0, err
    for name in ("transfer_table.png", "multidomain_table.png"):
        data = (sweep / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert str(sweep / name) in out

    stats = read_summary(sweep)
    transfer = stats[stats["setting"] == "transfer"]
    assert list(dict.fromkeys(transfer["row"])) == ["G->C", "C->S", "Avg"]
    assert set(transfer["column"]) == {"source-only/bn", "source-only/bin", "dann/bn", "dann/bin"}
    cell = transfer[(transfer["row"] == "C->S") & (transfer["column"] == "dann/bin")].iloc[0]
    seeds = [100 * _acc(1, "dann", "bin", s) for s in (0, 1)]
    assert cell["mean"] == pytest.approx(np.mean(seeds), abs=1e-3)
    assert cell["std"] == pytest.approx(np.std(seeds, ddof=1), abs=1e-3)
    avg = transfer[(transfer["row"] == "Avg") & (transfer["column"] == "source-only/bn")].iloc[0]
    assert avg["mean"] == pytest.approx(100 * np.mean([_acc(t, "source-only", "bn", s)
                                                       for t in (0, 1) for s in (0, 1)]), abs=1e-3)
    multi = stats[stats["setting"] == "multidomain"]
    assert set(multi["column"]) == {"bn", "bin"}


def test_compare_transfer_only_sweep_writes_one_figure(sweep, run_cli):
    summary = pd.read_csv(sweep / "summary.csv")
    summary[summary["setting"] == "transfer"].to_csv(sweep / "summary.csv", index=False)
    code, _, err = run_cli("compare", sweep)
    assert code == 0, err
    assert (sweep / "transfer_table.png").is_file()
    assert not (sweep / "multidomain_table.png").exists()


@pytest.mark.parametrize("args, message", [
    (["compare", "{tmp}/nope"], "sweep directory not found"),
    (["compare", "{tmp}"], "no summary.csv in"),
    (["gates", "{tmp}/nope"], "run directory not found"),
    (["analyze", "{tmp}/nope"], "run directory not found"),
    (["gates", "{tmp}"], "no config.json"),
    (["analyze", "{tmp}"], "no config.json"),
    (["analyze", "{tmp}", "--max-per-domain", "5"], "--max-per-domain must be at least 20"),
    (["analyze", "{tmp}", "--device", "tpu"], "--device 'tpu'"),
])
def test_bad_input_is_one_line(tmp_path, run_cli, args, message):
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert code != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out


def test_corrupt_summary_is_one_line(tmp_path, run_cli):
    (tmp_path / "summary.csv").write_text("setting,row\ntransfer,G->C\n")
    code, _, err = run_cli("compare", tmp_path)
    assert code != 0 and "missing columns" in err and len(err.strip().splitlines()) == 1


def test_summary_written_by_hand_matches_reader(tmp_path):
    """The reader needs only summary.csv's documented columns."""
    from domadapt.analysis.report import compare_report

    rows = [{"setting": "transfer", "row": r, "method": "dann", "norm": n, "n_seeds": 1,
             "mean": 50.0 + i, "std": float("nan")}
            for i, (r, n) in enumerate(itertools.product(["A->B", "Avg"], ["bn", "bin"]))]
    pd.DataFrame(rows).to_csv(tmp_path / "summary.csv", index=False)
    assert compare_report(tmp_path) == [tmp_path / "transfer_table.png"]


def test_compare_follows_the_results_folder_of_the_sweep_record(sweep, tmp_path_factory, run_cli):
    """`domadapt sweep --out S --results R` keeps its tables in R; `compare S` finds them."""
    sweep_dir = tmp_path_factory.mktemp("sweep_out")
    # recorded relative to the sweep directory, so a cloned or moved tree still finds it
    atomic_write_json(sweep_dir / "sweep.json", {"results": os.path.relpath(sweep, sweep_dir)})
    code, out, err = run_cli("compare", sweep_dir)
    assert code == 0, err
    assert (sweep / "transfer_table.png").is_file() and "transfer_table.png" in out
    assert not (sweep_dir / "transfer_table.png").exists()
