"""`domadapt evidence`: the pre-registered primary comparison and the Holm-corrected family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_tables import transfer, write_record, write_run

from domadapt.analysis.evidence import evidence_frame
from domadapt.stats import holm, t_interval, wilcoxon_signed_rank

# (task, seed) -> (BN, BIN) target accuracy at iterations 5 and 10 (the last)
ACC = {
    (("Alpha", "Beta"), 0): ((0.50, 0.60), (0.56, 0.66)),
    (("Alpha", "Beta"), 1): ((0.52, 0.62), (0.55, 0.65)),
    (("Beta", "Alpha"), 0): ((0.40, 0.41), (0.43, 0.44)),
    (("Beta", "Alpha"), 1): ((0.42, 0.45), (0.44, 0.46)),
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    dirs = []
    for ((source, target), seed), (bn, bin_) in ACC.items():
        for norm, accs in (("bn", bn), ("bin", bin_)):
            cfg = transfer(source, target, "dann", norm, seed, adabn=True)
            run_dir = write_run(tmp_path, cfg, {"target_acc": accs[1],
                                                "target_acc_adabn": accs[1] + 0.01})
            pd.DataFrame({"iter": [5, 10], "target_acc": accs,
                          "target_acc_adabn": [a + 0.01 for a in accs]}).to_csv(
                run_dir / "log.csv", index=False)
            if norm == "bin":  # a knockout record: gates=1 costs 5 points, restat 2
                (run_dir / "gate_knockout.json").write_text(json.dumps({
                    "iters": 10, "trained": {target: accs[1]},
                    "gates_one": {target: accs[1] - 0.05},
                    "gates_one_restat": {target: accs[1] - 0.02}}))
            dirs.append(run_dir)
    write_record(tmp_path, dirs)
    return tmp_path


def test_primary_is_the_task_means_of_the_last_evaluation(sweep: Path) -> None:
    frame = evidence_frame(sweep).set_index("comparison")
    primary = frame.loc["BIN - BN, last evaluation"]
    # task means of BIN - BN at iteration 10, in points: Al->Be (6 + 3) / 2, Be->Al (3 + 1) / 2
    d = np.array([4.5, 2.0])
    assert primary["family"] == "primary" and primary["n_tasks"] == 2 and primary["n_pairs"] == 4
    assert primary["mean_diff"] == pytest.approx(d.mean())
    assert (primary["ci_low"], primary["ci_high"]) == pytest.approx(t_interval(d))
    assert primary["p_value"] == pytest.approx(wilcoxon_signed_rank(d)["p_value"])
    assert primary["verdict"] == "not shown"  # n = 2: p = 0.5 whatever the sign
    early = frame.loc["BIN - BN, iteration 5"]
    assert early["mean_diff"] == pytest.approx(np.mean([(6.0 + 3.0) / 2, (3.0 + 2.0) / 2]))


def test_secondary_family_is_holm_corrected_and_labelled(sweep: Path) -> None:
    frame = evidence_frame(sweep)
    secondary = frame[frame.family == "secondary"]
    tested = secondary.dropna(subset=["p_value"])
    assert tested["p_holm"].tolist() == pytest.approx(holm(tested["p_value"].tolist()))
    rows = frame.set_index("comparison")
    assert rows.at["BIN - BIN gates=1", "mean_diff"] == pytest.approx(5.0)
    assert rows.at["BIN - BIN gates=1 restat", "mean_diff"] == pytest.approx(2.0)
    assert rows.at["BIN+AdaBN - BN+AdaBN", "mean_diff"] == pytest.approx(
        rows.at["BIN - BN, last evaluation", "mean_diff"])
    assert rows.at["BIN - BN+AdaBN", "mean_diff"] == pytest.approx(
        rows.at["BIN - BN, last evaluation", "mean_diff"] - 1.0)
    # each domain left out: here every task involves Alpha and Beta, so those rows are empty
    assert rows.at["BIN - BN, last evaluation, without Ga", "n_tasks"] == 2
    assert rows.at["BIN - BN, last evaluation, without Al", "verdict"] == "no records"
    # the label-free rules need validator columns these runs did not log: listed, not dropped
    assert rows.at["BIN - BN, selected by entropy", "verdict"] == "no records"
    oracle = frame[frame.family.str.startswith("oracle")]
    assert len(oracle) == 1 and oracle.verdict.iloc[0] == "not tested (oracle)"
    assert oracle.p_holm.isna().all()


def test_evidence_cli_writes_csv_and_markdown(sweep: Path, run_cli) -> None:
    code, _, err = run_cli("evidence", sweep)
    assert code == 0, err
    md = (sweep / "evidence.md").read_text()
    assert "Primary comparison" in md and "one Holm family" in md
    assert len(pd.read_csv(sweep / "evidence.csv")) == len(evidence_frame(sweep))
    code, _, err = run_cli("evidence", sweep, "--baseline", "in")
    assert code != 0 and err.strip().count("\n") == 0


def test_trajectory_rows_carry_their_iteration(sweep: Path) -> None:
    frame = evidence_frame(sweep).set_index("comparison")
    assert frame.at["BIN - BN, last evaluation", "iteration"] == 10
    assert frame.at["BIN - BN, iteration 5", "iteration"] == 5
    assert pd.isna(frame.at["BIN - BN+AdaBN", "iteration"])


def test_evidence_figure_with_gates_beside_another_sweep(sweep: Path, tmp_path: Path,
                                                         run_cli) -> None:
    pytest.importorskip("matplotlib")
    beside = tmp_path / "scratch"
    beside.mkdir()
    hist = {f"hist_{k / 10:.1f}_{(k + 1) / 10:.1f}": [1, 0] for k in range(10)}
    pd.DataFrame({"setting": "transfer", "method": "dann", "norm": "bin", "depth": [0, 1],
                  "layer": ["a", "b"], "n_runs": 3, "channels": 4, "mean": [0.2, 0.9],
                  "min": [0.0, 0.5], **hist}).to_csv(beside / "gates_by_layer.csv", index=False)
    code, out, err = run_cli("evidence", sweep, "--gates-beside", beside)
    assert code == 0, err
    png = (sweep / "evidence.png").read_bytes()
    assert png.startswith(b"\x89PNG") and "evidence.png" in out
    md = (sweep / "evidence.md").read_text()
    assert "--gates-beside" in md  # the command, as run
    assert "Gates at the last iteration" in md and "scratch: dann bin (3 runs)" in md
    assert "Plateau check" in md
    code, _, err = run_cli("evidence", sweep, "--gates-beside", tmp_path / "nowhere")
    assert code == 1 and "gates_by_layer.csv: not found" in err and err.count("\n") == 1


def test_plateau_check_reports_each_arm_at_its_last_two_evaluations(sweep: Path) -> None:
    from domadapt.analysis.evidence import plateau_frame
    from domadapt.tables import load_sweep

    runs = load_sweep(sweep)[1]
    frame = plateau_frame(runs, method="dann", norms=("bn", "bin")).set_index("norm")
    # BN: 50/52/40/42 at iteration 5, 60/62/41/45 at 10 (changes 10, 10, 1, 3)
    assert frame.at["BN", "runs"] == 4 and frame.at["BN", "iterations"] == "5 -> 10"
    assert frame.at["BN", "before"] == pytest.approx(46.0)
    assert frame.at["BN", "last"] == pytest.approx(52.0)
    assert frame.at["BN", "mean change"] == pytest.approx(6.0)
    # BIN: 56/55/43/44 -> 66/65/44/46 (changes 10, 10, 1, 2)
    assert frame.at["BIN", "mean abs change"] == pytest.approx(5.75)


def test_gate_summary_counts_values_from_the_layer_histograms() -> None:
    from domadapt.analysis.evidence import gate_summary

    hist = {f"hist_{k / 10:.1f}_{(k + 1) / 10:.1f}": [0, 0] for k in range(10)}
    hist["hist_0.0_0.1"] = [3, 0]   # first layer: 3 gates below 0.1, 1 in the middle
    hist["hist_0.5_0.6"] = [1, 0]
    hist["hist_0.9_1.0"] = [0, 4]   # last layer: all 4 above 0.9
    g = pd.DataFrame({"depth": [1, 0], "mean": [0.95, 0.1], "group": "x", **{
        k: v[::-1] for k, v in hist.items()}})  # rows out of depth order on purpose
    row = gate_summary([g]).iloc[0]
    assert row["values"] == 8 and row["layers"] == 2
    assert row["first layer"] == pytest.approx(0.1) and row["last layer"] == pytest.approx(0.95)
    assert row["mean"] == pytest.approx((0.1 * 4 + 0.95 * 4) / 8)
    assert row["share < 0.1"] == pytest.approx(3 / 8) and row["share > 0.9"] == pytest.approx(0.5)


def test_an_unfinished_grid_marks_its_verdicts_interim(sweep: Path, run_cli) -> None:
    code, _, err = run_cli("evidence", sweep)
    assert code == 0, err
    assert "Interim" not in (sweep / "evidence.md").read_text()
    record = json.loads((sweep / "sweep.json").read_text())
    record["runs"].append("runs/not-started-yet")  # planned, no record yet
    (sweep / "sweep.json").write_text(json.dumps(record))
    code, _, err = run_cli("evidence", sweep)
    assert code == 0, err
    assert "Interim: 8 of the 9 runs this sweep plans have finished" in (
        sweep / "evidence.md").read_text()
    verdicts = pd.read_csv(sweep / "evidence.csv")["verdict"]
    assert verdicts.str.startswith("interim (").all()
