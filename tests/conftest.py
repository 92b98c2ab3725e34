"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PACS_ROOT = SHARED / "data" / "pacs"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Generated datasets (styledigits) go to a repo-local cache shared by all test workers.
os.environ.setdefault("DOMADAPT_CACHE", str(REPO / ".cache" / "tests"))


@pytest.fixture
def run_cli(capsys):
    """Run the real entry point (with its error handling); return (exit code, stdout, stderr)."""
    from cli.main import main

    def _run(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return _run


# Prepended to a `python -c` child's code: SIGINT raises KeyboardInterrupt, as in a command typed
# in a terminal, even when the tests themselves run as a background job (whose children start
# with SIGINT ignored, so Python would not install its handler and Ctrl-C would do nothing).
FOREGROUND_SIGINT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "


needs_pacs = pytest.mark.skipif(not PACS_ROOT.is_dir(), reason="../shared/data/pacs not present")
needs_mobilenet = pytest.mark.skipif(not MOBILENET_WEIGHTS.is_file(), reason="shared weights missing")
