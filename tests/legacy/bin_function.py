"""FROZEN COPY (tests only): the BIN autograd function as it was before the custom ops
(`domadapt.nn.bin_function` at commit ed66bc6), bound to a library built from the frozen
kernel source beside it (`bin_kernels.c`, sha256 060fac85...). tests/test_bin_op.py checks
that today's layer gives the same bits as this one. Do not edit: it is the reference.

`load(path)` binds the library; `c_library_for` then answers as the original did."""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from domadapt.nn.bin_kernel import memory_layout

_C_TYPES = {torch.float32: "f32", torch.float64: "f64"}
_LIB: list[ctypes.CDLL] = []
_FNS: dict[torch.dtype, tuple[Any, Any]] = {}


def load(path: str) -> None:
    """Bind the frozen kernels (argument types as the original `_bind`)."""
    lib = ctypes.CDLL(path)
    i64, ptr, i32, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for dtype, sfx in _C_TYPES.items():
        fwd, bwd = getattr(lib, f"bin_forward_{sfx}"), getattr(lib, f"bin_backward_{sfx}")
        fwd.argtypes = [ptr, ptr, i64, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, i32, i32, f64,
                        f64, ptr, i32]
        bwd.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, ptr, ptr, ptr, i32, ptr, ptr, ptr,
                        i32]
        fwd.restype = bwd.restype = i32
        _FNS[dtype] = (fwd, bwd)
    _LIB[:] = [lib]


def c_library_for(x: Tensor, *others: Tensor | None) -> ctypes.CDLL | None:
    if not x.is_cpu or x.dtype not in _C_TYPES or memory_layout(x) is None:
        return None
    if any(t is not None and (t.dtype != x.dtype or not t.is_cpu or not t.is_contiguous())
           for t in others):
        return None
    return _LIB[0] if _LIB else None


def c_functions(dtype: torch.dtype) -> tuple[Any, Any]:
    return _FNS[dtype]


_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    map), in C on CPU where it applies (see `c_library_for`), in torch ops otherwise. Saved
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
        lib = c_library_for(x, rho, weight, bias, running_mean, running_var)
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
        status = c_functions(x.dtype)[0](
            x.data_ptr(), out.data_ptr(), n, c, h * w, memory_layout(x), rho.data_ptr(),
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
        status = c_functions(x.dtype)[1](
            g.data_ptr(), x.data_ptr(), _ptr(grad_x), n, c, h * w, memory_layout(x), rho.data_ptr(),
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
