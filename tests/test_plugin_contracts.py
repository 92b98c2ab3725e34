"""Plug-in contracts: a norm's options reach its layer builder and a norm may build any layer
(a GroupNorm kind with a groups option, trained); option clashes with core settings or between
plug-ins are one line naming both (Python API and CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import REPO
from test_cdan import tiny_config, write_tiny_tree
from torch import nn

from domadapt.config import make_config
from domadapt.errors import UserError
from domadapt.methods import METHODS
from domadapt.methods.source_only import SourceOnly
from domadapt.norms import NORMS, convert_norm
from domadapt.norms.base import NormKind, channels
from domadapt.registry import hparam
from domadapt.train import load_trained, run


@dataclass(frozen=True)
class GroupsHparams:
    zz_groups: int = hparam(4, "test norm: number of groups")


class ZzGroupNorm(NormKind):
    """GroupNorm (Wu & He, 2018) with its group count from the kind's options."""

    name = "zz-groupnorm"
    layer_type = nn.GroupNorm
    Hparams = GroupsHparams

    def make_layer(self, old, hp, factory):
        return nn.GroupNorm(hp.zz_groups, channels(old), eps=old.eps, affine=old.affine,
                            **factory)


@pytest.fixture
def groupnorm(monkeypatch):
    monkeypatch.setitem(NORMS._items, ZzGroupNorm.name, ZzGroupNorm())


def test_norm_options_reach_the_layer_builder(groupnorm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-1, 1)
    weight = net[1].weight.detach().clone()
    convert_norm(net, "zz-groupnorm", {"zz_groups": 2})
    gn = net[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 2 and gn.num_channels == 8
    assert torch.equal(gn.weight, weight)  # the affine carried over
    convert_norm(net, "zz-groupnorm")  # already of the kind: kept
    assert net[1] is gn
    other = convert_norm(nn.Sequential(nn.BatchNorm2d(8)), "zz-groupnorm")  # default: 4
    assert other[0].num_groups == 4


def test_a_norm_with_options_trains_through_the_config(groupnorm, tmp_path_factory):
    tree = write_tiny_tree(tmp_path_factory.mktemp("t") / "data")
    cfg = tiny_config(tree, "source-only").replace(norm="zz-groupnorm",
                                                   norm_options={"zz_groups": 2})
    assert make_config("styledigits", source="a", target="b", norm="zz-groupnorm",
                       zz_groups=2).norm_options == {"zz_groups": 2}
    out = tmp_path_factory.mktemp("run") / "r"
    run(cfg, out, device="cpu", quiet=True)
    _, model = load_trained(out)
    groups = {m.num_groups for m in model.backbone.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {2}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())


@dataclass(frozen=True)
class LrHparams:
    lr: float = hparam(0.5, "a method option named like the core --lr")


class LrMethod(SourceOnly):
    name = "zz-lr-method"
    Hparams = LrHparams


@dataclass(frozen=True)
class OtherDefault:
    mcd_steps: int = hparam(7, "MCD's option with another default")


class OtherDefaultMethod(SourceOnly):
    name = "zz-other-default"
    Hparams = OtherDefault


def test_option_named_like_a_core_setting_is_one_line(monkeypatch):
    monkeypatch.setitem(METHODS._items, LrMethod.name, LrMethod)
    with pytest.raises(UserError) as e:
        make_config(method="source-only", source="a", target="b", lr=0.1)
    assert str(e.value) == ("option --lr of method zz-lr-method clashes with the core setting "
                            "--lr; rename the option")


def test_shared_option_with_another_default_names_both(monkeypatch):
    monkeypatch.setitem(METHODS._items, OtherDefaultMethod.name, OtherDefaultMethod)
    with pytest.raises(UserError, match=r"option --mcd-steps is declared differently by "
                                        r"method mcd \(int, default 4\) and method "
                                        r"zz-other-default \(int, default 7\)"):
        make_config(method="source-only", source="a", target="b")


@pytest.mark.parametrize("command", [["methods"], ["train", "--help"]])
def test_clash_ends_every_command_in_one_line(command):
    code = ("from tests.test_plugin_contracts import LrMethod; "
            "from domadapt.methods import register_method; register_method(LrMethod); "
            f"from cli.main import main; main({command!r})")
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: option --lr of method zz-lr-method clashes with the "
                                   "core setting --lr; rename the option")
