"""AdaBN at evaluation (Li et al., "Revisiting Batch Normalization For Practical Domain
Adaptation", 2016): re-estimate the normalization statistics on the target domain.

`adapt_batch_stats(model, batches)` returns a deep COPY of `model` (the original is never
touched) in which the running mean and variance of every BatchNorm layer (1d/2d/3d) and of
the batch branch of every `BatchInstanceNorm2d` are replaced by the statistics of that
layer's input over all target samples. Everything else (weights, BIN gates, train/eval
flags) is unchanged; InstanceNorm layers have no batch statistics and are left as they are.

How (one pass): the copy runs in eval mode except for the adapted layers, which run in train
mode (they normalise each batch by its own statistics, as torch's cumulative
`momentum=None` re-estimation does). A forward pre-hook accumulates, per layer and channel,
the exact pooled moments of the layer's input over every sample (Chan et al.'s parallel
update, float64), so afterwards

    running_mean = (1/M) sum_x x,   running_var = (1/(M-1)) sum_x (x - running_mean)^2,

M = number of values per channel (samples x spatial positions). Unlike momentum=None, which
averages per-batch means and unbiased variances, this is exact for unequal batch sizes and
includes the spread between batch means. num_batches_tracked is set to the number of batches.

The batches must each represent the domain. During the pass every adapted layer normalises
its batch by the batch's own statistics, so what a later layer sees (and accumulates) depends
on what the batch holds; a batch of one class, as a dataset read in its sorted, class-by-class
order gives, shows later layers inputs the adapted network never produces at evaluation. The
callers (`engine`, `analysis.knockout`) therefore read the images in one fixed random order
(`eval_loader(..., seed=run seed)`). Measured on a PACS DANN + BN run (photo -> cartoon, seed
0, 1,500 iterations, `results/pacs-long`): 68.2 % target accuracy after AdaBN in the
class-sorted order, 66.6 % and 66.5 % in two random orders.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from domadapt.nn.bin import BatchInstanceNorm2d
from domadapt.nn.compiled import uncompiled_copy

__all__ = ["adapt_batch_stats", "has_batch_stats"]


def _adaptable(module: nn.Module) -> bool:
    return (isinstance(module, (_BatchNorm, BatchInstanceNorm2d))
            and module.track_running_stats and module.running_mean is not None)


def has_batch_stats(model: nn.Module) -> bool:
    """Whether `model` has any layer AdaBN would adapt (False e.g. for an IN-only network,
    whose AdaBN column is then left empty)."""
    return any(_adaptable(m) for m in model.modules())


class _Moments:
    """Running per-channel count, mean and sum of squared deviations (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Merge one batch: its own two-pass float64 mean and m2 (computed in place in the
        one float64 copy, which halves the statistics pass's cost and gives the same bits
        as out-of-place ops), then Chan et al.'s update."""
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.size(1)
        dev = x.detach().to(torch.float64, copy=True)  # never the layer's own input
        mean = dev.mean(dims)
        dev.sub_(mean.view(1, -1, *[1] * (x.dim() - 2)))
        self.merge(n, mean, dev.mul_(dev).sum(dims))

    def merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        """Merge one batch's count n, mean and m2 (sum of squared deviations from its mean)
        into the running ones, Chan et al.'s pairwise update."""
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total


def _inputs(batch: Any) -> Any:
    """A batch is a tensor or a (inputs, labels, ...) tuple/list: the model gets the inputs."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _no_single_sample(inputs: Iterable[Tensor]) -> Iterable[Tensor]:
    """The input batches, each of one sample joined to the one before it."""
    held: Tensor | None = None
    for x in inputs:
        if held is not None and len(x) == 1:
            held = torch.cat([held, x])
            continue
        if held is not None:
            yield held
        held = x
    if held is not None:
        yield held


@torch.no_grad()
def adapt_batch_stats(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """A copy of `model` with BN / BIN running statistics re-estimated on `batches` (target
    images; tensors or (images, ...) tuples, already on the model's device). See the module
    docstring. No batches -> ValueError. A batch of one sample (the remainder of a loader) is
    joined to the batch before it: a 1-d BatchNorm cannot normalise one sample in train mode."""
    adapted = uncompiled_copy(model)  # eager: a deep copy would run the original's compiled forward
    flags = {name: m.training for name, m in adapted.named_modules()}
    layers = {name: m for name, m in adapted.named_modules() if _adaptable(m)}
    moments = {name: _Moments() for name in layers}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, acc=moments[name]: acc.update(args[0]))
        for name, layer in layers.items()
    ]
    adapted.eval()
    for layer in layers.values():
        layer.train()
    n_batches = 0
    try:
        for inputs in _no_single_sample(_inputs(b) for b in batches):
            adapted(inputs)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for name, m in adapted.named_modules():
            m.train(flags[name])
    if n_batches == 0:
        raise ValueError("adapt_batch_stats needs at least one target batch")
    for name, layer in layers.items():
        acc = moments[name]
        if acc.mean is None or acc.m2 is None:  # never reached by the forward: kept as is
            continue
        layer.running_mean.copy_(acc.mean.to(layer.running_mean.dtype))
        var = acc.m2 / max(acc.count - 1, 1)
        layer.running_var.copy_(var.to(layer.running_var.dtype))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(n_batches)
    return adapted
