"""`domadapt adabn`: a finished run's final AdaBN accuracy re-estimated from its checkpoint, only
after the checkpoint reproduces the recorded target accuracy; every other record kept."""

from __future__ import annotations

import json

import pytest

from domadapt.config import make_config
from domadapt.train import run

TINY = {"iters": 4, "eval_every": 2, "checkpoint_every": 2, "batch_size": 8, "num_workers": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished --adabn run: (its directory, metrics.json text, log.csv text)."""
    path = tmp_path_factory.mktemp("adabn") / "r"
    run(make_config("styledigits", source="gray", target="color", norm="bin", adabn=True,
                    **TINY), path, device="cpu", quiet=True)
    return path, (path / "metrics.json").read_text(), (path / "log.csv").read_text()


def _copy(trained, tmp_path):
    import shutil

    path = tmp_path / "r"
    shutil.copytree(trained[0], path)
    return path


def _stale(path, value):
    """The run as if its AdaBN estimate had been made by other code: `value` in metrics.json
    and in log.csv's last row."""
    metrics = json.loads((path / "metrics.json").read_text())
    (path / "metrics.json").write_text(json.dumps(metrics | {"target_acc_adabn": value}))
    lines = (path / "log.csv").read_text().splitlines()
    column = lines[0].split(",").index("target_acc_adabn")
    last = lines[-1].split(",")
    last[column] = str(value)
    (path / "log.csv").write_text("\n".join([*lines[:-1], ",".join(last)]) + "\n")
    return metrics["target_acc_adabn"]


def test_a_stale_estimate_is_replaced_and_the_change_recorded(run_cli, trained, tmp_path):
    path = _copy(trained, tmp_path)
    config_before = json.loads((path / "config.json").read_text())
    fresh = _stale(path, 0.123)
    code, out, _ = run_cli("adabn", path, "--device", "cpu", "--quiet")
    assert code == 0 and f"0.123 -> {fresh!r}" in out
    # the same code recomputes the value the run logged: metrics and log as trained, exactly
    assert (path / "metrics.json").read_text() == trained[1]
    assert (path / "log.csv").read_text() == trained[2]
    config = json.loads((path / "config.json").read_text())
    (event,) = config.pop("reevaluations")
    assert event["changed"] == {"target_acc_adabn": {"before": 0.123, "after": fresh}}
    assert {"time", "host", "cpu", "threads", "code", "command"} <= set(event)
    assert config == config_before  # what the first start recorded stays


def test_a_checkpoint_that_does_not_reproduce_the_record_changes_nothing(run_cli, trained,
                                                                         tmp_path):
    path = _copy(trained, tmp_path)
    metrics = json.loads(trained[1])
    tampered = json.dumps(metrics | {"target_acc": metrics["target_acc"] + 0.25})
    (path / "metrics.json").write_text(tampered)
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    code, _, err = run_cli("adabn", path, "--device", "cpu", "--quiet")
    assert code != 0 and "nothing was changed" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == files


def test_a_sweep_directory_reestimates_its_finished_adabn_runs(run_cli, trained, tmp_path):
    path = _copy(trained, tmp_path / "sweep" / "runs")
    _stale(path, 0.5)
    code, out, _ = run_cli("adabn", tmp_path / "sweep", "--device", "cpu", "--quiet")
    assert code == 0 and out.count("target_acc_adabn 0.5 -> ") == 1
    assert (path / "metrics.json").read_text() == trained[1]


def test_runs_without_adabn_or_unfinished_are_refused_in_one_line(run_cli, tmp_path):
    path = tmp_path / "plain"
    run(make_config("styledigits", source="gray", target="color", **TINY), path, device="cpu",
        quiet=True)
    code, _, err = run_cli("adabn", path, "--device", "cpu")
    assert code != 0 and "trained without --adabn" in err
    (path / "metrics.json").unlink()
    code, _, err = run_cli("adabn", path, "--device", "cpu")
    assert code != 0 and "not a finished run" in err
    code, _, err = run_cli("adabn", tmp_path / "nowhere", "--device", "cpu")
    assert code != 0 and "neither a run directory nor a sweep" in err
