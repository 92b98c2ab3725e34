"""`domadapt sweep` end to end: real training (train.run) on styledigits, tiny and fast."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

TINY = ["--iters", "2", "--eval-every", "2", "--checkpoint-every", "2", "--batch-size", "8",
        "--image-size", "16", "--resize-size", "18", "--device", "cpu"]


def test_sweep_trains_every_cell_writes_tables_and_resumes(run_cli, tmp_path: Path) -> None:
    out, results = tmp_path / "sweep", tmp_path / "results"
    args = ["sweep", "--dataset", "styledigits", "--preset", "styledigits", "--tasks", "G:C",
            "--methods", "source-only,dann", "--norms", "bn,bin", "--seeds", "0",
            "--multidomain", "--out", out, "--results", results, *TINY]
    code, stdout, err = run_cli(*args, "--workers", "2")
    assert code == 0, err
    assert "6 cells: 6 ran, 0 were done" in stdout

    runs = pd.read_csv(results / "runs.csv")
    assert len(runs) == 6 and runs.run_key.is_unique
    assert runs.target_acc.between(0, 100).all() and (runs.iters == 2).all()
    assert set(runs.task) == {"G->C", "multidomain"}
    for run_dir in runs.run_dir:
        files = {p.name for p in (out / run_dir).iterdir()}
        assert {"config.json", "metrics.json", "log.csv", ".lock"} <= files
        key = json.loads((out / run_dir / "config.json").read_text())["key"]
        assert run_dir.endswith(f"-{key}")  # the run key train.run computed names the dir
    transfer = pd.read_csv(results / "transfer_table.csv", index_col=0, keep_default_na=False)
    assert list(transfer.index) == ["G->C", "Avg", "BIN >= BN"]
    assert (transfer.loc[["G->C", "Avg"]] != "").all().all()
    multi = pd.read_csv(results / "multidomain_table.csv", index_col=0, keep_default_na=False)
    assert list(multi.index) == ["gray", "color", "texture", "sketch", "Avg", "BIN >= BN"]
    assert (multi.loc[["gray", "Avg"], ["bn", "bin"]] != "").all().all()
    # the BIN runs' gates.csv, pooled per setting/method/norm and layer
    gates = pd.read_csv(results / "gates_by_layer.csv")
    assert set(zip(gates.setting, gates.method, gates.norm)) == {
        ("transfer", "source-only", "bin"), ("transfer", "dann", "bin"),
        ("multidomain", "source-only", "bin")}
    layers = pd.read_csv(out / runs[runs.norm == "bin"].run_dir.iloc[0] / "gates.csv")
    assert (gates.groupby(["setting", "method"]).size() == len(layers)).all()
    assert (gates.n_runs == 1).all() and gates["mean"].between(0, 1).all()
    hist = gates.filter(like="hist_").sum(axis=1)
    assert (hist == gates.channels).all()  # one run per row: every channel in one bin
    record = json.loads((out / "sweep.json").read_text())
    assert record["command"].startswith("domadapt sweep --dataset styledigits --out ")
    assert "--multidomain" in record["command"] and "--workers" in record["command"]
    assert record["command"] in (results / "transfer_table.md").read_text()

    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    code, stdout, err = run_cli(*args, "--quiet")
    assert code == 0, err
    assert stdout == ""
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")} == before

    code, _, err = run_cli("tables", out, "--out", tmp_path / "again")
    assert code == 0, err
    for name in ("runs.csv", "summary.csv", "transfer_table.csv", "multidomain_table.md",
                 "gates_by_layer.csv"):
        assert (tmp_path / "again" / name).read_text() == (results / name).read_text()

    code, stdout, err = run_cli("compare", results)
    assert code == 0, err
    assert (results / "gates.png").stat().st_size > 0 and "gates.png" in stdout
