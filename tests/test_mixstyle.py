"""MixStyle: the layer against a naive loop with the same draws, detached statistics, the
identity at evaluation and when the coin says no, placement after the chosen stages with BN's
state dict, bad options, and a tiny train that repeats and resumes bit-identically."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torchvision
from test_cdan import kill_and_resume_matches, log_rows, tiny_config, write_tiny_tree
from torch import nn

from domadapt.backbones import build_backbone
from domadapt.errors import UserError
from domadapt.norms import convert_norm
from domadapt.norms.mixstyle import MixStyle
from domadapt.train import run


def _naive(x: np.ndarray, lam: np.ndarray, perm: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Loops over samples and channels, float64, unbiased variance over H x W."""
    out = np.empty_like(x)
    n, c = x.shape[:2]
    for i in range(n):
        j = perm[i]
        for k in range(c):
            mu_i, mu_j = x[i, k].mean(), x[j, k].mean()
            s_i, s_j = np.sqrt(x[i, k].var(ddof=1) + eps), np.sqrt(x[j, k].var(ddof=1) + eps)
            mu = lam[i] * mu_i + (1 - lam[i]) * mu_j
            s = lam[i] * s_i + (1 - lam[i]) * s_j
            out[i, k] = (x[i, k] - mu_i) / s_i * s + mu
    return out


def _draws(seed: int, n: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda and the permutation a p = 1 layer draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    torch.rand(())  # the coin
    a = torch.tensor(alpha)
    return torch.distributions.Beta(a, a).sample((n, 1, 1, 1)).double(), torch.randperm(n)


def test_layer_equals_the_naive_mix_with_the_same_draws():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 2 + 1
    layer = MixStyle(p=1.0, alpha=0.1).train()
    torch.manual_seed(3)
    y = layer(x)
    lam, perm = (t.flatten().numpy() for t in _draws(3, 5, 0.1))  # the layer's draws
    assert not np.array_equal(perm, np.arange(5))  # the test mixes something
    np.testing.assert_allclose(y.numpy(), _naive(x.numpy(), lam, perm), rtol=1e-10, atol=1e-10)


def test_statistics_are_detached():
    """d sum(w * y) / dx = w * sigma_mix / sigma: no gradient through mu and sigma."""
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    torch.manual_seed(1)
    (MixStyle(p=1.0, alpha=0.3).train()(x) * w).sum().backward()
    lam, perm = _draws(1, 4, 0.3)
    sig = (x.detach().var((2, 3), keepdim=True) + 1e-6).sqrt()
    expected = (lam * sig + (1 - lam) * sig[perm]) / sig
    torch.testing.assert_close(x.grad, w * expected)


def test_identity_in_eval_mode_when_p_is_0_and_on_one_sample():
    x = torch.randn(4, 3, 5, 5)
    state = torch.get_rng_state()
    assert torch.equal(MixStyle(p=1.0).eval()(x), x)
    assert torch.equal(MixStyle(p=0.0).train()(x), x)
    assert torch.equal(MixStyle(p=1.0).train()(x[:1]), x[:1])
    assert torch.equal(torch.get_rng_state(), state)  # none of these drew anything
    assert not torch.equal(MixStyle(p=1.0).train()(x), x)


def _randomize_bn(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def test_placement_after_the_chosen_stages_keeps_bn_and_its_state_dict():
    bn_net = _randomize_bn(torchvision.models.resnet18())
    net = convert_norm(copy.deepcopy(bn_net), "mixstyle", {"mixstyle_p": 1.0})
    hooked = [n for n, m in net.named_modules() if isinstance(m, MixStyle)]
    assert hooked == ["layer1.1.mixstyle", "layer2.1.mixstyle", "layer3.1.mixstyle"]
    assert net.state_dict().keys() == bn_net.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), bn_net.eval()(x))  # evaluation: BN exactly
    net.train(), bn_net.train()
    torch.manual_seed(0)
    mixed = net(x)
    assert not torch.allclose(mixed, bn_net(x))
    # the mix is applied to layer1's output: the same draws on BN's layer1 output give it
    torch.manual_seed(0)
    stem = bn_net.maxpool(bn_net.relu(bn_net.bn1(bn_net.conv1(x))))
    after1 = MixStyle(p=1.0).train()(bn_net.layer1(stem))
    torch.manual_seed(0)
    torch.testing.assert_close(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))), after1)
    # converting twice adds nothing
    convert_norm(net, "mixstyle")
    assert [n for n, m in net.named_modules() if isinstance(m, MixStyle)] == hooked
    assert len(net.layer1[1]._forward_hooks) == 1
    # a network converted in eval mode stays BN's: the new layers take the block's mode
    evaluated = convert_norm(copy.deepcopy(bn_net).eval(), "mixstyle", {"mixstyle_p": 1.0})
    torch.testing.assert_close(evaluated(x), bn_net.eval()(x))


