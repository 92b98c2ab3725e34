"""Provenance: what, besides its RunConfig, made a run's numbers.

A run's floating-point results depend on the code, the inputs (pretrained weights, the image
files read) and the machine (CPU model and the kernel set torch picked for it, thread count,
GPU, which BIN kernel ran). This module measures each of them once, in one place, for
config.json (`domadapt.train`) and the tables (`domadapt.tables`):

- `code_version()`: the git commit of the checkout the package runs from and whether its
  tracked files had uncommitted changes; the package version outside a git checkout.
- `file_sha256(path)`: sha256 of a file (the `--pretrained` weights), cached per path+mtime.
- `hardware(device)`: CPU model, torch's CPU kernel set (AVX2, AVX512, ...), threads, GPU.
- `host_hash()`: a short hash of the host name (tells machines apart without naming them).
- `portable_path(p)` / `portable_command(argv)`: paths relative to the working directory,
  never absolute machine paths.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
# What makes a run, relative to the checkout: the library, the CLI and how they are installed.
CODE_PATHS = ("domadapt", "cli", "pyproject.toml", "setup.py")


@functools.cache
def code_version() -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None, "version": package version}.

    `dirty`: a tracked file of the code (CODE_PATHS) differs from the commit. Results, docs and
    tests the checkout also holds do not count: a sweep re-run into its committed folder
    rewrites tracked tables (sweep.json, runs.csv) while it runs, and that is no change of
    the code that trains."""
    from domadapt import __version__

    info: dict[str, Any] = {"commit": None, "dirty": None, "version": __version__}
    git = ["git", "-C", str(PACKAGE_DIR.parent)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], check=False,
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != PACKAGE_DIR.parent:
            return info  # installed copy, or a package inside someone else's repository
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True)
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--",
                                 *CODE_PATHS],
                                capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return info
    info["commit"] = head.stdout.strip()
    info["dirty"] = bool(status.stdout.strip())
    return info


def code_label(version: dict[str, Any] | None) -> str | None:
    """Short text of a `code_version()` record: `abc123def456`, `abc123def456+dirty` or
    `v0.1.0` (no git); None for runs that recorded none."""
    if not version:
        return None
    if not version.get("commit"):
        return f"v{version.get('version')}"
    return version["commit"][:12] + ("+dirty" if version.get("dirty") else "")


@functools.cache
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes; OSError if unreadable."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def cpu_model() -> str:
    for line in _read_lines("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, Any]:
    """What floating-point results depend on besides the config: the CPU model and the kernel
    set torch picked for it (AVX2, AVX512, ...), the thread count, and the GPU if one is used.
    The same config on another CPU model or thread count gives other numbers."""
    info: dict[str, Any] = {"cpu": cpu_model(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        info["gpu"] = "Apple GPU (MPS)"
    return info


def host_hash() -> str:
    """First 12 hex digits of sha256(host name): machines told apart, not named."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


def portable_path(path: str | Path, start: str | Path | None = None) -> str:
    """`path` relative to `start` (default: the working directory), `/` separated; a relative
    path stays as written. Paths on another drive (Windows) stay absolute: nothing better."""
    p = str(path)
    if not os.path.isabs(p):
        return Path(p).as_posix()
    try:
        return Path(os.path.relpath(p, start or os.getcwd())).as_posix()
    except ValueError:
        return Path(p).as_posix()


def portable_command(argv: Sequence[str]) -> str:
    """The command line as `domadapt ARGS`, every absolute path in it made relative to the
    working directory (also the PATH in `--opt=PATH`)."""
    def fix(arg: str) -> str:
        opt, eq, value = arg.partition("=")
        if eq and opt.startswith("--") and os.path.isabs(value):
            return f"{opt}={portable_path(value)}"
        return portable_path(arg) if os.path.isabs(arg) else arg
    return shlex.join(["domadapt", *(fix(a) for a in argv[1:])])


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
