"""DSBN and the domain channel: the layer against a naive per-domain BN, BN carry-over,
evaluation (labelled and unlabelled), what labels methods and the trainer give, refusals where a
sample's domain is undefined, and a tiny DANN train that resumes bit-identically."""

from __future__ import annotations

import copy

import pytest
import torch
from test_cdan import kill_and_resume_matches, tiny_config, write_tiny_tree
from torch import nn

from domadapt.backbones import build_backbone
from domadapt.nn.domains import SOURCE, TARGET, concat_domains, domain_labels
from domadapt.norms import convert_norm, get_norm, norm_hparams
from domadapt.norms.dsbn import DomainSpecificBatchNorm2d


def _dsbn(c: int = 3) -> tuple[nn.BatchNorm2d, DomainSpecificBatchNorm2d]:
    """A BN with random statistics and its DSBN, whose branches then get distinct affines."""
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
    layer = get_norm("dsbn").build(copy.deepcopy(bn), norm_hparams("dsbn"))
    return bn, layer


def _naive(x, labels, layer, *, train):
    """Loops: sample i by branch labels[i], batch moments over that domain's samples."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        br = layer.branches[int(labels[i])]
        same = x[labels == labels[i]]
        for k in range(x.shape[1]):
            if train:
                mu, var = same[:, k].mean(), same[:, k].var(unbiased=False)
            else:
                mu, var = br.running_mean[k], br.running_var[k]
            out[i, k] = (x[i, k] - mu) / torch.sqrt(var + br.eps) * br.weight[k] + br.bias[k]
    return out


def test_layer_equals_a_naive_per_domain_bn_and_keeps_statistics_apart():
    bn, layer = _dsbn()
    with torch.no_grad():
        layer.branches[1].weight.mul_(2.0)
        layer.branches[1].bias.add_(0.5)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    x[[1, 2, 4]] += 3.0  # the target rows are shifted
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    with domain_labels(layer, labels):
        torch.testing.assert_close(layer.train()(x), _naive(x, labels, layer, train=True))
        # each branch's running statistics moved with its own samples only
        for d in (SOURCE, TARGET):
            torch.testing.assert_close(
                layer.branches[d].running_mean,
                0.9 * bn.running_mean + 0.1 * x[labels == d].mean((0, 2, 3)))
        torch.testing.assert_close(layer.eval()(x), _naive(x, labels, layer, train=False))
    assert layer.domains is None  # the block restored it


def test_gradients_reach_only_the_branches_of_the_domains_present():
    _, layer = _dsbn()
    with domain_labels(layer, SOURCE):
        layer.train()(torch.randn(4, 3, 4, 4)).square().sum().backward()
    assert layer.branches[SOURCE].weight.grad is not None
    assert layer.branches[TARGET].weight.grad is None


def test_both_branches_start_as_the_pretrained_bn():
    bn_net, _ = build_backbone("digitnet", "none")
    for m in bn_net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    net = convert_norm(copy.deepcopy(bn_net), "dsbn")
    assert sum(isinstance(m, DomainSpecificBatchNorm2d) for m in net.modules()) == 3
    x = torch.randn(4, 3, 32, 32)
    bn_net.eval(), net.eval()
    for d in (SOURCE, TARGET, None):  # None at evaluation: the target's branch
        with domain_labels(net, d):
            torch.testing.assert_close(net(x), bn_net(x))
    bn_net.train(), net.train()
    with domain_labels(net, TARGET):  # a batch of one domain trains like BN
        torch.testing.assert_close(net(x), bn_net(x))
    assert convert_norm(net, "dsbn").features[1] is net.features[1]  # twice: a no-op


def test_unlabelled_evaluation_uses_the_target_branch_and_training_refuses():
    _, layer = _dsbn()
    with torch.no_grad():
        layer.branches[TARGET].bias.add_(1.0)
    x = torch.randn(2, 3, 4, 4)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.branches[TARGET](x))
    with pytest.raises(RuntimeError, match="without domain labels"):
        layer.train()(x)
    with domain_labels(layer, torch.tensor([0, 1, 1])), pytest.raises(RuntimeError, match="3"):
        layer(x)


def test_concat_domains_and_nested_labels():
    x, labels = concat_domains(torch.zeros(2, 1), torch.ones(3, 1))
    assert labels.tolist() == [SOURCE, SOURCE, TARGET, TARGET, TARGET]
    assert x[:, 0].tolist() == [0, 0, 1, 1, 1]
    _, layer = _dsbn()
    with domain_labels(layer, SOURCE):
        with domain_labels(layer, None):
            assert layer.domains == SOURCE
        with domain_labels(layer, TARGET):
            assert layer.domains == TARGET
        assert layer.domains == SOURCE


class _Spy:
    """Records the labels every DSBN layer of a model sees, with the layer's mode."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple[bool, object]] = []
        forward = DomainSpecificBatchNorm2d.forward

        def spy(layer, x):
            d = layer.domains
            self.seen.append((layer.training, d.tolist() if torch.is_tensor(d) else d))
            return forward(layer, x)

        monkeypatch.setattr(DomainSpecificBatchNorm2d, "forward", spy)


