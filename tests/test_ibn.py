"""IBN-a: the layer against a naive IN / BN split, the paper's placement, BN carry-over,
evaluation mode, bad options, and a tiny train that resumes bit-identically."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from test_cdan import kill_and_resume_matches, tiny_config, write_tiny_tree
from torch import nn

from domadapt.backbones import build_backbone
from domadapt.errors import UserError
from domadapt.norms import convert_norm, get_norm, norm_hparams
from domadapt.norms.ibn import InstanceBatchNorm2d, split_channels


def _randomized_bn(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.num_batches_tracked.fill_(7)
    return bn


def _naive(x: torch.Tensor, bn: nn.BatchNorm2d, h: int, *, train: bool) -> torch.Tensor:
    """IN over channels [0, h) (per sample), BN over [h, C) (batch moments or running ones),
    each times the old layer's gamma plus its beta: loops, biased variances."""
    out = torch.empty_like(x)
    n, c = x.shape[:2]
    for j in range(c):
        for i in range(n):
            if j < h:
                mu, var = x[i, j].mean(), x[i, j].var(unbiased=False)
            elif train:
                mu, var = x[:, j].mean(), x[:, j].var(unbiased=False)
            else:
                mu, var = bn.running_mean[j], bn.running_var[j]
            out[i, j] = (x[i, j] - mu) / torch.sqrt(var + bn.eps) * bn.weight[j] + bn.bias[j]
    return out


@pytest.mark.parametrize("ratio,c,h", [(0.5, 8, 4), (0.25, 8, 2), (0.3, 10, 3), (0.01, 8, 1),
                                       (0.99, 8, 7)])
def test_split_is_int_c_ratio_clipped_to_non_empty_halves(ratio, c, h):
    assert split_channels(c, ratio) == h


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_layer_equals_the_naive_split_in_train_and_eval_and_carries_bn(ratio):
    bn = _randomized_bn(8)
    ibn = get_norm("ibn").build(copy.deepcopy(bn), norm_hparams("ibn", {"ibn_ratio": ratio}))
    assert isinstance(ibn, InstanceBatchNorm2d)
    h = ibn.in_channels
    assert h == int(8 * ratio)
    # carried: gamma, beta to both halves, running statistics to the BN half
    assert torch.equal(ibn.inorm.weight, bn.weight[:h]) and torch.equal(ibn.bnorm.bias, bn.bias[h:])
    assert torch.equal(ibn.bnorm.running_mean, bn.running_mean[h:])
    assert torch.equal(ibn.bnorm.running_var, bn.running_var[h:])
    assert int(ibn.bnorm.num_batches_tracked) == 7
    x = torch.randn(4, 8, 5, 5) * 3 + 1
    ibn.eval()
    torch.testing.assert_close(ibn(x), _naive(x, bn, h, train=False))
    # eval: the BN channels are the pretrained BN's output exactly
    torch.testing.assert_close(ibn(x)[:, h:], bn.eval()(x)[:, h:])
    # eval: each sample's output depends on that sample only
    torch.testing.assert_close(ibn(x[:1]), ibn(x)[:1])
    ibn.train()
    torch.testing.assert_close(ibn(x), _naive(x, bn, h, train=True))
    # training moves only the BN half's running statistics
    torch.testing.assert_close(ibn.bnorm.running_mean,
                               0.9 * bn.running_mean[h:] + 0.1 * x[:, h:].mean((0, 2, 3)))


def _ibn_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, InstanceBatchNorm2d)]


def test_placement_is_the_papers_on_resnets_and_bn_elsewhere():
    net = convert_norm(torchvision.models.resnet50(), "ibn")
    blocks = {1: 3, 2: 4, 3: 6}
    assert _ibn_names(net) == [f"layer{s}.{b}.bn1" for s, n in blocks.items() for b in range(n)]
    others = [m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)
              and ".inorm" not in n and ".bnorm" not in n]
    assert len(others) == 53 - 13 and all(type(m) is nn.BatchNorm2d for m in others)
    net18 = convert_norm(torchvision.models.resnet18(), "ibn", {"ibn_stages": 1})
    assert _ibn_names(net18) == ["layer1.0.bn1", "layer1.1.bn1"]


