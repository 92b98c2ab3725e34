"""`domadapt gate-knockout`: BIN runs scored with their gates as trained and with every gate
set to 1, beside the BN run of the same cell; records, summary and its paired comparisons."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from domadapt.analysis.knockout import (
    RECORD,
    restat_on_source,
    restat_on_training_mix,
    set_gates,
)
from domadapt.analysis.report import analysis_sets
from domadapt.evaluation import accuracy, predict
from domadapt.nn import BatchInstanceNorm2d
from domadapt.norms import convert_norm
from domadapt.train import load_trained

TINY = ["--iters", "4", "--eval-every", "4", "--checkpoint-every", "4", "--batch-size", "8",
        "--image-size", "16", "--resize-size", "18", "--device", "cpu", "--quiet"]


def test_all_gates_one_is_the_bn_network() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), BatchInstanceNorm2d(6), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 4, 3), BatchInstanceNorm2d(4))
    x = torch.randn(8, 3, 10, 10)
    net.train()(x)  # running statistics away from their initial values
    for m in net.modules():
        if isinstance(m, BatchInstanceNorm2d):
            m.rho.data.uniform_(0, 1)
    net.eval()
    bn = convert_norm(copy.deepcopy(net), "bn").eval()
    assert not torch.allclose(net(x), bn(x), atol=1e-3)  # the gates matter before...
    assert set_gates(net, 1.0) == 2
    torch.testing.assert_close(net(x), bn(x))  # ...and gates = 1 leaves the BN network


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two seeds of G:C under source-only and DANN with BN and BIN, and a multi-domain pair."""
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path_factory.mktemp("knockout") / "sweep"
    result = CliRunner().invoke(app, [
        "sweep", "--dataset", "styledigits", "--preset", "styledigits", "--tasks", "G:C",
        "--methods", "source-only,dann", "--norms", "bn,bin", "--seeds", "0,1", "--multidomain",
        "--lr", "0.05", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    return out


def _bin_runs(sweep: Path) -> list[Path]:
    runs = pd.read_csv(sweep / "runs.csv")
    return [sweep / d for d in runs[runs.norm == "bin"].run_dir]


def test_knockout_scores_each_bin_run_both_ways(sweep, run_cli) -> None:
    code, stdout, err = run_cli("gate-knockout", sweep, "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "gate_knockout.csv" in stdout and "gate_knockout.md" in stdout
    runs = pd.read_csv(sweep / "runs.csv")
    frame = pd.read_csv(sweep / "gate_knockout.csv")
    assert len(frame) == (runs.norm == "bin").sum() == 6
    for run_dir in _bin_runs(sweep):
        record = json.loads((run_dir / RECORD).read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        cfg, model = load_trained(run_dir)
        # the trained score is the run's own last evaluation, re-measured from its checkpoint
        expected = metrics.get("domain_acc") or {cfg.target: metrics["target_acc"]}
        assert record["trained"] == pytest.approx(expected, abs=1e-6)
        sets, scored, _ = analysis_sets(cfg)
        convert_norm(model, "bn")  # the BN network with the BIN run's weights
        for domain in scored:
            preds, labels = predict(model, sets[domain], batch_size=16, num_workers=0,
                                    device=torch.device("cpu"))
            assert record["gates_one"][domain] == pytest.approx(accuracy(preds, labels))
    # BN column: the paired BN run's last accuracy (multi-domain: the domains' mean)
    bn = runs[runs.norm == "bn"].set_index(["task", "method", "seed"])
    for r in frame[frame.setting == "transfer"].itertuples():
        assert r.acc_bn == pytest.approx(bn.loc[(r.task, r.method, r.seed), "target_acc"],
                                         abs=1e-3)
    multi = frame[frame.setting == "multidomain"]
    assert list(multi.task) == ["Avg", "Avg"]
    assert multi.acc_bn.notna().all()
    md = (sweep / "gate_knockout.md").read_text()
    for label in ("variant BIN - BIN gates=1 (method=dann)", "variant BIN gates=1 - BN",
                  "variant BIN - BIN gates=1 restat (method=dann)",
                  "variant BIN gates=1 restat - BN", "task means", "domadapt gate-knockout"):
        assert label in md
    assert frame.acc_gates_one_restat.notna().all()
    # the training-mix variant: only where training normalised source + target batches
    mix = frame.acc_gates_one_restat_train.notna()
    assert list(mix) == list((frame.setting == "transfer") & (frame.method == "dann"))
    assert "variant BIN - BIN gates=1 restat train (method=dann)" in md


def test_restat_knockout_restores_a_converted_bn_network(sweep) -> None:
    """A BN network converted to BIN (every gate 1 from the start) whose running statistics
    were then disturbed: the re-estimated knockout gives back the BN network with statistics
    re-estimated on the same source images (to float rounding); the as-is knockout does not."""
    runs = pd.read_csv(sweep / "runs.csv")
    run_dir = sweep / runs[(runs.norm == "bn") & (runs.setting == "transfer")].run_dir.iloc[0]
    cfg, bn_model = load_trained(run_dir)
    converted = convert_norm(copy.deepcopy(bn_model), "bin")
    assert all(float(m.rho.detach().min()) == 1.0 for m in converted.modules()
               if isinstance(m, BatchInstanceNorm2d))
    torch.manual_seed(0)
    converted.train()(torch.randn(8, 3, 16, 16) * 3 + 1)  # running statistics moved away
    converted.eval()
    reference = restat_on_source(bn_model, cfg)
    knocked = restat_on_source(converted, cfg)
    sets, (target,), _ = analysis_sets(cfg)
    x = torch.stack([sets[target][i][0] for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(knocked(x), reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(converted(x)[0], reference(x)[0], rtol=1e-3, atol=1e-3)


def test_training_mix_reads_source_and_target_halves(sweep, monkeypatch) -> None:
    """The training-mix re-estimate sees batches [x_s; x_t] of batch_size images a side, as
    DANN's forward does, until the larger domain is read once (the smaller one again from
    its start), every image of both with the eval transform."""
    from domadapt.data import DomainDataset
    from domadapt.nn import adabn
    from domadapt.settings import build_data

    runs = pd.read_csv(sweep / "runs.csv")
    run_dir = sweep / runs[(runs.norm == "bin") & (runs.method == "dann")].run_dir.iloc[0]
    cfg, model = load_trained(run_dir)
    cfg = cfg.replace(source_val_fraction=0.1)  # domains of unequal size (styledigits' are equal)
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(adabn, "adapt_batch_stats", lambda m, batches: seen.extend(batches))
    restat_on_training_mix(model, cfg)
    data = build_data(cfg)
    transform = data.evals["target"].transform
    halves = {}
    for name in ("source", "target"):
        images = DomainDataset(data.train[name].items, transform)
        halves[name] = torch.stack([images[i][0] for i in range(len(images))]).flatten(1)
    b, sizes = cfg.batch_size, {k: len(v) for k, v in halves.items()}
    assert sizes["source"] != sizes["target"]
    assert len(seen) == -(-max(sizes.values()) // b)
    assert all(len(batch) == 2 * b for batch in seen)
    for name, part in (("source", slice(None, b)), ("target", slice(b, None))):
        got = torch.cat([batch[part] for batch in seen]).flatten(1)
        images = halves[name]
        match = torch.cdist(got, images).argmin(1)
        torch.testing.assert_close(got, images[match])  # each row one of the domain's images
        assert set(match.tolist()) == set(range(sizes[name]))  # every image read
        if sizes[name] == max(sizes.values()):  # the larger domain once, then from its start
            assert match[:sizes[name]].unique().numel() == sizes[name]


def test_a_record_gains_missing_variants_and_keeps_the_others(sweep, run_cli) -> None:
    runs = pd.read_csv(sweep / "runs.csv")
    run_dir = sweep / runs[(runs.norm == "bin") & (runs.method == "dann")].run_dir.iloc[0]
    code, _, err = run_cli("gate-knockout", sweep, "--quiet")
    assert code == 0, err
    record = json.loads((run_dir / RECORD).read_text())
    cfg, model = load_trained(run_dir)
    set_gates(model, 1.0)
    knocked = restat_on_training_mix(model, cfg)
    sets, (target,), _ = analysis_sets(cfg)
    preds, labels = predict(knocked, sets[target], batch_size=2 * cfg.batch_size, num_workers=0,
                            device=torch.device("cpu"))
    assert record["gates_one_restat_train"][target] == pytest.approx(accuracy(preds, labels))
    # an older record (no training-mix variant, a marked trained score): only the missing
    # variant is evaluated, what the record holds is kept
    old = {k: v for k, v in record.items() if k != "gates_one_restat_train"}
    old["trained"] = {target: 0.125}
    (run_dir / RECORD).write_text(json.dumps(old))
    code, _, err = run_cli("gate-knockout", sweep, "--quiet")
    assert code == 0, err
    again = json.loads((run_dir / RECORD).read_text())
    assert again == old | {"gates_one_restat_train": record["gates_one_restat_train"]}
    (run_dir / RECORD).write_text(json.dumps(record))


def test_summary_is_rebuilt_from_records_without_checkpoints(sweep, run_cli) -> None:
    code, _, err = run_cli("gate-knockout", sweep, "--quiet")
    assert code == 0, err
    before = (sweep / "gate_knockout.csv").read_text()
    runs = _bin_runs(sweep)
    for run_dir in runs:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    code, _, err = run_cli("gate-knockout", sweep, "--quiet")
    assert code == 0, err
    assert (sweep / "gate_knockout.csv").read_text() == before
    (runs[0] / RECORD).unlink()  # neither a record nor a checkpoint: left out, and said so
    code, _, err = run_cli("gate-knockout", sweep, "--quiet")
    assert code == 0, err
    assert len(pd.read_csv(sweep / "gate_knockout.csv")) == len(runs) - 1
    assert "1 BIN run(s) have neither a record nor a checkpoint" in (
        sweep / "gate_knockout.md").read_text()


def test_a_sweep_without_bin_runs_is_one_line(run_cli, tmp_path) -> None:
    code, _, err = run_cli("sweep", "--dataset", "styledigits", "--preset", "styledigits",
                           "--tasks", "G:C", "--methods", "source-only", "--norms", "bn",
                           "--seeds", "0", "--out", tmp_path / "s", *TINY)
    assert code == 0, err
    code, _, err = run_cli("gate-knockout", tmp_path / "s")
    assert code != 0
    assert err.strip().count("\n") == 0 and "no finished BIN runs" in err