def test_placement_on_digitnet_and_mobilenet_v2():
    digit, _ = build_backbone("digitnet", "none")
    convert_norm(digit, "mixstyle", {"mixstyle_stages": "1,3"})
    assert [n for n, m in digit.named_modules() if isinstance(m, MixStyle)] == [
        "features.2.mixstyle", "features.10.mixstyle"]  # after conv-BN-ReLU, before the pool
    mob, _ = build_backbone("mobilenet_v2", "none")
    convert_norm(mob, "mixstyle", {"mixstyle_stages": "2"})
    assert [n for n, m in mob.named_modules() if isinstance(m, MixStyle)] == [
        "features.3.mixstyle"]


@pytest.mark.parametrize("options,expect", [
    ({"mixstyle_p": 1.5}, "--mixstyle-p must lie in [0, 1]"),
    ({"mixstyle_alpha": 0.0}, "--mixstyle-alpha must be positive"),
    ({"mixstyle_alpha": float("inf")}, "--mixstyle-alpha must be a finite number"),
    ({"mixstyle_stages": "1,x"}, "--mixstyle-stages must be distinct stage numbers"),
    ({"mixstyle_stages": "0"}, "--mixstyle-stages must be distinct stage numbers"),
    ({"mixstyle_stages": "1,1"}, "--mixstyle-stages must be distinct stage numbers"),
    ({"mixstyle_stages": "2,5"}, "--mixstyle-stages 2,5: this ResNet has 4 stages"),
])
def test_bad_options_are_one_line_errors(options, expect):
    with pytest.raises(UserError) as err:
        convert_norm(torchvision.models.resnet18(), "mixstyle", options)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_train_repeats_and_resumes_bit_identically_and_mixing_changes_training(
        tmp_path, monkeypatch):
    tree = write_tiny_tree(tmp_path / "data")
    cfg = tiny_config(tree, "dann").replace(
        norm="mixstyle", norm_options={"mixstyle_p": 1.0, "mixstyle_alpha": 0.1,
                                       "mixstyle_stages": "1,2"})
    kill_and_resume_matches(cfg, tmp_path, monkeypatch)  # straight == killed + resumed
    info = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert info["config"]["norm_options"]["mixstyle_stages"] == "1,2"
    bn = run(cfg.replace(norm="bn", norm_options={}), tmp_path / "bn", device="cpu", quiet=True)
    mixed = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert mixed["cls_loss"] != bn["cls_loss"]
    # p = 0 is BN's run exactly (the same draws elsewhere: the layer draws nothing)
    off = run(cfg.replace(norm_options={**cfg.norm_options, "mixstyle_p": 0.0}),
              tmp_path / "off", device="cpu", quiet=True)
    assert off["cls_loss"] == bn["cls_loss"] and off["target_acc"] == bn["target_acc"]
    assert log_rows(tmp_path / "off") == log_rows(tmp_path / "bn")
