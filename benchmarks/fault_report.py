"""Fault-injection report: run tests/test_faults.py and count, for each kind of fault, how many
were injected, how many runs recovered (ended with the numbers of the uninterrupted run) and
how many finished results were lost. Writes <out>/faults.md (table + command) and
<out>/faults.png; exits with pytest's status.

    .venv/bin/python benchmarks/fault_report.py            # -> results/faults/

Every count comes from the injections the tests really made (they append one record each to
$DOMADAPT_FAULT_LOG before asserting, so a failed recovery is counted too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from domadapt.io import atomic_write_text
from domadapt.plots import new_figure, save_png

COMMAND = ".venv/bin/python benchmarks/fault_report.py"


def run_injections() -> tuple[list[dict], int, str]:
    """(one record per injection, pytest's exit status, its summary line)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "faults.jsonl"
        env = os.environ | {"DOMADAPT_FAULT_LOG": str(log), "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/test_faults.py"], cwd=REPO, env=env, capture_output=True, text=True,
            check=False)
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    lines = proc.stdout.strip().splitlines()
    return records, proc.returncode, lines[-1].strip("= ") if lines else "no pytest output"


Row = tuple[str, int, int, int | None]  # fault, injected, recovered, results lost


def count(records: list[dict]) -> list[Row]:
    """One Row per kind of fault, in the order the tests met them; lost is None where no
    result had finished before the fault."""
    kinds: dict[str, list] = {}
    for r in records:
        row = kinds.setdefault(r["fault"], [0, 0, None])
        row[0] += 1
        row[1] += bool(r["recovered"])
        if r["lost"] is not None:
            row[2] = (row[2] or 0) + int(r["lost"])
    return [(k, *v) for k, v in kinds.items()]


def markdown(rows: list[Row], summary: str, seconds: float) -> str:
    total = [sum(r[i] or 0 for r in rows) for i in (1, 2, 3)]
    command = (f"Command: `{COMMAND}` (runs `pytest tests/test_faults.py`: {summary}, "
               f"{seconds:.0f} s on {platform.machine()}, Python {platform.python_version()}).")
    meaning = ("A run *recovered* when, re-run after the fault, it ended with metrics identical "
               "to the uninterrupted run's; a result is *lost* when a cell finished before the "
               "fault has no readable, unchanged metrics.json after it (n/a: no result had "
               "finished before the fault; what a single run risks is its progress). For a "
               "hostile input (`input:`) and the other refusals, *recovered* means the command "
               "did what the README promises: one line naming the problem and a non-zero exit "
               "with nothing written, or the right result (a warning, a skipped file).")
    lines = ["# Fault injection", "", command, "", meaning, "",
             "| fault | injected | recovered | results lost |", "|---|---:|---:|---:|"]
    lines += [f"| {f} | {n} | {ok} | {'n/a' if lost is None else lost} |"
              for f, n, ok, lost in rows]
    lines += [f"| **all** | **{total[0]}** | **{total[1]}** | **{total[2]}** |", ""]
    return "\n".join(lines)


def figure(rows: list[Row], path: Path) -> None:
    fig = new_figure(8, 0.45 * len(rows) + 1.2)
    ax = fig.add_subplot()
    y = list(range(len(rows)))[::-1]
    ax.barh([v + 0.2 for v in y], [r[1] for r in rows], height=0.4, color="0.7",
            label="injected")
    ax.barh([v - 0.2 for v in y], [r[2] for r in rows], height=0.4, color="tab:green",
            label="recovered")
    for v, r in zip(y, rows):
        lost = "n/a" if r[3] is None else r[3]
        ax.text(max(r[1], r[2]) + 0.3, v, f"results lost: {lost}", va="center", fontsize=8,
                color="tab:red" if r[3] else "0.3")
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, max(r[1] for r in rows) * 1.25 + 1)
    ax.set_xlabel("faults")
    ax.set_title("Injected faults, recovered runs and lost results", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    save_png(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "faults")
    args = parser.parse_args()
    start = time.perf_counter()
    records, status, summary = run_injections()
    seconds = time.perf_counter() - start
    rows = count(records)
    if not rows:
        print(f"no injections were recorded ({summary})", file=sys.stderr)
        return status or 1
    text = markdown(rows, summary, seconds)
    atomic_write_text(args.out / "faults.md", text)
    figure(rows, args.out / "faults.png")
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
