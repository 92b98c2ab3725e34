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
A BIN layer thus costs about what a BN layer costs (benchmarks/bench_bin.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _NormBase

from domadapt.errors import UserError

__all__ = [
    "GATE_HIGH",
    "GATE_LOW",
    "NORM_KINDS",
    "BatchInstanceNorm2d",
    "batch_instance_norm",
    "convert_norm",
    "gate_fraction_below",
    "gate_parameters",
    "gate_values",
    "mean_gate",
]

NORM_KINDS = ("bn", "in", "bin")
# A gate below GATE_LOW mostly instance-normalises its channel (style removed); above
# GATE_HIGH mostly batch-normalises it (style kept). Used by run metrics and gate reports.
GATE_LOW, GATE_HIGH = 0.1, 0.9
_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    constants. Gradients are returned in the statistics dtype; autograd casts them to the
    dtype of each input. Not twice differentiable (`once_differentiable`).
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
        use_batch_stats = training or running_mean is None or running_var is None
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

        ctx.use_batch_stats = use_batch_stats
        ctx.save_for_backward(x, rho_s, gamma, mean_i, rstd_i, mean_b, rstd_b)
        return _affine(x, _nc11(scale, x.dtype), _nc11(shift, x.dtype), out=out)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
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


# --------------------------------------------------------------------------- conversion

_NORM_TYPES: dict[str, type[nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "in": nn.InstanceNorm2d,
    "bin": BatchInstanceNorm2d,
}
_Norm2d = (nn.BatchNorm2d, nn.InstanceNorm2d, BatchInstanceNorm2d)


def _convert_layer(old: nn.Module, kind: str) -> nn.Module:
    """A new `kind` layer carrying old's affine, eps, momentum, running stats, device, dtype."""
    ref = next(iter(old.parameters()), None)
    if ref is None:
        ref = next(iter(old.buffers()), None)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    # IN keeps no running statistics (it always uses each sample's own); IN -> BN/BIN starts
    # fresh ones.
    track = kind != "in" and (isinstance(old, nn.InstanceNorm2d) or old.track_running_stats)
    new = _NORM_TYPES[kind](
        old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
        track_running_stats=track, **factory,
    )
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if src is not None and dst is not None:
                dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if src is not None and dst is not None:
                dst.copy_(src)
    return new.train(old.training)


def convert_norm(model: nn.Module, kind: str) -> nn.Module:
    """Replace, in place, every 2-d norm layer (BatchNorm2d, InstanceNorm2d, BIN) by `kind`.

    kind: "bn" (nn.BatchNorm2d), "in" (nn.InstanceNorm2d, affine as the source, no running
    statistics) or "bin" (BatchInstanceNorm2d, rho = 1). Weight, bias, running statistics,
    num_batches_tracked, eps, momentum, device, dtype, requires_grad and train/eval mode are
    carried over wherever both layers have them, so BN -> BIN leaves a network's outputs
    unchanged in train and eval mode; BIN -> BN drops rho. Layers already of `kind` (or a
    subclass) are kept, so converting twice is a no-op. Unknown kind -> UserError.
    Returns `model`, or the new layer when `model` is itself a norm layer.
    """
    if kind not in NORM_KINDS:
        raise UserError(f"unknown norm {kind!r}; choose from {', '.join(NORM_KINDS)}")
    if isinstance(model, _Norm2d):
        return model if isinstance(model, _NORM_TYPES[kind]) else _convert_layer(model, kind)
    for name, child in model.named_children():
        converted = convert_norm(child, kind)
        if converted is not child:
            setattr(model, name, converted)
    return model


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
