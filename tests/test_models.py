"""Backbones, pretrained loading (PATH / imagenet offline) and the DomainAdaptModel contract."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import MOBILENET_WEIGHTS, needs_mobilenet
from torch import nn

from domadapt.backbones import base as backbones_base
from domadapt.backbones import build_backbone
from domadapt.config import make_config
from domadapt.errors import UserError
from domadapt.models import DomainAdaptModel, build_model
from domadapt.nn import gate_parameters


def _cfg(**kw):
    base = {"dataset": "styledigits", "source": "gray", "target": "color",
            "backbone": "digitnet", "pretrained": "none", "bottleneck_dim": 16}
    return make_config(**(base | kw))


def test_digitnet_model_contract():
    torch.manual_seed(0)
    model = build_model(_cfg(), num_classes=10)
    assert isinstance(model, DomainAdaptModel)
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert 15_000 < n_backbone < 40_000  # small enough for seconds-long CPU runs
    logits, feats = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10) and feats.shape == (4, 16)
    assert model.feature_dim == 64 * 16 and model.classifier.in_features == 16
    # features are the bottleneck output (post-ReLU), what the classifier sees
    model.eval()
    logits, feats = model(torch.randn(2, 3, 32, 32))
    assert torch.allclose(model.classifier(feats), logits)
    assert (feats >= 0).all()


@pytest.mark.parametrize("name,dim,head",
                         [("resnet18", 512, "fc."), ("mobilenet_v2", 1280, "classifier.")])
def test_torchvision_backbone_is_headless(name, dim, head):
    net, feature_dim = build_backbone(name, "none")
    assert feature_dim == dim
    assert not any(k.startswith(head) for k in net.state_dict())
    assert net.eval()(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def _save(sd, path: Path) -> str:
    torch.save(sd, path)
    return str(path)


def _perturbed_resnet18_state(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = torchvision.models.resnet18().state_dict()
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = v + 0.1 * torch.rand(v.shape, generator=g)  # running_var stays positive
    return sd


def test_path_weights_load_exactly_and_bin_starts_from_bn(tmp_path):
    sd = _perturbed_resnet18_state()
    del sd["fc.weight"], sd["fc.bias"]  # a feature-extractor state dict may lack the head
    path = _save(sd, tmp_path / "r18.pth")
    torch.manual_seed(0)
    bn = build_model(_cfg(backbone="resnet18", pretrained=path, norm="bn"), 5).eval()
    for k, v in bn.backbone.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), k
    torch.manual_seed(0)
    bin_ = build_model(_cfg(backbone="resnet18", pretrained=path, norm="bin"), 5).eval()
    gates = list(gate_parameters(bin_))
    assert len(gates) == sum(isinstance(m, nn.BatchNorm2d) for m in bn.backbone.modules())
    with torch.no_grad():
        for g in gates:
            g.fill_(1.0)  # rho = 1: pure batch branch = the pretrained BN
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(bin_.backbone(x), bn.backbone(x), rtol=1e-4, atol=1e-5)


def test_path_weights_key_mismatch_is_a_user_error(tmp_path):
    sd = _perturbed_resnet18_state()
    sd["extra.weight"] = torch.zeros(1)
    del sd["layer1.0.conv1.weight"]
    path = _save(sd, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        build_backbone("resnet18", path)
    msg = str(e.value)
    assert str(path) in msg and "extra.weight" in msg and "layer1.0.conv1.weight" in msg
    assert "\n" not in msg


def test_path_weights_wrong_architecture(tmp_path):
    path = _save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="does not fit"):
        build_backbone("resnet34", path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_path_weights_unreadable(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match="junk.pth"):
        build_backbone("resnet18", str(path))
    with pytest.raises(UserError, match="no such file"):
        build_backbone("resnet18", str(tmp_path / "absent.pth"))


def test_digitnet_has_no_imagenet_weights():
    with pytest.raises(UserError, match="digitnet"):
        build_backbone("digitnet", "imagenet")


@needs_mobilenet
def test_shared_mobilenet_weights_load_through_path():
    sd = torch.load(MOBILENET_WEIGHTS, weights_only=True)
    cfg = _cfg(backbone="mobilenet_v2", pretrained=str(MOBILENET_WEIGHTS), norm="bn")
    model = build_model(cfg, 7)
    own = model.backbone.state_dict()
    assert len(sd) == 312 and all(torch.equal(own[k], v) for k, v in sd.items())
    # genuine ImageNet statistics were carried, not the constructor's (0, 1)
    var = own["features.0.1.running_var"]
    assert not torch.equal(var, torch.ones_like(var))


def _online() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_online(), reason="only meaningful offline (would download 45 MB)")
def test_imagenet_offline_fails_fast_with_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        build_backbone("resnet18", "imagenet")
    assert time.monotonic() - t0 < 30
    assert "--pretrained PATH" in str(e.value) and "\n" not in str(e.value)


def test_download_times_out_on_a_silent_server(tmp_path, monkeypatch):
    """A host that accepts the connection but never answers must not hang the run."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(backbones_base, "DOWNLOAD_TIMEOUT_S", 0.5)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # the kernel completes the handshake; nobody ever replies
    url = f"http://127.0.0.1:{server.getsockname()[1]}/resnet18-f37072fd.pth"

    class SilentWeights:
        def get_state_dict(self, **kw):
            return torch.hub.load_state_dict_from_url(url, **kw)

    t0 = time.monotonic()
    try:
        with pytest.raises(UserError, match="--pretrained PATH"):
            backbones_base.download_state_dict(SilentWeights(), "resnet18")  # type: ignore[arg-type]
    finally:
        server.close()
    assert time.monotonic() - t0 < 10
    assert socket.getdefaulttimeout() is None  # the process-wide default was restored
