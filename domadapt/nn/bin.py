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
kernel compiled on first use (`domadapt.nn.bin_kernel`; torch ops elsewhere), so a BIN layer costs
what a BN layer costs and keeps for the backward what BN keeps plus one value per (n, c)
(benchmarks/bench_bin.py). Both directions are also custom operators (`domadapt::bin_forward`,
`domadapt::bin_backward`, `domadapt.nn.bin_function`), which `torch.compile` traces as one graph
node each, so a compiled BIN network has no graph break; eager calls the same code directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from domadapt.nn.bin_function import batch_instance_norm

__all__ = [
    "GATE_HIGH",
    "GATE_LOW",
    "BatchInstanceNorm2d",
    "batch_instance_norm",
    "gate_fraction_below",
    "gate_parameters",
    "gate_values",
    "mean_gate",
]

# A gate below GATE_LOW mostly instance-normalises its channel (style removed); above
# GATE_HIGH mostly batch-normalises it (style kept). Used by run metrics and gate reports.
GATE_LOW, GATE_HIGH = 0.1, 0.9


class BatchInstanceNorm2d(_NormBase):
    """BIN layer: y = gamma * (rho * x_B + (1 - rho) * x_I) + beta (Nam & Kim, 2018).

    Parameters and buffers carry the names of `nn.BatchNorm2d` (weight, bias, running_mean,
    running_var, num_batches_tracked) plus the gate `rho` (shape [C], init 1 = pure BN), so a
    BN state dict loads into it, strictly: a missing `rho` keeps its current value. The BN
    part follows `nn.BatchNorm2d` exactly (momentum, `momentum=None` = cumulative average,
    unbiased running variance, running statistics in eval); the IN part always uses the
    statistics of each sample. Keep rho in [0, 1] with the optimizer clamp
    (`domadapt.nn.optim.attach_gate_clamp`). Statistics are float32 under autocast; the
    output has the input's dtype and memory format. `activation` ("relu", "relu6"; default
    "none") applies that activation in the same pass, bit-identical to the module after it
    (set by `domadapt.nn.bin_fusion.fuse_activations`; not part of the state dict).
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
        activation: str = "none",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.rho = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.activation = activation

    def extra_repr(self) -> str:
        fused = f", activation={self.activation}" if self.activation != "none" else ""
        return super().extra_repr() + fused

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
            self.weight, self.bias, use_batch, factor, self.eps, self.activation,
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
