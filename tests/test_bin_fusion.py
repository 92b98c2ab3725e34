"""Norm + activation in one pass (`domadapt.nn.bin_fusion`): a BIN layer with its ReLU / ReLU6
fused gives the bits of BIN followed by nn.ReLU / nn.ReLU6 (inplace, as torchvision builds
them): outputs, every gradient and the running statistics, C and torch paths, both layouts,
float32 and float64, train and eval, outputs exactly on the clamp bounds; in a whole
MobileNetV2; traced by torch.compile; and converting a fused network keeps its activations."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from test_bin_op import tiny_network
from torch import Tensor, nn

from domadapt.nn import BatchInstanceNorm2d, batch_instance_norm
from domadapt.nn import bin_kernel as kernels
from domadapt.nn.bin_fusion import FusedActivation, fuse_activations, unfuse_activations
from domadapt.norms import convert_norm

MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6}


@pytest.fixture(params=["c", "torch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch":
        monkeypatch.setattr(kernels, "_c_library", lambda: None)
    elif kernels._c_library() is None:
        pytest.skip("C kernels unavailable here (no C compiler, or DOMADAPT_BIN_KERNEL=torch)")
    return request.param


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool,
            seed: int) -> list[Tensor]:
    """x spread so that the output crosses 0 and 6; channel 0 has weight 0, bias 0 (y exactly
    0: ReLU's bound) and channel 1 weight 0, bias 6 (y exactly 6: ReLU6's upper bound)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3
         + torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    rho = torch.rand(c, generator=g, dtype=dtype)
    weight = torch.rand(c, generator=g, dtype=dtype) * 4 + 0.5
    bias = torch.randn(c, generator=g, dtype=dtype) * 3
    weight[:2], bias[:2] = 0.0, torch.tensor([0.0, 6.0], dtype=dtype)
    return [x, rho, weight, bias, torch.randn(c, generator=g, dtype=dtype),
            torch.rand(c, generator=g, dtype=dtype) + 0.5]


def _step(inputs: list[Tensor], training: bool, activation: str, fused: bool,
          g_like_y: bool) -> list[Tensor]:
    x, rho, weight, bias, mean, var = (t.clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (x, rho, weight, bias)]
    if fused:
        y = batch_instance_norm(x, rho, mean, var, weight, bias, training, 0.1, 1e-5,
                                activation)
    else:
        y = MODULES[activation](inplace=True)(
            batch_instance_norm(x, rho, mean, var, weight, bias, training, 0.1, 1e-5))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    g = torch.empty_like(y).copy_(g) if g_like_y else g
    return [y, *torch.autograd.grad(y, leaves, g), mean, var]


def assert_same_bits(a: list[Tensor], b: list[Tensor], what: str) -> None:
    names = ("y", "dx", "drho", "dweight", "dbias", "running_mean", "running_var")
    for name, u, v in zip(names, a, b, strict=True):
        assert u.dtype == v.dtype and u.stride() == v.stride(), f"{what}: {name}"
        assert torch.equal(u, v) and torch.equal(u.signbit(), v.signbit()), \
            f"{what}: {name} differs by {(u - v).abs().max().item():.3g}"


SHAPES = [(4, 6, 7, 9), (3, 5, 1, 1), (2, 9, 11, 13), (5, 4, 8, 8), (1, 6, 3, 70),
          (2, 3, 48, 48)]


@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_equals_bin_then_activation(kernel, dtype, channels_last, activation):
    for i, shape in enumerate(SHAPES):
        for training in (True, False):
            if training and shape[0] * shape[2] * shape[3] <= 1:
                continue
            inputs = _inputs(shape, dtype, channels_last, seed=i)
            fused = _step(inputs, training, activation, True, g_like_y=i % 2 == 0)
            assert (fused[0] == 0).any() and (activation == "relu" or (fused[0] == 6).any())
            unfused = _step(inputs, training, activation, False, g_like_y=i % 2 == 0)
            assert_same_bits(fused, unfused, f"{shape}, training={training}")


