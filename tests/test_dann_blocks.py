"""DANN blocks: gradient reversal, discriminator, adversarial loss, bottleneck, set_lr (the
schedules themselves: test_schedules.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from domadapt.nn import (
    Bottleneck,
    DomainDiscriminator,
    GradientReversal,
    domain_accuracy,
    domain_adversarial_loss,
    grad_reverse,
    param_groups,
    set_lr,
)


@pytest.mark.parametrize("coeff", [1.0, 0.3, 0.0])
def test_grad_reverse_sign_and_scale(coeff: float) -> None:
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(grad, -coeff * upstream)


def test_gradient_reversal_module_uses_current_coeff() -> None:
    layer = GradientReversal()
    assert layer.coeff == 1.0
    x = torch.ones(2, requires_grad=True)
    layer.coeff = 0.25
    (layer(x) * torch.tensor([2.0, -4.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, 1.0]))


def test_reversal_makes_features_ascend_the_domain_loss() -> None:
    """Through the GRL, the features' gradient is exactly minus the discriminator's."""
    torch.manual_seed(0)
    disc = DomainDiscriminator(8, hidden=16)
    feats = torch.randn(6, 8, requires_grad=True)

    def feature_grad(reverse: bool) -> torch.Tensor:
        f = grad_reverse(feats, 0.7) if reverse else feats
        loss = domain_adversarial_loss(disc(f[:3]), disc(f[3:]))
        return torch.autograd.grad(loss, feats)[0]

    torch.testing.assert_close(feature_grad(True), -0.7 * feature_grad(False))


def test_set_lr_scales_every_group_by_its_multiplier() -> None:
    backbone, head = nn.Linear(3, 3), nn.Linear(3, 2)
    opt = torch.optim.SGD(param_groups(backbone, [head], lr=0.01, weight_decay=0.0), lr=0.01)
    base = 0.01 * 11 ** -0.75  # lr0 x the progress schedule at p = 1
    returned = set_lr(opt, base)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == returned == pytest.approx({"backbone": 0.1 * base, "heads": base})


def test_discriminator_shape_and_layers() -> None:
    disc = DomainDiscriminator(32, hidden=64)
    assert disc(torch.randn(5, 32)).shape == (5,)
    kinds = [type(m) for m in disc]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU,
                     nn.Linear]
    assert (disc[0].out_features, disc[3].out_features, disc[6].out_features) == (64, 64, 1)


def test_adversarial_loss_and_accuracy_by_hand() -> None:
    source, target = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0, -0.2])

    def sigmoid(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    terms = [-math.log(sigmoid(z)) for z in (2.0, -1.0)]
    terms += [-math.log(1 - sigmoid(z)) for z in (0.5, -3.0, -0.2)]
    expected = sum(terms) / 5  # mean over all samples, not per-domain means
    assert domain_adversarial_loss(source, target).item() == pytest.approx(expected, rel=1e-6)
    # correct: source 2.0; target -3.0, -0.2  ->  3 of 5
    assert domain_accuracy(source, target).item() == pytest.approx(3 / 5)
    assert domain_accuracy(source.view(2, 1), target.view(3, 1)).item() == pytest.approx(3 / 5)


def test_bottleneck() -> None:
    torch.manual_seed(0)
    b = Bottleneck(12, dim=6)
    out = b(torch.randn(4, 12))
    assert out.shape == (4, 6) and b.out_features == 6
    assert (out >= 0).all() and (out > 0).any()
    assert [type(m) for m in b] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
