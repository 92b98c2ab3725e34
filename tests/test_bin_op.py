"""BIN as custom operators (`domadapt::bin_forward`, `domadapt::bin_backward`): traced, the
eager bits; the operators pass `torch.library.opcheck`; a compiled BIN network has no graph
break. (That the operators changed no number of a run, against the autograd Function they
replaced, was checked once with benchmarks/same_metrics.py: benchmarks/README.md.)"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from domadapt.nn import BatchInstanceNorm2d, batch_instance_norm
from domadapt.nn import bin_kernel as kernels
from domadapt.nn.bin_fusion import fuse_activations
from domadapt.norms import convert_norm

C = 5


@pytest.fixture(params=["c", "torch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Through the C kernels, or through the torch path."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "_c_library", lambda: None)
    elif kernels.kernel_info()["kernel"] != "c":
        pytest.skip("C kernels unavailable here (no C compiler, or DOMADAPT_BIN_KERNEL=torch)")
    return request.param


def _inputs(seed: int, dtype: torch.dtype, channels_last: bool) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, C, 6, 7, generator=g, dtype=torch.float64)
         * torch.rand(4, C, 1, 1, generator=g, dtype=torch.float64).add(0.5)
         + torch.randn(4, C, 1, 1, generator=g, dtype=torch.float64)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    rho, weight = torch.rand(C, generator=g, dtype=dtype), torch.rand(C, generator=g, dtype=dtype)
    return [x, rho, weight.add(0.5), torch.randn(C, generator=g, dtype=dtype),
            torch.randn(C, generator=g, dtype=dtype), torch.rand(C, generator=g, dtype=dtype) + 0.5]


def _run(fn, inputs: list[Tensor], training: bool, seed: int,  # type: ignore[no-untyped-def]
         g_like_y: bool = True) -> list[Tensor]:
    """y, dx, drho, dweight, dbias and the running statistics after one step of `fn`; the
    gradient laid out like y, or (not `g_like_y`) NCHW whatever y is."""
    x, rho, weight, bias, mean, var = (t.clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (x, rho, weight, bias)]
    y = fn(x, rho, weight, bias, mean, var, training)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    g = torch.empty_like(y).copy_(g) if g_like_y else g
    return [y, *torch.autograd.grad(y, leaves, g), mean, var]


def _new(x, rho, weight, bias, mean, var, training):  # type: ignore[no-untyped-def]
    return batch_instance_norm(x, rho, mean, var, weight, bias, training, 0.1, 1e-5)


def assert_same_bits(a: list[Tensor], b: list[Tensor], what: str) -> None:
    names = ("y", "dx", "drho", "dweight", "dbias", "running_mean", "running_var")
    for name, u, v in zip(names, a, b, strict=True):
        assert u.dtype == v.dtype and u.stride() == v.stride(), f"{what}: {name}"
        assert torch.equal(u, v), f"{what}: {name} differs by {(u - v).abs().max().item():.3g}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_traced_operator_gives_the_eager_bits(kernel, dtype, channels_last):
    """Under torch.compile (aot_eager: the traced graph run by the operators themselves) a
    training step gives the eager bits: forward, all gradients, running statistics. (The
    gradient is laid out like y: the compiled backward takes it in y's layout, and the torch
    path's sums round by the layout they run in.)"""
    torch._dynamo.reset()
    compiled = torch.compile(_new, backend="aot_eager", fullgraph=True)
    for training in (True, False):
        inputs = _inputs(0, dtype, channels_last)
        assert_same_bits(_run(compiled, inputs, training, 0), _run(_new, inputs, training, 0),
                         f"training={training}")


@pytest.mark.parametrize("activation", ["none", "relu6"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_operators_pass_opcheck(kernel, channels_last, activation):
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration and
    tracing with dynamic shapes, as `torch.library.opcheck` checks them."""
    for training in (True, False):
        x, rho, weight, bias, mean, var = _inputs(0, torch.float64, channels_last)
        args = (x.requires_grad_(), rho.requires_grad_(), weight.requires_grad_(),
                bias.requires_grad_(), mean, var, training, 0.1, 1e-5, activation)
        torch.library.opcheck(torch.ops.domadapt.bin_forward.default, args)
        y, save, _, _ = torch.ops.domadapt.bin_forward(*args)
        y = y.detach() if activation != "none" else None
        g = torch.randn_like(x)
        c_kernel = kernel == "c"
        torch.library.opcheck(torch.ops.domadapt.bin_backward.default,
                              (g, x.detach(), rho.detach(), weight.detach(), save, y, c_kernel,
                               training, True, activation))


def tiny_network(norm: str, channels_last: bool = False) -> nn.Module:
    """A small torchvision MobileNetV2 (width 0.25) with `norm` layers, in training mode."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.25)
    if norm != "bn":
        convert_norm(model, norm)
    for layer in model.modules():
        if isinstance(layer, BatchInstanceNorm2d):
            with torch.no_grad():
                layer.rho.uniform_(0.2, 0.8)
    model.train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


@pytest.mark.parametrize("norm", ["bn", "bin", "bin+act", "in"])
def test_no_graph_break_in_the_backbone(norm):
    """torch._dynamo.explain over a whole training forward: one graph, no break (BIN is one
    custom op, with or without its activation fused; IN and BN are torch's own)."""
    torch._dynamo.reset()
    model = tiny_network(norm.removesuffix("+act")).train()
    if norm == "bin+act":
        assert fuse_activations(model) == 35
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1
