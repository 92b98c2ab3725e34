"""Backbones as plug-ins: torchvision BN models by name, timm:<name> with BatchNormAct2d kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from domadapt.backbones import BACKBONES, build_backbone
from domadapt.config import make_config
from domadapt.data.testing import write_image_tree
from domadapt.errors import UserError
from domadapt.norms import convert_norm
from domadapt.train import run

LISTED = ("resnext50_32x4d", "wide_resnet50_2", "densenet121", "efficientnet_b0",
          "mobilenet_v3_large", "vgg16_bn")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_image_tree(tmp_path_factory.mktemp("bb") / "data", ["a", "b"], ["x", "y"], 2,
                            size=40)


def test_bn_families_are_registered_and_others_are_not():
    assert set(LISTED) <= set(BACKBONES.names())
    assert "vgg16" not in BACKBONES and "vit_b_16" not in BACKBONES  # no BatchNorm
    with pytest.raises(UserError, match="unknown backbone 'vit_b_16'"):
        make_config(source="a", target="b", backbone="vit_b_16")


@pytest.mark.parametrize("name", LISTED)
def test_listed_torchvision_backbones_train_two_iterations_with_bin(name, tree, tmp_path):
    cfg = make_config(dataset="folder", root=str(tree), source="a", target="b", method="dann",
                      norm="bin", backbone=name, pretrained="none", iters=2, batch_size=2,
                      image_size=32, resize_size=36, bottleneck_dim=8, disc_hidden=8,
                      eval_every=2, checkpoint_every=2, num_workers=0)
    metrics = run(cfg, tmp_path / "r", device="cpu", quiet=True)
    assert metrics["iters"] == 2 and 0 <= metrics["target_acc"] <= 1
    assert metrics["mean_gate"] is not None  # BN layers really became BIN


def test_head_is_removed_and_features_come_out():
    net, dim = build_backbone("mobilenet_v3_large", "none")
    assert dim == 1280 and net(torch.randn(2, 3, 32, 32)).shape == (2, 1280)
    net, dim = build_backbone("vgg16_bn", "none")
    assert dim == 4096 and net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4096)


def test_timm_batchnormact_keeps_its_activation_when_converted():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    net, dim = build_backbone("timm:efficientnet_b0", "none")
    assert any(isinstance(m, BatchNormAct2d) for m in net.modules())
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    as_bin = convert_norm(copy.deepcopy(net), "bin").eval()
    assert not any(isinstance(m, BatchNormAct2d) for m in as_bin.modules())
    torch.testing.assert_close(as_bin(x), net(x))  # rho = 1: BIN = BN, activation kept
    assert net(x).shape == (2, dim)
    assert timm.__version__


def test_a_norm_subclass_with_unknown_extras_is_refused():
    class Odd(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(UserError, match="cannot convert Odd to --norm bin"):
        convert_norm(nn.Sequential(nn.Conv2d(3, 3, 1), Odd(3)), "bin")


def test_backbones_command_lists_them(run_cli):
    code, out, _ = run_cli("backbones")
    assert code == 0 and "resnet50" in out.split() and "timm:<name>" in out.split()
