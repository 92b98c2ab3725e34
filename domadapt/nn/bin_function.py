"""The BIN forward and backward as two custom operators (`torch.library`), so that
`torch.compile` sees a BIN layer as one node each way instead of breaking its graph at every
norm layer (a ctypes call inside an autograd Function cannot be traced):

    domadapt::bin_forward(x, rho, weight?, bias?, running_mean?, running_var?, training,
                          momentum, eps, activation) -> (y, save, new_running_mean, new_running_var)
    domadapt::bin_backward(g, x, rho, weight?, save, y?, c_kernel, use_batch, need_x, activation)
                          -> (dx, drho, dweight, dbias)

Each op runs the C kernels on CPU where they apply (`domadapt.nn.bin_kernel`) and torch ops
otherwise (any device, dtype and memory format): the same code, so the same bits, as the
autograd Function they replace. The forward op is functional: it returns the updated running
statistics (computed as before, by the same code on copies) and `batch_instance_norm` copies
them into the buffers, because an op with an autograd formula may not mutate its inputs.
`register_fake` gives the compiler the outputs' shapes, dtypes and strides (for the torch path
by running the torch code on fake tensors); `register_autograd` joins the two ops.
The math: `domadapt.nn.bin` and `bin_backward_torch` below.

`activation` ("none", "relu", "relu6") fuses the activation that follows the norm: the kernel
clamps y in the pass that writes it and masks the gradient with y in the passes that read it
(C), or the torch ops that BIN followed by nn.ReLU / nn.ReLU6 would run (torch path); either
way the bits of BIN followed by the activation (`domadapt.nn.bin_fusion` applies it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from domadapt.nn.bin_kernel import c_functions, c_library_for, memory_layout

_LOW_PRECISION = (torch.float16, torch.bfloat16)
ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2}  # name -> the C kernels' code


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


def uses_c_kernel(x: Tensor, *others: Tensor | None) -> bool:
    """Whether the ops run the C kernels for these inputs (decided from metadata only, so the
    fake implementations and the autograd context agree with the real run)."""
    return c_library_for(x, *others) is not None


def _updates(training: bool, running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    return training and running_mean is not None and running_var is not None


def _no_stats(x: Tensor) -> Tensor:
    """The `new_running_*` outputs when nothing is updated (eval, or no running statistics)."""
    return torch.empty(0, dtype=x.dtype, device=x.device)


# -- C kernels ------------------------------------------------------------------------------------

def bin_forward_c(x: Tensor, rho: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                  momentum: float, eps: float, activation: str = "none", in_place: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward in one C call. save [N C + 3 C] (x's dtype): rstd_nc, mu_B, rstd_B and the
    shift K = mean_n mu_nc (the backward recovers mu_nc from one pass over x - K). The updated
    running statistics are new tensors, or (`in_place`, eager) the buffers themselves."""
    n, c, h, w = x.shape
    use_batch = training or running_mean is None or running_var is None
    update = _updates(training, running_mean, running_var)
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    save = torch.empty(n * c + 3 * c, dtype=x.dtype)
    new_mean, new_var = ((running_mean, running_var) if in_place else (  # the kernel updates these
        running_mean.clone(), running_var.clone())) if update else (_no_stats(x), _no_stats(x))
    if weight is None:
        weight = torch.ones(c, dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(c, dtype=x.dtype)
    status = c_functions(x.dtype)[0](
        x.data_ptr(), out.data_ptr(), n, c, h * w, memory_layout(x), rho.data_ptr(),
        weight.data_ptr(), bias.data_ptr(), _ptr(new_mean if update else running_mean),
        _ptr(new_var if update else running_var), int(use_batch), int(update), momentum, eps,
        save.data_ptr(), torch.get_num_threads(), ACTIVATIONS[activation])
    if status != 0:
        raise MemoryError("BatchInstanceNorm2d: out of memory in the C kernel")
    return out, save, new_mean, new_var


def bin_backward_c(g: Tensor, x: Tensor, rho: Tensor, weight: Tensor | None, save: Tensor,
                   y: Tensor | None, use_batch: bool, need_x: bool, activation: str = "none"
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward in one C call (dx empty when not `need_x`); y: the forward's output,
    which masks g when an activation is fused."""
    n, c, h, w = x.shape
    act = ACTIVATIONS[activation]
    if act and (y is None or y.stride() != x.stride()):
        raise ValueError(f"activation {activation!r}: the backward needs y laid out like x")
    if weight is None:
        weight = torch.ones(c, dtype=x.dtype)
    if g.dtype != x.dtype or g.stride() != x.stride():  # e.g. an expanded gradient
        g = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(g)
    grad_x = (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if need_x
              else _no_stats(x))
    grad_rho, grad_w, grad_b = (torch.empty(c, dtype=x.dtype) for _ in range(3))
    status = c_functions(x.dtype)[1](
        g.data_ptr(), x.data_ptr(), grad_x.data_ptr() if need_x else None, n, c, h * w,
        memory_layout(x), rho.data_ptr(), weight.data_ptr(), save.data_ptr(), int(use_batch),
        grad_rho.data_ptr(), grad_w.data_ptr(), grad_b.data_ptr(), torch.get_num_threads(),
        _ptr(y) if act else None, act)
    if status != 0:
        raise MemoryError("BatchInstanceNorm2d: out of memory in the C kernel")
    return grad_x, grad_rho, grad_w, grad_b


# -- torch ops ------------------------------------------------------------------------------------

def bin_forward_torch(x: Tensor, rho: Tensor, weight: Tensor | None, bias: Tensor | None,
                      running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                      momentum: float, eps: float, activation: str = "none",
                      in_place: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward in torch ops (any device, dtype, memory format). save [2 N C + 2 C] (the
    statistics dtype): mu_nc, rstd_nc, mu_B, rstd_B. Running statistics as `bin_forward_c`."""
    n, _, h, w = x.shape
    sd = _stats_dtype(x.dtype)
    use_batch = training or running_mean is None or running_var is None
    out = torch.empty_like(x)
    scratch = out if sd == x.dtype else torch.empty_like(x, dtype=sd)
    # Per-(n, c) moments, two-pass (no cancellation): mean, then mean squared deviation;
    # the deviations go to the output buffer, which the affine map overwrites afterwards.
    mean_i = x.mean((2, 3), dtype=sd)
    var_i = torch.sub(x, mean_i[..., None, None], out=scratch).square_().mean((2, 3))
    del scratch
    rstd_i = (var_i + eps).rsqrt()
    new_mean, new_var = _no_stats(x), _no_stats(x)
    if use_batch:
        mean_b = mean_i.mean(0)
        var_b = var_i.mean(0) + (mean_i - mean_b).square().mean(0)  # law of total variance
        if _updates(training, running_mean, running_var):
            assert running_mean is not None and running_var is not None
            count = n * h * w
            new_mean, new_var = ((running_mean, running_var) if in_place
                                 else (running_mean.clone(), running_var.clone()))
            new_mean.lerp_(mean_b.to(running_mean.dtype), momentum)
            unbiased = var_b * (count / (count - 1))
            new_var.lerp_(unbiased.to(running_var.dtype), momentum)
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
    save = torch.cat([mean_i.reshape(-1), rstd_i.reshape(-1), mean_b.reshape(-1),
                      rstd_b.reshape(-1)])
    out = _affine(x, _nc11(scale, x.dtype), _nc11(shift, x.dtype), out=out)
    if activation == "relu":  # what nn.ReLU(inplace=True) runs
        torch.relu_(out)
    elif activation == "relu6":  # what nn.ReLU6(inplace=True) runs
        torch.nn.functional.hardtanh(out, 0.0, 6.0, inplace=True)
    return out, save, new_mean, new_var


def bin_backward_torch(g: Tensor, x: Tensor, rho: Tensor, weight: Tensor | None, save: Tensor,
                       y: Tensor | None, use_batch: bool, need_x: bool,
                       activation: str = "none") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward in torch ops. With M = H W and the per-(n, c) sums S_g = sum_hw g,
    S_c = sum_hw g (x - mu_nc) (centred, like BN's backward, so no cancellation),
    d_I = sum_hw g x_I = rstd_nc S_c and d_B = sum_hw g x_B = rstd_B (S_c + (mu_nc - mu_B) S_g):

        dbeta  = sum_n S_g
        dgamma = sum_n (rho d_B + (1 - rho) d_I)
        drho   = gamma sum_n (d_B - d_I)
        dx     = A g + P x + Q   with per-(n, c) P, Q, where
        c_I = gamma (1 - rho) rstd_nc / M,   P_I = -c_I rstd_nc d_I,   Q_I = -c_I S_g - P_I mu_nc
        c_B = gamma rho rstd_B / (N M),      P_B = -c_B rstd_B sum_n d_B,
        Q_B = -c_B sum_n S_g - P_B mu_B,     P = P_I + P_B,   Q = Q_I + Q_B

    i.e. the instance-norm backward plus the batch-norm backward, each weighted by its share
    of the gate; the c_B terms vanish when running statistics are used (eval), which are
    constants. The C kernel computes the same, from one pass summing g, g (x - K) and x - K in
    double (mu_nc = K + mean(x - K), S_c = sum g (x - K) - (mu_nc - K) S_g). Gradients are
    returned in the statistics dtype; autograd casts them to the dtype of each input. A fused
    activation first masks g with y (the forward's output) as its own backward would.
    """
    if activation == "relu":  # the backward of nn.ReLU(inplace=True)
        g = torch.ops.aten.threshold_backward(g, y, 0)
    elif activation == "relu6":  # the backward of nn.ReLU6(inplace=True)
        g = torch.ops.aten.hardtanh_backward(g, y, 0.0, 6.0)
    n, c, h, w = x.shape
    m, nc = h * w, n * c
    sd = _stats_dtype(x.dtype)
    mean_i, rstd_i = save[:nc].view(n, c), save[nc:2 * nc].view(n, c)
    mean_b, rstd_b = save[2 * nc:2 * nc + c], save[2 * nc + c:]
    rho = rho.to(sd)
    gamma = weight.to(sd) if weight is not None else torch.ones_like(rstd_b)
    gs, xs = g.to(sd), x.to(sd)
    # One full-size buffer: first g * (x - mu_nc), then dx.
    buf = (xs - mean_i[..., None, None]).mul_(gs)
    dot_c = buf.sum((2, 3))  # sum_hw g (x - mu_nc)
    sum_g = gs.sum((2, 3))  # [N, C]
    dot_i = rstd_i * dot_c  # sum_hw g x_I
    dot_b = rstd_b * (dot_c + (mean_i - mean_b) * sum_g)  # sum_hw g x_B

    grad_rho = gamma * (dot_b - dot_i).sum(0)
    grad_w = (rho * dot_b + (1 - rho) * dot_i).sum(0)
    grad_b = sum_g.sum(0)
    grad_x = torch.empty(0, dtype=sd, device=x.device)
    if need_x:
        c_i = gamma * (1 - rho) * rstd_i / m
        p = -c_i * rstd_i * dot_i
        q = -c_i * sum_g - p * mean_i
        if use_batch:
            c_b = gamma * rho * rstd_b / (n * m)
            p_b = -c_b * rstd_b * dot_b.sum(0)
            p = p + p_b
            q = q - c_b * sum_g.sum(0) - p_b * mean_b
        scale = gamma * (rho * rstd_b + (1 - rho) * rstd_i)  # A, as in forward
        grad_x = _affine(gs, _nc11(scale, sd), _nc11(q, sd), out=buf).addcmul_(xs, _nc11(p, sd))
    return grad_x, grad_rho, grad_w, grad_b


# -- the operators --------------------------------------------------------------------------------

def _forward_impl(x: Tensor, rho: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                  momentum: float, eps: float,
                  activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BIN forward (and its fused activation): (y, save for the backward, updated running mean
    and variance, empty when not updated)."""
    args = (x, rho, weight, bias, running_mean, running_var)
    if uses_c_kernel(*args):
        return bin_forward_c(*args, training, momentum, eps, activation)
    return bin_forward_torch(*args, training, momentum, eps, activation)


def _backward_impl(g: Tensor, x: Tensor, rho: Tensor, weight: Tensor | None, save: Tensor,
                   y: Tensor | None, c_kernel: bool, use_batch: bool, need_x: bool,
                   activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BIN backward: (dx, empty when not `need_x`; drho; dweight; dbias); y: the forward's
    output (None without a fused activation)."""
    if c_kernel:
        return bin_backward_c(g, x, rho, weight, save, y, use_batch, need_x, activation)
    return bin_backward_torch(g, x, rho, weight, save, y, use_batch, need_x, activation)


bin_forward = torch.library.custom_op("domadapt::bin_forward", mutates_args=())(_forward_impl)
bin_backward = torch.library.custom_op("domadapt::bin_backward", mutates_args=())(_backward_impl)


@bin_forward.register_fake
def _bin_forward_fake(x: Tensor, rho: Tensor, weight: Tensor | None, bias: Tensor | None,
                      running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                      momentum: float, eps: float,
                      activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (x, rho, weight, bias, running_mean, running_var)
    if not uses_c_kernel(*args):
        return bin_forward_torch(*args, training, momentum, eps, activation)
    n, c = x.shape[:2]
    update = _updates(training, running_mean, running_var)
    return (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device),
            x.new_empty(n * c + 3 * c),
            torch.empty_like(running_mean) if update else _no_stats(x),  # type: ignore[arg-type]
            torch.empty_like(running_var) if update else _no_stats(x))  # type: ignore[arg-type]


@bin_backward.register_fake
def _bin_backward_fake(g: Tensor, x: Tensor, rho: Tensor, weight: Tensor | None, save: Tensor,
                       y: Tensor | None, c_kernel: bool, use_batch: bool, need_x: bool,
                       activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not c_kernel:
        return bin_backward_torch(g, x, rho, weight, save, y, use_batch, need_x, activation)
    c = x.shape[1]
    grad_x = (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
              if need_x else _no_stats(x))
    return grad_x, x.new_empty(c), x.new_empty(c), x.new_empty(c)


def _save(ctx, inputs: tuple, out: Tensor, save: Tensor,  # type: ignore[no-untyped-def]
          c_kernel: bool) -> None:
    x, rho, weight, _, running_mean, running_var, training, _, _, activation = inputs
    ctx.c_kernel, ctx.activation = c_kernel, activation
    ctx.use_batch = training or running_mean is None or running_var is None
    ctx.save_for_backward(x, rho, weight, save, out if activation != "none" else None)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    out, save, new_mean, new_var = output
    ctx.mark_non_differentiable(save, new_mean, new_var)
    ctx.set_materialize_grads(False)  # no zero gradients for those three
    _save(ctx, inputs, out, save, uses_c_kernel(*inputs[:6]))


def _grads(ctx, g: Tensor, backward: Callable[..., tuple[Tensor, ...]]
           ) -> tuple[Tensor | None, ...]:  # type: ignore[no-untyped-def]
    x, rho, weight, save, y = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    if g is None:  # y was not used
        return (None,) * 10
    grads = backward(g, x, rho, weight, save, y, ctx.c_kernel, ctx.use_batch, need[0],
                     ctx.activation)
    return (*(gr if n else None for gr, n in zip(grads, need, strict=True)), *(None,) * 6)


bin_forward.register_autograd(
    lambda ctx, g, *_: _grads(ctx, g, torch.ops.domadapt.bin_backward),
    setup_context=_setup_context)


class _BatchInstanceNormFn(torch.autograd.Function):
    """The eager entry: the operators' own implementations and autograd formula without the
    dispatcher (a Python custom op costs ~0.1-0.3 ms per layer and step in dispatch alone),
    updating the running statistics in place and returning y alone, as this function did
    before the operators existed; so eager and traced BIN run the same code. Not twice
    differentiable."""

    @staticmethod
    def forward(ctx, *inputs):  # type: ignore[no-untyped-def, override]
        c_kernel = uses_c_kernel(*inputs[:6])
        out, save, _, _ = (bin_forward_c if c_kernel else bin_forward_torch)(*inputs,
                                                                             in_place=True)
        _save(ctx, inputs, out, save, c_kernel)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return _grads(ctx, g, _backward_impl)


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
    activation: str = "none",
) -> Tensor:
    """Functional BIN on [N, C, H, W]; the arguments mean what they mean in `F.batch_norm`.

    The BN part uses batch statistics when `training` (or when no running statistics are
    given), and then updates the running statistics in place, r <- (1 - momentum) r +
    momentum s, with the unbiased batch variance; otherwise it uses the running statistics.
    The IN part always uses per-sample statistics. rho, weight, bias: shape [C].
    `activation` ("relu", "relu6") applies that activation to the output in the same pass,
    with the bits of `F.relu` / `F.relu6` applied afterwards.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if input.dim() != 4:
        raise ValueError(f"expected a 4-d input [N, C, H, W], got {input.dim()}-d")
    if (training or running_mean is None) and input.numel() // input.size(1) <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input size {input.shape}"
        )
    args = (input, rho, weight, bias, running_mean, running_var, training, momentum, eps,
            activation)
    if not torch.compiler.is_compiling():  # eager: the operators' code, called directly
        return _BatchInstanceNormFn.apply(*args)
    # traced by torch.compile: the custom operator, one graph node
    out, _, new_mean, new_var = torch.ops.domadapt.bin_forward(*args)
    if _updates(training, running_mean, running_var):  # (no gradient: non-differentiable)
        running_mean.copy_(new_mean)  # type: ignore[union-attr]
        running_var.copy_(new_var)  # type: ignore[union-attr]
    return out
