"""Batch-Instance Normalization (Nam & Kim, "Batch-Instance Normalization for Adaptively
Style-Invariant Neural Networks", NeurIPS 2018) and conversion between BN / IN / BIN.

BIN mixes a batch-normalised and an instance-normalised copy of its input with a learned
per-channel gate rho in [0, 1]:

    y = gamma * (rho * x_B + (1 - rho) * x_I) + beta
    x_B = (x - mu_B) / sqrt(var_B + eps)      batch statistics (running statistics in eval)
    x_I = (x - mu_nc) / sqrt(var_nc + eps)    per-sample, per-channel statistics, always

The layer is fused: the per-(n, c) moments are computed once and the batch moments derived
from them by the law of total variance, var_B = mean_n(var_nc) + mean_n((mu_nc - mu_B)^2),
so the output is ONE per-(n, c) affine map y = A_nc * x + B_nc, and the hand-written
backward needs only the per-(n, c) sums of g and g * (x - mu_nc) plus one elementwise map.
On CPU (float32/float64, NCHW or channels_last) each direction is one call into a small C
kernel compiled on first use (see "kernels" below; torch ops elsewhere), so a BIN layer costs
what a BN layer costs and keeps for the backward what BN keeps plus one value per (n, c)
(benchmarks/bench_bin.py).
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
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _NormBase

from domadapt.io import cache_dir

__all__ = [
    "GATE_HIGH",
    "GATE_LOW",
    "BatchInstanceNorm2d",
    "batch_instance_norm",
    "gate_fraction_below",
    "gate_parameters",
    "gate_values",
    "kernel_info",
    "mean_gate",
]

# A gate below GATE_LOW mostly instance-normalises its channel (style removed); above
# GATE_HIGH mostly batch-normalises it (style kept). Used by run metrics and gate reports.
GATE_LOW, GATE_HIGH = 0.1, 0.9
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- kernels
#
# Two implementations of the same function. The torch one (`_forward_torch`,
# `_backward_torch`) runs on any device, dtype and memory format. On CPU, for float32 and
# float64 inputs that are NCHW- or channels_last-contiguous, a small C/OpenMP library
# (`bin_kernels.c`, package data) compiled once per machine does each direction in ONE call: two passes over memory (moments,
# affine map; gradient sums, dx) in the layout's own order, the [N, C] algebra inline. That
# removes the ~25 small tensor ops per layer and direction that dominated the cost of small
# layers. A CUDA kernel (e.g. Triton) would be a third pair, chosen in `_c_library_for`'s place.

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
                        f64, ptr, i32]
        bwd.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, ptr, ptr, ptr, i32, ptr, ptr, ptr,
                        i32]
        fwd.restype = bwd.restype = i32
    _c_fns.update({dtype: (getattr(lib, f"bin_forward_{sfx}"), getattr(lib, f"bin_backward_{sfx}"))
                   for dtype, sfx in _C_TYPES.items()})
    return lib


def _layout(x: Tensor) -> int | None:
    """0: NCHW-contiguous, 1: channels_last-contiguous, None: neither."""
    if x.is_contiguous():
        return 0
    return 1 if x.is_contiguous(memory_format=torch.channels_last) else None


def _c_library_for(x: Tensor, *others: Tensor | None) -> ctypes.CDLL | None:
    """The C kernels if they apply: CPU, float32/float64, a dense layout, and every other
    tensor (gate, affine, running statistics) contiguous in x's dtype."""
    if not x.is_cpu or x.dtype not in _C_TYPES or _layout(x) is None:
        return None
    if any(t is not None and (t.dtype != x.dtype or not t.is_cpu or not t.is_contiguous())
           for t in others):
        return None
    return _c_library()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are computed in float32 for half inputs, in the input dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _nc11(t: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, C] (or [C]) coefficients -> broadcastable against [N, C, H, W]."""
    return t.to(dtype)[..., None, None]


def _affine(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """out = x * scale + shift for [N, C, 1, 1] coefficients, keeping x's memory format.

    One `addcmul` kernel, except on CPU with NCHW-contiguous x: there the coefficients are
    constant along the inner H W run, which two binary kernels vectorise better.
    """
    if x.device.type == "cpu" and x.is_contiguous():
        return torch.mul(x, scale, out=out).add_(shift)
    return torch.addcmul(shift, x, scale, out=out)


class _BatchInstanceNormFn(torch.autograd.Function):
    """Fused BIN: y = A * x + B with per-(n, c) A, B (see the module docstring).

    Backward, with M = H W and the per-(n, c) sums S_g = sum_hw g, S_c = sum_hw g (x - mu_nc)
    (centred, like BN's backward, so no cancellation), d_I = sum_hw g x_I = rstd_nc S_c and
    d_B = sum_hw g x_B = rstd_B (S_c + (mu_nc - mu_B) S_g):

        dbeta  = sum_n S_g
        dgamma = sum_n (rho d_B + (1 - rho) d_I)
        drho   = gamma sum_n (d_B - d_I)
        dx     = A g + P x + Q   with per-(n, c) P, Q, where
        c_I = gamma (1 - rho) rstd_nc / M,   P_I = -c_I rstd_nc d_I,   Q_I = -c_I S_g - P_I mu_nc
        c_B = gamma rho rstd_B / (N M),      P_B = -c_B rstd_B sum_n d_B,
        Q_B = -c_B sum_n S_g - P_B mu_B,     P = P_I + P_B,   Q = Q_I + Q_B

    i.e. the instance-norm backward plus the batch-norm backward, each weighted by its share
    of the gate; the c_B terms vanish when running statistics are used (eval), which are
    constants. Each direction reads the full-size tensors twice (statistics, then one affine
    map), in C on CPU where it applies (see `_c_library_for`), in torch ops otherwise. Saved
    for the backward: x and rstd_nc, mu_B, rstd_B and the shift K = mean_n mu_nc (C; its
    one backward pass sums g, g (x - K) and x - K in double, whence mu_nc = K + mean(x - K)
    and S_c = sum g (x - K) - (mu_nc - K) S_g), or x, mu_nc, rstd_nc, mu_B, rstd_B (torch).
    Gradients are
    returned in the statistics dtype; autograd casts them to the dtype of each input. Not
    twice differentiable (`once_differentiable`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        rho: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        use_batch_stats = training or running_mean is None or running_var is None
        ctx.use_batch_stats = use_batch_stats
        lib = _c_library_for(x, rho, weight, bias, running_mean, running_var)
        if lib is None:
            return _forward_torch(ctx, x, rho, weight, bias, running_mean, running_var,
                                  training, use_batch_stats, momentum, eps)
        n, c, h, w = x.shape
        out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
        save = torch.empty(n * c + 3 * c, dtype=x.dtype)  # rstd_i, mean_b, rstd_b, shift
        update = training and running_mean is not None and running_var is not None
        if weight is None:
            weight = torch.ones(c, dtype=x.dtype)
        if bias is None:
            bias = torch.zeros(c, dtype=x.dtype)
        status = _c_fns[x.dtype][0](
            x.data_ptr(), out.data_ptr(), n, c, h * w, _layout(x), rho.data_ptr(),
            weight.data_ptr(), bias.data_ptr(), _ptr(running_mean), _ptr(running_var),
            int(use_batch_stats), int(update), momentum, eps, save.data_ptr(),
            torch.get_num_threads())
        if status != 0:
            raise MemoryError("BatchInstanceNorm2d: out of memory in the C kernel")
        ctx.save_for_backward(x, rho, weight, save)
        ctx.c_path = True
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if not getattr(ctx, "c_path", False):
            return _backward_torch(ctx, g)
        x, rho, weight, save = ctx.saved_tensors
        need_x, need_rho, need_w, need_b = ctx.needs_input_grad[:4]
        n, c, h, w = x.shape
        if g.dtype != x.dtype or g.stride() != x.stride():  # e.g. an expanded gradient
            g = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(g)
        grad_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if need_x else None
        grad_rho, grad_w, grad_b = (torch.empty(c, dtype=x.dtype) if need else None
                                    for need in (need_rho, need_w, need_b))
        status = _c_fns[x.dtype][1](
            g.data_ptr(), x.data_ptr(), _ptr(grad_x), n, c, h * w, _layout(x), rho.data_ptr(),
            weight.data_ptr(), save.data_ptr(), int(ctx.use_batch_stats), _ptr(grad_rho),
            _ptr(grad_w), _ptr(grad_b), torch.get_num_threads())
        if status != 0:
            raise MemoryError("BatchInstanceNorm2d: out of memory in the C kernel")
        return grad_x, grad_rho, grad_w, grad_b, None, None, None, None, None


def _forward_torch(ctx: FunctionCtx, x: Tensor, rho: Tensor, weight: Tensor | None,
                   bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, training: bool, use_batch_stats: bool,
                   momentum: float, eps: float) -> Tensor:
    """`_BatchInstanceNormFn.forward` in torch ops (any device, dtype, memory format)."""
    n, _, h, w = x.shape
    sd = _stats_dtype(x.dtype)
    out = torch.empty_like(x)
    scratch = out if sd == x.dtype else torch.empty_like(x, dtype=sd)
    # Per-(n, c) moments, two-pass (no cancellation): mean, then mean squared deviation;
    # the deviations go to the output buffer, which the affine map overwrites afterwards.
    mean_i = x.mean((2, 3), dtype=sd)
    var_i = torch.sub(x, mean_i[..., None, None], out=scratch).square_().mean((2, 3))
    del scratch
    rstd_i = (var_i + eps).rsqrt()
    if use_batch_stats:
        mean_b = mean_i.mean(0)
        var_b = var_i.mean(0) + (mean_i - mean_b).square().mean(0)  # law of total variance
        if training and running_mean is not None and running_var is not None:
            count = n * h * w
            running_mean.lerp_(mean_b.to(running_mean.dtype), momentum)
            unbiased = var_b * (count / (count - 1))
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    else:  # eval: the running statistics are constants
        assert running_mean is not None and running_var is not None
        mean_b, var_b = running_mean.to(sd), running_var.to(sd)
    rstd_b = (var_b + eps).rsqrt()

    rho_s = rho.to(sd)
    gamma = weight.to(sd) if weight is not None else torch.ones_like(rstd_b)
    beta = bias.to(sd) if bias is not None else torch.zeros_like(rstd_b)
    a_b = rho_s * rstd_b  # [C]
    a_i = (1 - rho_s) * rstd_i  # [N, C]
    scale = gamma * (a_b + a_i)  # A
    shift = beta - gamma * (a_b * mean_b + a_i * mean_i)  # B

    ctx.save_for_backward(x, rho_s, gamma, mean_i, rstd_i, mean_b, rstd_b)
    return _affine(x, _nc11(scale, x.dtype), _nc11(shift, x.dtype), out=out)


def _backward_torch(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    """`_BatchInstanceNormFn.backward` in torch ops."""
    x, rho, gamma, mean_i, rstd_i, mean_b, rstd_b = ctx.saved_tensors
    need_x, need_rho, need_w, need_b = ctx.needs_input_grad[:4]
    n, _, h, w = x.shape
    m = h * w
    sd = rho.dtype
    gs, xs = g.to(sd), x.to(sd)
    # One full-size buffer: first g * (x - mu_nc), then dx.
    buf = (xs - mean_i[..., None, None]).mul_(gs)
    dot_c = buf.sum((2, 3))  # sum_hw g (x - mu_nc)
    sum_g = gs.sum((2, 3))  # [N, C]
    dot_i = rstd_i * dot_c  # sum_hw g x_I
    dot_b = rstd_b * (dot_c + (mean_i - mean_b) * sum_g)  # sum_hw g x_B

    grad_x = grad_rho = grad_w = grad_b = None
    if need_rho:
        grad_rho = gamma * (dot_b - dot_i).sum(0)
    if need_w:
        grad_w = (rho * dot_b + (1 - rho) * dot_i).sum(0)
    if need_b:
        grad_b = sum_g.sum(0)
    if need_x:
        c_i = gamma * (1 - rho) * rstd_i / m
        p = -c_i * rstd_i * dot_i
        q = -c_i * sum_g - p * mean_i
        if ctx.use_batch_stats:
            c_b = gamma * rho * rstd_b / (n * m)
            p_b = -c_b * rstd_b * dot_b.sum(0)
            p = p + p_b
            q = q - c_b * sum_g.sum(0) - p_b * mean_b
        scale = gamma * (rho * rstd_b + (1 - rho) * rstd_i)  # A, as in forward
        grad_x = _affine(gs, _nc11(scale, sd), _nc11(q, sd), out=buf).addcmul_(xs, _nc11(p, sd))
    return grad_x, grad_rho, grad_w, grad_b, None, None, None, None, None


def batch_instance_norm(
    input: Tensor,
    rho: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Functional BIN on [N, C, H, W]; the arguments mean what they mean in `F.batch_norm`.

    The BN part uses batch statistics when `training` (or when no running statistics are
    given), and then updates the running statistics in place, r <- (1 - momentum) r +
    momentum s, with the unbiased batch variance; otherwise it uses the running statistics.
    The IN part always uses per-sample statistics. rho, weight, bias: shape [C].
    """
    if input.dim() != 4:
        raise ValueError(f"expected a 4-d input [N, C, H, W], got {input.dim()}-d")
    if (training or running_mean is None) and input.numel() // input.size(1) <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input size {input.shape}"
        )
    return _BatchInstanceNormFn.apply(
        input, rho, weight, bias, running_mean, running_var, training, momentum, eps
    )


class BatchInstanceNorm2d(_NormBase):
    """BIN layer: y = gamma * (rho * x_B + (1 - rho) * x_I) + beta (Nam & Kim, 2018).

    Parameters and buffers carry the names of `nn.BatchNorm2d` (weight, bias, running_mean,
    running_var, num_batches_tracked) plus the gate `rho` (shape [C], init 1 = pure BN), so a
    BN state dict loads into it, strictly: a missing `rho` keeps its current value. The BN
    part follows `nn.BatchNorm2d` exactly (momentum, `momentum=None` = cumulative average,
    unbiased running variance, running statistics in eval); the IN part always uses the
    statistics of each sample. Keep rho in [0, 1] with the optimizer clamp
    (`domadapt.nn.optim.attach_gate_clamp`). Statistics are float32 under autocast; the
    output has the input's dtype and memory format.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.rho = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "rho"):  # called by the base constructor before rho exists
            nn.init.ones_(self.rho)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A plain BN state dict (e.g. torchvision weights) has no gate: keep the current one.
        # `load_state_dict` hands modules a shallow copy, so the caller's dict is untouched.
        state_dict.setdefault(prefix + "rho", self.rho.detach())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Running-statistics bookkeeping exactly as nn.BatchNorm2d.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return batch_instance_norm(
            input, self.rho,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight, self.bias, use_batch, factor, self.eps,
        )


# --------------------------------------------------------------------------- gates

def gate_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The BIN gates rho of `model`, in network order."""
    for module in model.modules():
        if isinstance(module, BatchInstanceNorm2d):
            yield module.rho


def gate_values(model: nn.Module) -> dict[str, Tensor]:
    """Layer name -> detached copy of its gate rho ([C]), in network order."""
    return {
        name: module.rho.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, BatchInstanceNorm2d)
    }


def _all_gates(model: nn.Module) -> Tensor | None:
    gates = [rho.detach().float().flatten().cpu() for rho in gate_parameters(model)]
    return torch.cat(gates) if gates else None


def mean_gate(model: nn.Module) -> float | None:
    """Mean of all gate entries (every channel of every BIN layer); None without BIN layers."""
    rho = _all_gates(model)
    return None if rho is None else rho.mean().item()


def gate_fraction_below(model: nn.Module, threshold: float = GATE_LOW) -> float | None:
    """Fraction of all gate entries < threshold (channels that drop style); None without BIN."""
    rho = _all_gates(model)
    return None if rho is None else (rho < threshold).float().mean().item()