@pytest.mark.parametrize("method", ["dann", "mcd", "adda"])
def test_methods_and_the_trainer_label_every_forward(tmp_path, monkeypatch, method):
    from domadapt.train import run

    spy = _Spy(monkeypatch)
    tree = write_tiny_tree(tmp_path / "data")
    cfg = tiny_config(tree, method).replace(norm="dsbn", norm_options={}, iters=2,
                                            eval_every=2, adabn=True)
    run(cfg, tmp_path / "r", device="cpu", quiet=True)
    train = [d for training, d in spy.seen if training]
    assert train and all(d is not None for d in train)
    assert [SOURCE] * 6 + [TARGET] * 6 in train or method == "adda"
    if method == "adda":  # pre-training: source; adaptation: source encoder, target encoder
        assert SOURCE in train and TARGET in train
    evals = {d for training, d in spy.seen if not training}
    assert evals == {SOURCE, TARGET}  # source and target sets, AdaBN's target pass


def test_source_only_with_dsbn_is_one_line(tmp_path, run_cli):
    tree = write_tiny_tree(tmp_path / "data")
    base = ["train", "--preset", "styledigits", "--dataset", "folder", "--root", tree,
            "--source", "alpha", "--target", "beta", "--norm", "dsbn", "--iters", "2",
            "--out", tmp_path / "r", "--quiet"]
    code, _out, err = run_cli(*base, "--method", "source-only")
    assert code != 0 and err.startswith("error:") and err.count("\n") == 1, err
    assert "--norm dsbn needs a method that trains on target images" in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_multidomain_with_dsbn_is_one_line(tmp_path, run_cli):
    tree = write_tiny_tree(tmp_path / "data")
    code, _out, err = run_cli("multidomain", "--preset", "styledigits", "--dataset", "folder",
                              "--root", tree, "--norm", "dsbn", "--iters", "2",
                              "--out", tmp_path / "m", "--quiet")
    assert code != 0 and err.count("\n") == 1, err
    assert "--norm dsbn needs each training image's domain" in err


def test_dann_with_dsbn_resumes_bit_identically(tmp_path, monkeypatch):
    tree = write_tiny_tree(tmp_path / "data")
    cfg = tiny_config(tree, "dann").replace(norm="dsbn", norm_options={})
    ckpt = kill_and_resume_matches(cfg, tmp_path, monkeypatch)
    state = ckpt["method"]
    src = state["model.backbone.features.1.branches.0.running_mean"]
    tgt = state["model.backbone.features.1.branches.1.running_mean"]
    assert not torch.equal(src, tgt)  # each domain's own statistics


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["ibn", "mixstyle", "dsbn"])
def test_style_norms_on_cuda_bf16_channels_last(kind):
    """Converted, the network is BN's at evaluation (IBN: but for its IN channels); a labelled
    [source; target] batch trains (finite bf16 outputs and gradients, the same outputs from
    the same seed)."""
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet18().cuda().to(memory_format=torch.channels_last).eval()
    options = {"mixstyle_p": 1.0} if kind == "mixstyle" else {}
    net = convert_norm(copy.deepcopy(base), kind, options)
    x, labels = concat_domains(*(torch.randn(4, 3, 64, 64, device="cuda")
                                 .to(memory_format=torch.channels_last) for _ in range(2)))
    if kind != "ibn":
        with torch.no_grad(), domain_labels(net, TARGET):
            torch.testing.assert_close(net(x), base(x))
    net.train()
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        with torch.autocast("cuda", dtype=torch.bfloat16), domain_labels(net, labels):
            y = net(x)
        y.float().square().mean().backward()
        outs.append(y.float())
    assert outs[0].dtype == torch.float32 and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
