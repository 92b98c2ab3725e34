"""AdaBN: BN / BIN running statistics re-estimated on target batches, original untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from domadapt.nn import BatchInstanceNorm2d
from domadapt.nn.adabn import adapt_batch_stats, has_batch_stats


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 2, 1, bias=False),
        nn.Dropout(0.5),  # must stay in eval mode while the statistics are gathered
        BatchInstanceNorm2d(2),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 4),
        nn.BatchNorm1d(4),
    )
    with torch.no_grad():
        for m in (net[0], net[3], net[6]):
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
        net[3].rho.copy_(torch.tensor([0.3, 0.8]))
    return net.train()


def _batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 3 for n in (5, 3, 4)]


def _pooled(xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance over all samples and positions, by hand."""
    flat = torch.cat([x.transpose(0, 1).reshape(x.size(1), -1) for x in xs], dim=1)
    mean = flat.sum(1) / flat.size(1)
    var = ((flat - mean[:, None]) ** 2).sum(1) / (flat.size(1) - 1)
    return mean, var


def _bn_batch(x: Tensor, layer: nn.Module) -> Tensor:
    """The first layer in train mode: normalised by the batch's own (biased) statistics."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    w, b = layer.weight.view(1, -1, 1, 1), layer.bias.view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + layer.eps) * w + b


def test_running_stats_equal_the_target_statistics_computed_by_hand():
    net = _net().double()
    batches = _batches()
    adapted = adapt_batch_stats(net, batches)
    # Layer 0 sees the raw target data.
    mean, var = _pooled(batches)
    torch.testing.assert_close(adapted[0].running_mean, mean)
    torch.testing.assert_close(adapted[0].running_var, var)
    # The BIN layer sees conv(BN_batch(x)), each batch normalised by its own statistics.
    with torch.no_grad():
        inputs = [net[1](_bn_batch(x, net[0])) for x in batches]
    mean, var = _pooled(inputs)
    torch.testing.assert_close(adapted[3].running_mean, mean)
    torch.testing.assert_close(adapted[3].running_var, var)
    assert int(adapted[3].num_batches_tracked) == 3
    # Not the per-batch average that momentum=None would give.
    per_batch = torch.stack([x.var((0, 2, 3)) for x in batches]).mean(0)
    assert not torch.allclose(adapted[0].running_var, per_batch)


def test_everything_else_is_unchanged_and_the_original_untouched():
    net = _net().double()
    net[0].eval()  # a mixed train/eval state must come back as it was
    before = copy.deepcopy(net.state_dict())
    flags = [m.training for m in net.modules()]
    adapted = adapt_batch_stats(net, [(x, torch.zeros(len(x))) for x in _batches()])
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [m.training for m in net.modules()] == flags
    assert [m.training for m in adapted.modules()] == flags
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in adapted.state_dict().items():
        if key.rsplit(".", 1)[1] in stats:
            assert not torch.equal(value, before[key]), key  # every BN / BIN layer adapted
        else:
            assert torch.equal(value, before[key]), key  # weights, biases, BIN gates


def test_adapted_eval_on_a_single_batch_equals_train_mode_normalisation():
    # With one target batch the adapted running mean is that batch's mean, so in eval the
    # first layer's output differs from the batch-statistics output only by the unbiased
    # vs biased variance (factor n / (n - 1)).
    net = _net().double()
    x = _batches()[0]
    adapted = adapt_batch_stats(net, [x]).eval()
    n = x.numel() // x.size(1)
    with torch.no_grad():
        out = adapted[0](x)
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True) * n / (n - 1)
        w, b = net[0].weight.view(1, -1, 1, 1), net[0].bias.view(1, -1, 1, 1)
        expected = (x - mean) / torch.sqrt(var + net[0].eps) * w + b
    torch.testing.assert_close(out, expected)


def test_instance_norm_networks_have_nothing_to_adapt():
    assert not has_batch_stats(nn.Sequential(nn.Conv2d(3, 2, 1), nn.InstanceNorm2d(2)))
    assert has_batch_stats(_net())


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        adapt_batch_stats(_net(), [])


def test_a_last_batch_of_one_sample_joins_the_one_before():
    """A target of 4 x 2 + 1 images with batch 2 made the 1-d BatchNorm raise after a whole
    run ("Expected more than 1 value per channel"); the single sample now joins the batch
    before it and still counts in the statistics."""
    net = _net().double()
    batches = _batches() + [_batches()[0][:1]]
    adapted = adapt_batch_stats(net, batches)
    mean, var = _pooled(batches)
    torch.testing.assert_close(adapted[0].running_mean, mean)
    torch.testing.assert_close(adapted[0].running_var, var)
    assert int(adapted[3].num_batches_tracked) == 3


def test_statistics_pass_leaves_the_target_batches_untouched():
    # the moments are taken in place in a float64 copy: never in a float64 input itself
    batches = _batches()
    kept = [b.clone() for b in batches]
    adapt_batch_stats(_net().double(), batches)
    assert all(torch.equal(b, k) for b, k in zip(batches, kept, strict=True))


def test_one_batch_gives_the_two_pass_float64_moments_bit_for_bit():
    x = _batches()[0].float()
    bn = nn.BatchNorm2d(3).train()
    adapted = adapt_batch_stats(nn.Sequential(bn), [x])[0]
    xd = x.double()
    mean = xd.mean((0, 2, 3))
    var = (xd - mean[None, :, None, None]).square().sum((0, 2, 3)) / (xd.numel() // 3 - 1)
    assert torch.equal(adapted.running_mean, mean.float())
    assert torch.equal(adapted.running_var, var.float())


def test_eval_loader_with_a_seed_reads_every_sample_once_in_one_fixed_random_order():
    from domadapt.data.loaders import eval_loader, fixed_order

    data = torch.utils.data.TensorDataset(torch.arange(40.0), torch.zeros(40))
    read = [torch.cat([x for x, _ in eval_loader(data, 8, seed=s)]).long().tolist()
            for s in (3, 3, 4)]
    assert sorted(read[0]) == list(range(40)) and read[0] != list(range(40))
    assert read[0] == read[1] == fixed_order(40, 3) != read[2]
    ordered = torch.cat([x for x, _ in eval_loader(data, 8)]).long().tolist()
    assert ordered == list(range(40))  # without a seed: the dataset's order


def test_batches_of_one_class_bias_the_later_layers_and_a_random_order_does_not():
    """Each layer normalises its batch by the batch's statistics during the pass, so a later
    layer's estimate is right only when batches represent the domain. Reference: the exact,
    layer-consistent statistics (layer 2's input with layer 1 normalised by layer 1's pooled
    statistics, as the adapted network computes at evaluation)."""
    from domadapt.data.loaders import fixed_order

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)).double().train()
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 3, 1, 1, generator=g, dtype=torch.float64) * 3  # 4 classes, far apart
    x = torch.cat([m + torch.randn(64, 3, 2, 2, generator=g, dtype=torch.float64)
                   for m in means])  # class-sorted, as a folder-per-class dataset lists them
    with torch.no_grad():
        mean1, var1 = _pooled([net[0](x)])
        h = torch.relu((net[0](x) - mean1.view(1, -1, 1, 1))
                       / torch.sqrt(var1.view(1, -1, 1, 1) + net[1].eps))
        exact_mean2, _ = _pooled([net[3](h)])

    def error(order: list[int]) -> float:
        adapted = adapt_batch_stats(net, list(x[order].split(64)))
        torch.testing.assert_close(adapted[1].running_mean, mean1)  # layer 1: any order
        return float((adapted[4].running_mean - exact_mean2).abs().max())

    sorted_error, shuffled_error = error(list(range(len(x)))), error(fixed_order(len(x), 0))
    assert sorted_error > 10 * shuffled_error
