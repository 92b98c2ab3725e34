"""Tables from run directories: known numbers in, exact cells out; partial sweeps; the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from domadapt.config import RunConfig, make_config
from domadapt.io import atomic_write_json, read_json
from domadapt.tables import Layout, markdown_table, write_tables

LAYOUT = Layout(
    dataset="toy",
    domains=("Alpha", "Beta", "Gamma"),
    short_names={"Alpha": "Al", "Beta": "Be", "Gamma": "Ga"},
    tasks=(("Alpha", "Beta"), ("Beta", "Alpha")),
    methods=("source-only", "dann"),
    norms=("bn", "bin"),
    multidomain=True,
)


def write_run(sweep_dir: Path, cfg: RunConfig, metrics: dict) -> Path:
    """A finished run dir the way train.run leaves it (config.json, then metrics.json)."""
    run_dir = sweep_dir / "runs" / f"{cfg.name()}-{cfg.key()}"
    atomic_write_json(run_dir / "config.json", {"config": cfg.to_dict(), "key": cfg.key(),
                                                "name": cfg.name()})
    atomic_write_json(run_dir / "metrics.json", {"mean_gate": None, "wall_seconds": 1.0,
                                                 "iters": cfg.iters, **metrics})
    return run_dir


def transfer(source: str, target: str, method: str, norm: str, seed: int, **kw) -> RunConfig:
    return make_config(dataset=kw.pop("dataset", "toy"), setting="transfer", source=source,
                       target=target, method=method, norm=norm, seed=seed, iters=10, **kw)


def multi(norm: str, seed: int) -> RunConfig:
    return make_config(dataset="toy", setting="multidomain", method="source-only", norm=norm,
                       seed=seed, iters=10)


def write_record(sweep_dir: Path, run_dirs: list[Path], layout: Layout = LAYOUT) -> None:
    atomic_write_json(sweep_dir / "sweep.json", {
        "command": "domadapt sweep --dataset toy --out x", "layout": layout.to_dict(),
        "multidomain": layout.multidomain,
        "runs": [str(d.relative_to(sweep_dir)) for d in run_dirs],
    })


# target accuracy of each transfer cell, per seed (fractions, as metrics.json stores them)
ACC = {
    ("Alpha", "Beta", "source-only", "bn"): (0.50, 0.52),
    ("Alpha", "Beta", "source-only", "bin"): (0.55, 0.57),
    ("Alpha", "Beta", "dann", "bn"): (0.60, 0.64),
    ("Alpha", "Beta", "dann", "bin"): (0.70, 0.70),
    ("Beta", "Alpha", "source-only", "bn"): (0.40, 0.40),
    ("Beta", "Alpha", "source-only", "bin"): (0.38, 0.38),
    ("Beta", "Alpha", "dann", "bn"): (0.45, 0.47),
    ("Beta", "Alpha", "dann", "bin"): (0.45, 0.47),
}
BIN_DOMAINS = {"Alpha": 0.95, "Beta": 0.85, "Gamma": 0.745}
DOMAIN_ACC = {  # per norm, per seed
    "bn": ({"Alpha": 0.9, "Beta": 0.8, "Gamma": 0.7}, {"Alpha": 0.8, "Beta": 0.8, "Gamma": 0.8}),
    "bin": (BIN_DOMAINS, BIN_DOMAINS),
}


@pytest.fixture
def full_sweep(tmp_path: Path) -> Path:
    dirs = []
    for (s, t, m, n), accs in ACC.items():
        for seed, acc in enumerate(accs):
            dirs.append(write_run(tmp_path, transfer(s, t, m, n, seed),
                                  {"target_acc": acc, "gate_frac_below_0.1": 0.0}))
    for n, per_seed in DOMAIN_ACC.items():
        for seed, dom in enumerate(per_seed):
            dirs.append(write_run(tmp_path, multi(n, seed), {
                "target_acc": sum(dom.values()) / 3, "avg_acc": sum(dom.values()) / 3,
                "domain_acc": dom}))
    write_record(tmp_path, dirs)
    return tmp_path


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)


def test_transfer_table_mean_std_diff_and_count(full_sweep: Path) -> None:
    write_tables(full_sweep)
    t = read_table(full_sweep / "transfer_table.csv")
    assert list(t.index) == ["Al->Be", "Be->Al", "Avg", "BIN >= BN"]
    assert list(t.columns) == ["source-only/bn", "source-only/bin", "source-only BIN - BN",
                               "dann/bn", "dann/bin", "dann BIN - BN"]
    assert t.at["Al->Be", "source-only/bn"] == "51.0 ± 1.4"  # std of (50, 52), ddof=1
    assert t.at["Al->Be", "dann/bin"] == "70.0 ± 0.0"
    assert t.at["Al->Be", "dann BIN - BN"] == "+8.0"
    assert t.at["Be->Al", "source-only BIN - BN"] == "-2.0"
    assert t.at["Be->Al", "dann BIN - BN"] == "+0.0"
    # Avg: per seed the mean over tasks, then mean ± std over seeds
    assert t.at["Avg", "dann/bn"] == "54.0 ± 2.1"  # seeds: 52.5, 55.5
    assert t.at["Avg", "source-only BIN - BN"] == "+1.5"
    # beside each count the Wilcoxon test of the tasks' mean differences: source-only
    # (5, -2): W = 1, exact p = 2 * 2/4 = 1; dann (8, 0): the zero dropped, one value left,
    # p = 1 (a tie counts as >=)
    assert t.at["BIN >= BN", "source-only BIN - BN"] == "1/2 (p=1.00, n=2)"
    assert t.at["BIN >= BN", "dann BIN - BN"] == "2/2 (p=1.00, n=2)"
    # comparison.csv keeps the test over tasks x seeds: source-only d = (5, 5, -2, -2), tied
    # |d|: normal approximation, W = 3, z = -2 / sqrt(7.25), p = 0.458
    c = pd.read_csv(full_sweep / "comparison.csv")
    row = c[(c.task == "all") & (c.within == "method=source-only")].iloc[0]
    assert row["n"] == 4 and row["W"] == 3 and row["p_value"] == pytest.approx(0.4576, abs=1e-4)
    assert t.at["BIN >= BN", "dann/bn"] == ""

    summary = pd.read_csv(full_sweep / "summary.csv")
    row = summary[(summary.setting == "transfer") & (summary.row == "Avg")
                  & (summary.method == "dann") & (summary.norm == "bn")].iloc[0]
    assert row.n_seeds == 2 and row["mean"] == pytest.approx(54.0)
    assert row["std"] == pytest.approx(math.sqrt(4.5), abs=1e-4)  # 4 decimals


def test_multidomain_table_rows_are_domains(full_sweep: Path) -> None:
    write_tables(full_sweep)
    t = read_table(full_sweep / "multidomain_table.csv")
    assert list(t.index) == ["Alpha", "Beta", "Gamma", "Avg", "BIN >= BN"]
    assert list(t.columns) == ["bn", "bin", "BIN - BN"]
    assert t.at["Alpha", "bn"] == "85.0 ± 7.1"
    assert t.at["Gamma", "BIN - BN"] == "-0.5"
    assert t.at["Avg", "bn"] == "80.0 ± 0.0"
    assert t.at["Avg", "bin"] == "84.8 ± 0.0"
    # the domains' mean differences (Gamma's -0.5 and two positive ones): W = 1, exact
    # p = 2 * 2/8; over domains x seeds, d = (5, 5, 4.5, 15, 5, -5.5): W = 5, tie-corrected
    # z = -5.5/sqrt(22.25), p = 0.24
    assert t.at["BIN >= BN", "BIN - BN"] == "2/3 (p=0.50, n=3)"
    c = pd.read_csv(full_sweep / "comparison.csv")
    row = c[(c.setting == "multidomain") & (c.task == "all")
            & (c.comparison == "norm bin - bn")].iloc[0]
    assert row["n"] == 6 and row["W"] == 5 and round(row["p_value"], 2) == 0.24
    # Avg: the runs are the units, each run's mean over the domains paired by seed: BIN
    # 254.5 / 3 against BN 80 at both seeds, so n = 2 with a zero-width interval
    avg = c[(c.setting == "multidomain") & (c.task == "Avg")
            & (c.comparison == "norm bin - bn")].iloc[0]
    assert avg["n"] == 2 and avg["mean_diff"] == pytest.approx(254.5 / 3 - 80, abs=1e-4)
    assert avg["ci_low"] == pytest.approx(avg["mean_diff"]) == avg["ci_high"]
    domains = c[(c.setting == "multidomain") & (c.comparison == "norm bin - bn")]["task"]
    assert list(domains) == ["Alpha", "Beta", "Gamma", "Avg", "all", "task means"]


def test_runs_csv_one_row_per_run_in_percent(full_sweep: Path) -> None:
    write_tables(full_sweep)
    runs = pd.read_csv(full_sweep / "runs.csv")
    assert len(runs) == 2 * len(ACC) + 4
    row = runs[(runs.task == "Al->Be") & (runs.method == "dann") & (runs.norm == "bn")
               & (runs.seed == 1)].iloc[0]
    assert row.target_acc == pytest.approx(64.0)
    assert row.source == "Alpha" and row.target == "Beta"
    cfg = transfer("Alpha", "Beta", "dann", "bn", 1)
    assert row.run_key == cfg.key()
    assert row.run_dir == f"runs/{cfg.name()}-{cfg.key()}"
    assert (runs.setting == "multidomain").sum() == 4


def test_partial_sweep_leaves_cells_empty(tmp_path: Path) -> None:
    """Missing cells are empty; Avg only over seeds that finished every task; one seed: mean."""
    done = [
        write_run(tmp_path, transfer("Alpha", "Beta", "dann", "bn", 0), {"target_acc": 0.6}),
        write_run(tmp_path, transfer("Beta", "Alpha", "dann", "bn", 0), {"target_acc": 0.4}),
        write_run(tmp_path, transfer("Alpha", "Beta", "dann", "bn", 1), {"target_acc": 0.8}),
        write_run(tmp_path, transfer("Alpha", "Beta", "dann", "bin", 0), {"target_acc": 0.7}),
    ]
    pending = tmp_path / "runs" / "unfinished"
    atomic_write_json(pending / "config.json", {"config": {}})  # started, no metrics.json
    write_record(tmp_path, [*done, pending])
    write_tables(tmp_path, tmp_path / "out")
    t = read_table(tmp_path / "out" / "transfer_table.csv")
    assert t.at["Al->Be", "dann/bn"] == "70.0 ± 14.1"
    assert t.at["Be->Al", "dann/bn"] == "40.0"  # one seed: the mean alone
    assert t.at["Avg", "dann/bn"] == "50.0"  # seed 1 lacks Be->Al: only seed 0 counts
    assert t.at["Be->Al", "dann/bin"] == "" and t.at["Avg", "dann/bin"] == ""
    assert t.at["Al->Be", "dann BIN - BN"] == "+0.0"
    assert t.at["BIN >= BN", "dann BIN - BN"] == "1/1 (p=1.00, n=1)"
    assert set(t["source-only/bn"]) == {""}
    m = read_table(tmp_path / "out" / "multidomain_table.csv")
    assert set(m["bn"]) == {""}  # in the grid, nothing finished
    assert len(pd.read_csv(tmp_path / "out" / "runs.csv")) == 4
    assert not (tmp_path / "transfer_table.csv").exists()  # --out respected


def test_markdown_rendering(full_sweep: Path) -> None:
    write_tables(full_sweep)
    md = (full_sweep / "transfer_table.md").read_text()
    assert md.startswith("# Transfer accuracy (%) on toy\n")
    assert "domadapt sweep --dataset toy --out x" in md
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 4  # header, rule, 2 tasks, Avg, count
    assert len({len(line) for line in lines}) == 1  # aligned columns
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "Al->Be" and cells[1] == "51.0 ± 1.4"
    assert lines[1].startswith("| :-") and lines[1].endswith(": |")


def test_markdown_table_empty_cells() -> None:
    df = pd.DataFrame({"a": ["1.0", ""], "b": [None, "x"]}, index=pd.Index(["r1", "r2"], name="k"))
    assert markdown_table(df).splitlines() == [
        "| k   |   a |   b |", "| :-- | --: | --: |", "| r1  | 1.0 |     |", "| r2  |     |   x |"]


def test_without_record_layout_from_runs_and_registry(tmp_path: Path) -> None:
    """No sweep.json: every run dir counts; a known dataset gives short names and order."""
    for source, target, acc in [("sketch", "photo", 0.5), ("art_painting", "cartoon", 0.25)]:
        write_run(tmp_path, transfer(source, target, "dann", "bin", 0, dataset="pacs"),
                  {"target_acc": acc})
    write_tables(tmp_path)
    t = read_table(tmp_path / "transfer_table.csv")
    assert list(t.index) == ["A->C", "S->P", "Avg"]  # canonical order, no BN: no count row
    assert list(t.columns) == ["dann/bin"]
    assert t.at["Avg", "dann/bin"] == "37.5"
    assert not (tmp_path / "multidomain_table.csv").exists()


def test_runs_differing_beyond_seed_are_refused(tmp_path: Path, run_cli) -> None:
    write_run(tmp_path, transfer("Alpha", "Beta", "dann", "bn", 0), {"target_acc": 0.5})
    write_run(tmp_path, transfer("Alpha", "Beta", "dann", "bn", 0, lr=0.1), {"target_acc": 0.6})
    code, _, err = run_cli("tables", tmp_path)
    assert code != 0 and "Traceback" not in err
    assert err.count("\n") == 1 and "differ in lr" in err


def test_tables_cli(full_sweep: Path, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "results"
    code, stdout, err = run_cli("tables", full_sweep, "--out", out)
    assert code == 0, err
    names = {Path(p).name for p in stdout.split()}
    assert names == {"runs.csv", "summary.csv", "transfer_table.csv", "transfer_table.md",
                     "multidomain_table.csv", "multidomain_table.md", "comparison.csv",
                     "comparison.md", "selection_table.csv", "selection_table.md",
                     "stability.csv", "stability.md", "trajectory.csv", "trajectory.md"}
    assert all((out / n).is_file() for n in names)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("make", ["missing", "corrupt"])
def test_tables_cli_bad_input(tmp_path: Path, run_cli, make: str) -> None:
    target = tmp_path / "nowhere"
    if make == "corrupt":
        target = tmp_path
        run_dir = write_run(tmp_path, transfer("Alpha", "Beta", "dann", "bn", 0),
                            {"target_acc": 0.5})
        (run_dir / "metrics.json").write_text("{not json")
    code, _, err = run_cli("tables", target)
    assert code != 0 and "Traceback" not in err and err.count("\n") == 1
    assert str(target if make == "missing" else run_dir / "metrics.json") in err


def _stamp(run_dir: Path, capability: str, commit: str = "a" * 40, host: str = "h1") -> None:
    """Give a run the provenance records train.run writes (runtime and provenance.code)."""
    path = run_dir / "config.json"
    info = read_json(path)
    info["runtime"] = {"cpu": "Some CPU", "cpu_capability": capability, "host": host}
    info["provenance"] = {"code": {"commit": commit, "dirty": False, "version": "0.1.0"}}
    atomic_write_json(path, info)


def test_comparisons_count_and_name_pairs_from_two_cpu_kernel_sets(full_sweep: Path) -> None:
    """runs.csv carries code version and CPU kernel set; a comparison whose paired runs differ
    in kernel set (or code version, or host) says how many and which in its notes."""
    runs = sorted((full_sweep / "runs").iterdir())
    for run_dir in runs:
        _stamp(run_dir, "AVX512")
    write_tables(full_sweep)
    note = (full_sweep / "comparison.md").read_text()
    assert "Provenance: 0 of 6 (task, seed) groups pair runs that differ" in note
    frame = pd.read_csv(full_sweep / "runs.csv")
    assert set(frame.cpu_capability) == {"AVX512"} and set(frame.code) == {"a" * 12}
    # one BIN run of Al->Be seed 1 ran on an AVX2 machine, one of Be->Al seed 0 on other code
    moved = next(d for d in runs if d.name.startswith("Alpha-Beta_dann_bin_s1"))
    _stamp(moved, "AVX2")
    other = next(d for d in runs if d.name.startswith("Beta-Alpha_source-only_bn_s0"))
    _stamp(other, "AVX512", commit="b" * 40)
    write_tables(full_sweep)
    for name in ("comparison.md", "transfer_table.md"):
        text = (full_sweep / name).read_text()
        assert "2 of 6 (task, seed) groups pair runs that differ" in text
        assert "Al->Be s1 (CPU kernel set AVX2 / AVX512)" in text
        assert f"Be->Al s0 (code version {'a' * 12} / {'b' * 12})" in text
    frame = pd.read_csv(full_sweep / "runs.csv").set_index("run_dir")
    assert frame.at[f"runs/{moved.name}", "cpu_capability"] == "AVX2"