def test_placement_on_mobilenet_v2_and_digitnet():
    mob, _ = build_backbone("mobilenet_v2", "none")
    convert_norm(mob, "ibn", {"ibn_stages": 2})  # stem features.0 excluded; 16 and 24 channels
    assert _ibn_names(mob) == ["features.1.conv.0.1", "features.2.conv.0.1", "features.3.conv.0.1"]
    digit, _ = build_backbone("digitnet", "none")
    convert_norm(digit, "ibn", {"ibn_stages": 2})
    assert _ibn_names(digit) == ["features.1", "features.5"]
    assert type(digit.features[9]) is nn.BatchNorm2d


def test_a_converted_network_is_bn_where_bn_is_kept_and_converting_twice_is_a_no_op():
    torch.manual_seed(0)
    bn_net = torchvision.models.resnet18()
    for m in bn_net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.load_state_dict(_randomized_bn(m.num_features, seed=m.num_features).state_dict())
    ibn_net = convert_norm(copy.deepcopy(bn_net), "ibn")
    layers = dict(ibn_net.named_modules())
    assert torch.equal(layers["layer4.0.bn1"].running_var, bn_net.layer4[0].bn1.running_var)
    first = layers["layer1.0.bn1"]
    assert convert_norm(ibn_net, "ibn").layer1[0].bn1 is first
    x = torch.randn(2, 3, 32, 32)
    ibn_net.eval(), bn_net.eval()
    # the stem and everything before the first IBN layer are BN's, exactly
    torch.testing.assert_close(ibn_net.maxpool(ibn_net.relu(ibn_net.bn1(ibn_net.conv1(x)))),
                               bn_net.maxpool(bn_net.relu(bn_net.bn1(bn_net.conv1(x)))))
    assert not torch.allclose(ibn_net(x), bn_net(x))  # the IN half changes the rest


@pytest.mark.parametrize("options,expect", [
    ({"ibn_ratio": 0.0}, "--ibn-ratio must lie in (0, 1)"),
    ({"ibn_ratio": 1.0}, "--ibn-ratio must lie in (0, 1)"),
    ({"ibn_ratio": float("nan")}, "--ibn-ratio must be a finite number"),
    ({"ibn_stages": 0}, "--ibn-stages must be >= 1"),
    ({"ibn_stages": 5}, "--ibn-stages 5: this ResNet has 4 stages"),
])
def test_bad_options_are_one_line_errors(options, expect):
    with pytest.raises(UserError) as err:
        convert_norm(torchvision.models.resnet18(), "ibn", options)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_a_network_without_known_stages_is_refused_in_one_line():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UserError, match="cannot tell the stages of a Sequential"):
        convert_norm(net, "ibn")


def test_train_with_ibn_resumes_bit_identically(tmp_path, monkeypatch):
    tree = write_tiny_tree(tmp_path / "data")
    cfg = tiny_config(tree, "dann").replace(norm="ibn", norm_options={"ibn_ratio": 0.5,
                                                                      "ibn_stages": 2})
    ckpt = kill_and_resume_matches(cfg, tmp_path, monkeypatch)
    keys = set(ckpt["method"])
    assert {"model.backbone.features.1.inorm.weight",
            "model.backbone.features.5.bnorm.running_mean"} <= keys
    assert "model.backbone.features.9.running_mean" in keys  # stage 3: BN


def test_methods_lists_the_style_norms_and_their_options(run_cli):
    code, out, _ = run_cli("methods")
    assert code == 0
    norms = out[out.index("norms (--norm):"):]
    for line in ("ibn: IBN-a", "--ibn-ratio", "--ibn-stages", "mixstyle: BN, with MixStyle",
                 "--mixstyle-p", "--mixstyle-alpha", "--mixstyle-stages", "dsbn: domain-specific"):
        assert line in norms, line
