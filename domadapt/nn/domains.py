"""The domain channel: how a domain-aware layer (DSBN, `domadapt.norms.dsbn`) learns the domain
of each sample it normalizes, without the trainer or a method naming any norm.

Domains are small integers: `SOURCE` (0) and `TARGET` (1) in the transfer setting. Whoever
forwards a batch and knows its domains says so around the forward:

    with domain_labels(model, labels):     # labels: an int (the whole batch) or a (N,) tensor
        model(x)
    model(x, domains=labels)               # DomainAdaptModel.forward does exactly that
    x, labels = concat_domains(x_s, x_t)   # [x_s; x_t] and [SOURCE..., TARGET...]

`domain_labels` sets the `domains` attribute of every `DomainAware` layer inside `model` for
the duration of the block and restores the previous value after (so blocks nest; None leaves
an enclosing block's labels in force). Who sets what: every method labels its training
forwards (source batch SOURCE, target batch TARGET, concatenations `concat_domains`); the
trainer labels its evaluation sets (`domadapt.settings.eval_domain`: source -> SOURCE, target
-> TARGET) and AdaBN's target pass. A layer that gets no labels decides for itself (DSBN: the
target's branch at evaluation, an error in training). Layers that are not domain-aware never
look, so labels cost a walk over the modules and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

SOURCE, TARGET = 0, 1

Domains = int | Tensor | None


class DomainAware(nn.Module):
    """Base of layers that read the domain of each sample from `self.domains` (an int for the
    whole batch, a (N,) integer tensor per sample, or None: not given)."""

    domains: Domains = None


@contextlib.contextmanager
def domain_labels(model: nn.Module, labels: Domains) -> Iterator[None]:
    """Within the block, every `DomainAware` layer of `model` sees `labels` (module
    docstring); None changes nothing."""
    if labels is None:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, DomainAware)]
    previous = [m.domains for m in layers]
    for m in layers:
        m.domains = labels
    try:
        yield
    finally:
        for m, p in zip(layers, previous, strict=True):
            m.domains = p


def concat_domains(x_s: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
    """([x_s; x_t], their domain labels: SOURCE for x_s's rows, TARGET for x_t's)."""
    labels = torch.full((x_s.shape[0] + x_t.shape[0],), TARGET, dtype=torch.long,
                        device=x_s.device)
    labels[:x_s.shape[0]] = SOURCE
    return torch.cat([x_s, x_t]), labels
