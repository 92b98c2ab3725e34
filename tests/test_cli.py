"""The entry point: every usage mistake ends in one line and a non-zero exit."""

import pytest


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["trian"], "No such command 'trian'"),
        (["train", "--iters", "abc", "--out", "x"], "'--iters'"),
        (["train", "--out"], "'--out' requires an argument"),
        (["sweep", "--dataset", "styledigits", "--norms", "no-such-norm", "--out", "x"],
         "unknown norm 'no-such-norm'"),
    ],
)
def test_usage_errors_are_one_line(run_cli, args, needle):
    code, out, err = run_cli(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in err + out


def test_help_exits_zero(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0 and "train" in out and "sweep" in out