def test_fused_equals_unfused_on_two_threads(kernel, monkeypatch):
    """The C kernels' threads each mask their own rows (NCHW needs a row buffer per thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for channels_last in (False, True):
            inputs = _inputs((4, 8, 9, 10), torch.float32, channels_last, seed=3)
            assert_same_bits(_step(inputs, True, "relu6", True, g_like_y=True),
                             _step(inputs, True, "relu6", False, g_like_y=True),
                             f"channels_last={channels_last}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_mobilenet_equals_the_unfused_one(kernel, channels_last):
    """A whole MobileNetV2 (width 0.25): every Conv-BIN-ReLU6 fused, outputs, every
    parameter's gradient and the running statistics bit for bit, training then evaluation."""
    plain = tiny_network("bin", channels_last)
    fused = copy.deepcopy(plain)
    count = fuse_activations(fused)
    assert count == sum(isinstance(m, FusedActivation) for m in fused.modules()) == 35
    assert not any(isinstance(m, nn.ReLU6) for m in fused.modules())
    assert "activation=relu6" in repr(fused.features[0])
    x = torch.randn(4, 3, 48, 48)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    def forward(model: nn.Module) -> Tensor:
        torch.manual_seed(1)  # the same dropout masks
        return model(x)

    for model in (plain, fused):
        model.zero_grad()
        forward(model).square().sum().backward()
    assert torch.equal(forward(plain.train()), forward(fused.train()))
    assert torch.equal(forward(plain.eval()), forward(fused.eval()))
    for (name, a), b in zip(plain.state_dict().items(), fused.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_traced_fused_operator_gives_the_eager_bits(kernel):
    torch._dynamo.reset()

    def fn(x, rho, weight, bias, mean, var, training):  # type: ignore[no-untyped-def]
        return batch_instance_norm(x, rho, mean, var, weight, bias, training, 0.1, 1e-5,
                                   "relu6")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    inputs = _inputs((4, 6, 7, 9), torch.float32, True, seed=0)
    for training in (True, False):
        runs = []
        for f in (fn, compiled):
            x, rho, weight, bias, mean, var = (t.clone() for t in inputs)
            leaves = [t.requires_grad_() for t in (x, rho, weight, bias)]
            y = f(x, rho, weight, bias, mean, var, training)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            g = torch.empty_like(y).copy_(g)
            runs.append([y, *torch.autograd.grad(y, leaves, g), mean, var])
        assert_same_bits(runs[1], runs[0], f"training={training}")


def test_converting_a_fused_network_keeps_its_activations():
    """BIN (fused) -> BN puts every ReLU6 back: the network equals the BN one it came from;
    a lone BIN layer with a fused activation becomes BN followed by it."""
    torch.manual_seed(0)
    bn = torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.25).eval()
    model = convert_norm(copy.deepcopy(bn), "bin")
    assert fuse_activations(model) == 35
    convert_norm(model, "bn")
    assert [type(m) for m in model.modules()] == [type(m) for m in bn.modules()]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), bn(x))
    assert unfuse_activations(model) == 0
    lone = convert_norm(BatchInstanceNorm2d(4, activation="relu"), "bn")
    assert isinstance(lone, nn.Sequential) and isinstance(lone[1], nn.ReLU)


def test_run_models_are_built_fused():
    from domadapt.config import make_config
    from domadapt.models import build_model

    cfg = make_config("styledigits", source="color", target="gray", norm="bin")
    backbone = build_model(cfg, 10).backbone
    fused = [m for m in backbone.modules() if isinstance(m, BatchInstanceNorm2d)
             and m.activation != "none"]
    assert fused and len(fused) == sum(isinstance(m, FusedActivation) for m in backbone.modules())
    bn = build_model(make_config("styledigits", source="color", target="gray"), 10).backbone
    assert not any(isinstance(m, FusedActivation) for m in bn.modules())
