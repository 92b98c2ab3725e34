"""The C kernel loader of the BIN layer: compiler flags, the build cache and its trust check,
binding, and which kernel runs (`kernel_info`).

Two implementations of the same function exist (`domadapt.nn.bin_function`). The torch one runs
on any device, dtype and memory format. On CPU, for float32 and float64 inputs that are NCHW-
or channels_last-contiguous, a small C/OpenMP library (`bin_kernels.c`, package data beside
this module) compiled once per machine does each direction in ONE call: two passes over memory
(moments, affine map; gradient sums, dx) in the layout's own order, the [N, C] algebra inline.
That removes the ~25 small tensor ops per layer and direction that dominated the cost of small
layers. A CUDA kernel (e.g. Triton) would be a third pair, chosen in `c_library_for`'s place.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from domadapt.io import cache_dir

_C_TYPES = {torch.float32: "f32", torch.float64: "f64"}
_c_lib: ctypes.CDLL | None = None
_c_tried = False
_c_fns: dict[torch.dtype, tuple[Any, Any]] = {}  # dtype -> (forward, backward), set by _bind
_kernel: dict[str, Any] = {}  # what kernel_info() reports, set by _c_library


def _isa_flags() -> list[str]:
    """An explicit instruction-set level instead of -march=native, so every CPU of one level
    runs the same machine code: x86-64-v3 (AVX2 + FMA) where the CPU has it, else x86-64-v2,
    else the x86-64 baseline; other architectures: the compiler's default."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")),
                     set())
    if {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"} <= flags:
        return ["-march=x86-64-v3"]
    if {"sse4_2", "ssse3", "popcnt", "cx16"} <= flags:
        return ["-march=x86-64-v2"]
    return ["-march=x86-64"]


HOMEBREW_PREFIXES = ("/opt/homebrew", "/usr/local")  # Apple silicon, Intel Macs


def _openmp_flags() -> list[str] | None:
    """How the compiler gets OpenMP: -fopenmp (gcc, LLVM clang); on macOS, where Apple's clang
    rejects -fopenmp, through Homebrew's libomp (`brew install libomp`) when it is installed;
    None when it is not (the kernels are then built without threads: one per call)."""
    if platform.system() != "Darwin":
        return ["-fopenmp"]
    for prefix in filter(None, (os.environ.get("HOMEBREW_PREFIX"), *HOMEBREW_PREFIXES)):
        omp = Path(prefix) / "opt" / "libomp"
        if (omp / "include" / "omp.h").is_file():
            return ["-Xpreprocessor", "-fopenmp", f"-I{omp / 'include'}", f"-L{omp / 'lib'}",
                    "-lomp"]
    return None


def kernel_flags(threads: bool = True) -> list[str]:
    """Compiler flags of the C kernels. -ffp-contract=off: no fused multiply-add contraction,
    which is what made builds for different CPUs round differently (~5e-7). Without OpenMP
    threads (`threads=False`, or none on this platform): -fopenmp-simd, which keeps the
    vectorised reductions of the `omp simd` pragmas, so the results equal the OpenMP build's
    on one thread bit for bit (without it they differ by rounding)."""
    omp = (_openmp_flags() if threads else None) or ["-fopenmp-simd"]
    return ["-O3", *_isa_flags(), "-ffp-contract=off", "-fno-math-errno", *omp, "-fPIC",
            "-shared"]


def _flag_sets() -> list[list[str]]:
    """The flag sets to try, best first: with OpenMP threads where available, then without."""
    sets = [kernel_flags(), kernel_flags(threads=False)]
    return sets[:1] if sets[0] == sets[1] else sets


def kernel_source() -> str:
    """The C source of the kernels, shipped as package data (`bin_kernels.c` beside this
    module); its text is part of the cache key."""
    return resources.files(__package__).joinpath("bin_kernels.c").read_bytes().decode()


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.stdout else cc
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


class _Untrusted(OSError):
    """A cached library that this process must not load."""


def _trusted(path: Path) -> bool:
    """A cached library may be loaded only if this user owns it and nobody else may write it
    (else another user could put code into this process)."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build_library(cc: str, flags: list[str], cache: Path) -> Path:
    """The library for (source, compiler, flags) in `cache`, built there if absent."""
    version = _compiler_version(cc)
    source = kernel_source()
    key = hashlib.sha256("\0".join([source, cc, version, *flags]).encode()).hexdigest()[:16]
    lib = cache / f"bin_kernels_{key}.so"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    if lib.exists():
        if not _trusted(lib):
            raise _Untrusted(f"{lib} is not owned by this user or is writable by others; "
                             f"not loaded")
        return lib
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, so = Path(tmp) / "bin_kernels.c", Path(tmp) / "bin_kernels.so"
        src.write_bytes(source.encode())
        subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.chmod(so, 0o700)
        os.replace(so, lib)  # atomic: concurrent builders each install a whole file
    return lib


def _c_library() -> ctypes.CDLL | None:
    """The compiled C kernels, built on first use into the cache; None if impossible.

    Cache: `domadapt.io.cache_dir()` (created private, 0700); the file name hashes the
    source, the compiler and its version, and the flags (`kernel_flags()`: an explicit ISA
    level, no FMA contraction, so CPUs of one level get identical results). A cached file is
    loaded only if this user owns it and nobody else may write it. When the compiler cannot
    build with OpenMP threads, the kernels are built without them (same results on one
    thread). DOMADAPT_BIN_KERNEL=torch disables them. Any other failure (no compiler, an
    untrusted cached file, Windows) leaves the torch path with one line on stderr;
    `kernel_info()` says which ran and why.
    """
    global _c_lib, _c_tried
    if _c_tried:
        return _c_lib
    _c_tried = True
    _kernel.clear()
    if os.environ.get("DOMADAPT_BIN_KERNEL", "").lower() == "torch":
        _kernel.update(kernel="torch", reason="DOMADAPT_BIN_KERNEL=torch")
        return None
    if os.name != "posix":
        return _fall_back(f"no C kernel build on {platform.system()}",
                          "run under WSL or Linux for the C kernels")
    try:
        cc = shutil.which(os.environ.get("CC", "cc"))
        if cc is None:
            raise OSError("no C compiler (set CC or install gcc/clang)")
        *better, last = _flag_sets()
        for flags in better:  # with OpenMP threads; a compile error falls through to `last`
            with contextlib.suppress(subprocess.CalledProcessError):
                lib = _build_library(cc, flags, cache_dir())
                break
        else:
            flags = last
            lib = _build_library(cc, flags, cache_dir())
        _c_lib = _bind(ctypes.CDLL(str(lib)))
        _kernel.update(kernel="c", compiler=_compiler_version(cc), flags=flags)
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        why = e.stderr.decode(errors="replace").strip().splitlines()[-1:] if isinstance(
            e, subprocess.CalledProcessError) and e.stderr else [str(e)]
        return _fall_back((why or ["build failed"])[0], (
            "delete that file, or set DOMADAPT_CACHE to a folder of your own"
            if isinstance(e, _Untrusted) else
            "install a working C compiler (gcc or clang; Xcode's command line tools on macOS)"))
    return _c_lib


def _fall_back(reason: str, hint: str) -> None:
    """Record the torch path as the kernel in use and say so in one line on stderr."""
    global _c_lib
    _c_lib = None
    _kernel.clear()
    _kernel.update(kernel="torch", reason=reason)
    print(f"domadapt: BIN runs on the slower torch path ({reason}); for the fast C kernels "
          f"{hint}", file=sys.stderr)


def kernel_info() -> dict[str, Any]:
    """Which BIN kernel runs on CPU: {"kernel": "c", "compiler", "flags"} or
    {"kernel": "torch", "reason"} (builds the C kernels if not tried yet)."""
    _c_library()
    return dict(_kernel)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, i32, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for sfx in _C_TYPES.values():
        fwd, bwd = getattr(lib, f"bin_forward_{sfx}"), getattr(lib, f"bin_backward_{sfx}")
        fwd.argtypes = [ptr, ptr, i64, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, i32, i32, f64,
                        f64, ptr, i32, i32]
        bwd.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, ptr, ptr, ptr, i32, ptr, ptr, ptr,
                        i32, ptr, i32]
        fwd.restype = bwd.restype = i32
    _c_fns.update({dtype: (getattr(lib, f"bin_forward_{sfx}"), getattr(lib, f"bin_backward_{sfx}"))
                   for dtype, sfx in _C_TYPES.items()})
    return lib


def memory_layout(x: Tensor) -> int | None:
    """0: NCHW-contiguous, 1: channels_last-contiguous, None: neither."""
    if x.is_contiguous():
        return 0
    return 1 if x.is_contiguous(memory_format=torch.channels_last) else None


def c_library_for(x: Tensor, *others: Tensor | None) -> ctypes.CDLL | None:
    """The C kernels if they apply: CPU, float32/float64, a dense layout, and every other
    tensor (gate, affine, running statistics) contiguous in x's dtype."""
    if not x.is_cpu or x.dtype not in _C_TYPES or memory_layout(x) is None:
        return None
    if any(t is not None and (t.dtype != x.dtype or not t.is_cpu or not t.is_contiguous())
           for t in others):
        return None
    return _c_library()


def c_functions(dtype: torch.dtype) -> tuple[Any, Any]:
    """The bound C (forward, backward) of `dtype`, once `c_library_for` returned the library."""
    return _c_fns[dtype]
