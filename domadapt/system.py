"""What the machine offers a process, answered the same way on Linux, macOS and Windows."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS exposes one (Linux),
    else `os.process_cpu_count()` (Python 3.13+), else `os.cpu_count()`; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return max(1, count or 1)
