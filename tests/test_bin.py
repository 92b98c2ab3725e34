"""BatchInstanceNorm2d, convert_norm, gate helpers (the optimizer rules: test_optim.py)."""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from domadapt.errors import UserError
from domadapt.nn import (
    BatchInstanceNorm2d,
    batch_instance_norm,
    gate_parameters,
    gate_values,
    mean_gate,
)
from domadapt.nn import bin_kernel as kernels
from domadapt.norms import convert_norm

C = 5


class ReferenceBIN(nn.Module):
    """BIN written from the paper: full BN and full IN, mixed by rho (autograd backward)."""

    def __init__(self, bin_layer: BatchInstanceNorm2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(bin_layer.weight.detach().clone())
        self.bias = nn.Parameter(bin_layer.bias.detach().clone())
        self.rho = nn.Parameter(bin_layer.rho.detach().clone())
        self.running_mean = bin_layer.running_mean.clone()
        self.running_var = bin_layer.running_var.clone()
        self.momentum, self.eps = bin_layer.momentum, bin_layer.eps

    def forward(self, x: Tensor) -> Tensor:
        x_b = F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training,
                           self.momentum, self.eps)
        x_i = F.instance_norm(x, eps=self.eps)
        rho, w, b = (t[:, None, None] for t in (self.rho, self.weight, self.bias))
        return w * (rho * x_b + (1 - rho) * x_i) + b


def random_bin(dtype: torch.dtype = torch.float64, momentum: float | None = 0.1) -> BatchInstanceNorm2d:
    layer = BatchInstanceNorm2d(C, momentum=momentum).to(dtype)
    with torch.no_grad():
        layer.rho.uniform_(0.05, 0.95)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    return layer


def batch(seed: int, dtype: torch.dtype, channels_last: bool = False, shape=(4, C, 6, 7)) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    # Non-zero, sample- and channel-dependent means and scales: BN and IN statistics differ.
    x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(
        shape[0], shape[1], 1, 1, generator=g, dtype=torch.float64).add(0.5) + torch.randn(
        shape[0], shape[1], 1, 1, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def tols(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 2e-5}


@pytest.fixture(params=["c", "torch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a CPU test through the compiled C kernels and through the pure-torch path."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "_c_library", lambda: None)
    elif kernels._c_library() is None:
        pytest.skip("C kernels unavailable here (no C compiler, or DOMADAPT_BIN_KERNEL=torch)")
    return request.param


def check_matches_reference(training: bool, dtype: torch.dtype, channels_last: bool,
                            device: str = "cpu", kernel: str = "torch") -> None:
    """Outputs, all gradients and running statistics over several steps equal the reference."""
    fused = random_bin(dtype).to(device).train(training)
    ref = ReferenceBIN(fused).train(training)
    for step in range(3):
        x = batch(step, dtype, channels_last).to(device).requires_grad_()
        uses_c = kernels.c_library_for(x, fused.rho, fused.weight, fused.bias) is not None
        assert uses_c == (kernel == "c")
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = fused(x), ref(x_ref)
        torch.testing.assert_close(y, y_ref, **tols(dtype))
        assert y.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, fused.rho, fused.weight, fused.bias], g)
        grads_ref = torch.autograd.grad(y_ref, [x_ref, ref.rho, ref.weight, ref.bias], g)
        for name, a, b in zip(("x", "rho", "weight", "bias"), grads, grads_ref):
            torch.testing.assert_close(a, b, **tols(dtype), msg=lambda m, n=name: f"d{n}: {m}")
        assert grads[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(fused.running_mean, ref.running_mean, **tols(dtype))
    torch.testing.assert_close(fused.running_var, ref.running_var, **tols(dtype))
    assert fused.num_batches_tracked.item() == (3 if training else 0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(training: bool, dtype: torch.dtype, channels_last: bool,
                           kernel: str) -> None:
    check_matches_reference(training, dtype, channels_last, "cpu", kernel)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_unusual_inputs_and_gradients(channels_last: bool, kernel: str) -> None:
    """A non-contiguous input, an expanded gradient and a gradient laid out unlike the input
    give what the reference gives."""
    fused = random_bin(torch.float32).train()
    ref = ReferenceBIN(fused).train()
    wide = batch(0, torch.float32, channels_last, shape=(4, C, 6, 14))
    for x, how in ((wide[..., ::2], "strided"), (batch(1, torch.float32, channels_last), "expanded"),
                   (batch(2, torch.float32, channels_last), "other-layout")):
        x = x.detach().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = fused(x), ref(x_ref)
        torch.testing.assert_close(y, y_ref, **tols(torch.float32))
        if how == "other-layout":
            g = torch.randn(y.shape).contiguous(
                memory_format=torch.contiguous_format if channels_last else torch.channels_last)
            grads = torch.autograd.grad(y, [x, fused.rho], g)
            grads_ref = torch.autograd.grad(y_ref, [x_ref, ref.rho], g)
        else:  # expanded: stride 0 along the batch
            g = torch.randn((1, *y.shape[1:])).expand(y.shape)
            grads = torch.autograd.grad(y, [x, fused.rho], g)
            grads_ref = torch.autograd.grad(y_ref, [x_ref, ref.rho], g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, **tols(torch.float32), msg=lambda m, h=how: f"{h}: {m}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float32_accuracy_with_large_offsets(channels_last: bool, kernel: str) -> None:
    """Per-sample means 100x the spread (a strong style shift), float32: outputs and gradients
    stay within 1e-4 of their scale from the float64 reference (no cancellation)."""
    fused = random_bin(torch.float32).train()
    ref = ReferenceBIN(copy.deepcopy(fused).double()).train()
    g0 = torch.Generator().manual_seed(3)
    x = torch.randn(8, C, 9, 9, generator=g0) + 100 * torch.randn(8, C, 1, 1, generator=g0)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, y64 = fused(x), ref(x64)
    g = torch.randn(y.shape, generator=g0)
    grads = torch.autograd.grad(y, [x, fused.rho, fused.weight], g)
    grads64 = torch.autograd.grad(y64, [x64, ref.rho, ref.weight], g.double())
    for name, a, b in zip(("y", "x", "rho", "weight"), (y, *grads), (y64, *grads64)):
        err = (a.double() - b).abs().max().item()
        assert err <= 1e-4 * b.abs().max().item(), (name, err)


def test_without_compiler_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No C compiler: no library, no error, and the layer still equals the reference."""
    monkeypatch.setattr(kernels, "_c_lib", None)
    monkeypatch.setattr(kernels, "_c_tried", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DOMADAPT_CACHE", str(tmp_path / "cache"))
    assert kernels._c_library() is None
    assert not (tmp_path / "cache").exists()
    check_matches_reference(True, torch.float32, True)


def test_c_kernels_build_into_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """With a compiler, the first use builds one library into the cache; the next reuses it."""
    if kernels._c_library() is None:
        pytest.skip("C kernels unavailable here (no C compiler, or DOMADAPT_BIN_KERNEL=torch)")
    monkeypatch.setattr(kernels, "_c_lib", None)
    monkeypatch.setattr(kernels, "_c_tried", False)
    monkeypatch.setenv("DOMADAPT_CACHE", str(tmp_path))
    assert kernels._c_library() is not None
    (built,) = tmp_path.iterdir()
    assert built.name.startswith("bin_kernels_") and built.suffix == ".so"
    monkeypatch.setattr(kernels, "_c_tried", False)
    assert kernels._c_library() is not None and list(tmp_path.iterdir()) == [built]


# sha256 of the kernel source. Change it only with the kernel, on purpose: a new source can
# change every BIN run's numerics. 060fac85... (the `_C_SOURCE` string of commit a1fa1e8) ->
# 34ef9f07... (issue #29: the activation fused into the norm; the kernels without one give
# the same bits as before, checked against a build of the old source by tests/test_bin_op.py).
KERNEL_SOURCE_SHA256 = "34ef9f07d8a4280d3fd900051cc6c37473975c7a37dc15d87c3a23f07d16451a"


def test_kernel_source_is_package_data_with_pinned_bytes() -> None:
    source = kernels.kernel_source()
    assert hashlib.sha256(source.encode()).hexdigest() == KERNEL_SOURCE_SHA256
    assert (Path(kernels.__file__).parent / "bin_kernels.c").read_bytes() == source.encode()


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A C-kernel state of its own for one test (restored afterwards); returns its cache dir."""
    monkeypatch.setattr(kernels, "_c_lib", None)
    monkeypatch.setattr(kernels, "_c_tried", False)
    monkeypatch.setattr(kernels, "_c_fns", dict(kernels._c_fns))
    monkeypatch.setattr(kernels, "_kernel", {})
    monkeypatch.delenv("DOMADAPT_BIN_KERNEL", raising=False)
    cache = tmp_path / "home" / "cache"
    monkeypatch.setenv("DOMADAPT_CACHE", str(cache))
    return cache


def fake_compiler(path: Path, body: str) -> Path:
    """An executable `cc` stand-in: prints a version for --version, else runs `body`."""
    path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "fakecc 1.0"; exit 0; fi\n'
                    f"{body}\n")
    path.chmod(0o755)
    return path


posix_only = pytest.mark.skipif(os.name != "posix", reason="the C kernels build on POSIX only")


@posix_only
@pytest.mark.parametrize("threat", ["group-writable", "other-writable", "foreign-owned"])
def test_untrusted_cached_library_is_refused(threat: str, fresh_kernel: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """A cached library that another user owns or may write is never loaded: the torch path,
    one line on stderr that says why; the cache directory is created private (0700)."""
    # a "compiler" that writes a library file without code: the first use fails to load it
    cc = fake_compiler(tmp_path / "cc", 'while [ $# -gt 0 ]; do [ "$1" = -o ] && : > "$2"; '
                                        "shift; done")
    monkeypatch.setenv("CC", str(cc))
    assert kernels._c_library() is None
    assert fresh_kernel.stat().st_mode & 0o777 == 0o700
    (lib,) = fresh_kernel.glob("bin_kernels_*.so")
    assert lib.stat().st_mode & 0o777 == 0o700
    capfd.readouterr()
    if threat == "foreign-owned":
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    else:
        lib.chmod(0o720 if threat == "group-writable" else 0o702)
    monkeypatch.setattr(kernels, "_c_tried", False)
    assert kernels._c_library() is None
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch path" in err[0] and "not owned by this user" in err[0]
    assert "set DOMADAPT_CACHE" in err[0]
    assert kernels.kernel_info()["kernel"] == "torch"


def test_openmp_flags_by_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Linux: -fopenmp. macOS: Homebrew's libomp where installed, else no threads (one flag
    set to try); the rest of the flags are the same everywhere."""
    common = ["-O3", *kernels._isa_flags(), "-ffp-contract=off", "-fno-math-errno"]
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert kernels.kernel_flags() == [*common, "-fopenmp", "-fPIC", "-shared"]
    assert kernels._flag_sets()[1] == [*common, "-fopenmp-simd", "-fPIC", "-shared"]

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(kernels, "HOMEBREW_PREFIXES", ())
    monkeypatch.setenv("HOMEBREW_PREFIX", str(tmp_path))
    assert kernels._flag_sets() == [[*common, "-fopenmp-simd", "-fPIC", "-shared"]]
    omp = tmp_path / "opt" / "libomp"
    (omp / "include").mkdir(parents=True)
    (omp / "include" / "omp.h").touch()
    assert kernels.kernel_flags() == [
        *common, "-Xpreprocessor", "-fopenmp", f"-I{omp / 'include'}", f"-L{omp / 'lib'}",
        "-lomp", "-fPIC", "-shared"]
    assert len(kernels._flag_sets()) == 2


@posix_only
def test_build_without_openmp_gives_the_same_results(fresh_kernel: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that rejects -fopenmp (Apple's clang) gets the kernels without threads
    (-fopenmp-simd), whose results on one thread equal the OpenMP build's bit for bit."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or "-fopenmp" not in kernels._flag_sets()[0]:
        pytest.skip("needs a C compiler with -fopenmp")

    def outputs() -> list[Tensor]:
        out = []
        torch.manual_seed(0)
        for channels_last in (False, True):
            layer = random_bin(torch.float32)
            x = batch(0, torch.float32, channels_last).requires_grad_()
            assert kernels.c_library_for(x, layer.rho, layer.weight, layer.bias) is not None
            y = layer(x)
            out += [y, *torch.autograd.grad(y, [x, layer.rho, layer.weight], torch.ones_like(y))]
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("CC", cc)
        with_openmp = outputs()
        assert "-fopenmp" in kernels.kernel_info()["flags"]
        monkeypatch.setattr(kernels, "_c_tried", False)
        no_openmp = fake_compiler(tmp_path / "cc", f'for a in "$@"; do [ "$a" = -fopenmp ] && '
                                                   f'exit 1; done; exec {cc} "$@"')
        monkeypatch.setenv("CC", str(no_openmp))
        without = outputs()
        assert "-fopenmp-simd" in kernels.kernel_info()["flags"]
        assert "-fopenmp" not in kernels.kernel_info()["flags"]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(with_openmp, without):
        assert torch.equal(a, b)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_matches_reference(training: bool, dtype: torch.dtype, channels_last: bool) -> None:
    check_matches_reference(training, dtype, channels_last, "cuda")


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_autocast_bfloat16(channels_last: bool) -> None:
    """CUDA autocast: bf16 output in the input's layout, float32 statistics close to float32's."""
    layer = random_bin(torch.float32).cuda()
    ref = ReferenceBIN(layer)
    x = batch(0, torch.float32, channels_last).cuda().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and layer.rho.grad.dtype == torch.float32
    y_ref = ref(x.detach().float())
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)


def rho_extreme(value: float, momentum: float | None = 0.1) -> tuple[BatchInstanceNorm2d, nn.BatchNorm2d]:
    layer = random_bin(torch.float64, momentum)
    with torch.no_grad():
        layer.rho.fill_(value)
    bn = nn.BatchNorm2d(C, momentum=momentum).double()
    bn.load_state_dict(layer.state_dict(), strict=False)
    return layer, bn


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_rho_one_is_batchnorm(training: bool, momentum: float | None, kernel: str) -> None:
    layer, bn = rho_extreme(1.0, momentum)
    layer.train(training), bn.train(training)
    for step in range(3):
        x = batch(step, torch.float64).requires_grad_()
        y, y_bn = layer(x), bn(x)
        torch.testing.assert_close(y, y_bn, rtol=1e-9, atol=1e-10)
        g = torch.randn_like(y)
        gx, gw, gb = torch.autograd.grad(y, [x, layer.weight, layer.bias], g)
        gx_bn, gw_bn, gb_bn = torch.autograd.grad(y_bn, [x, bn.weight, bn.bias], g)
        for a, b in ((gx, gx_bn), (gw, gw_bn), (gb, gb_bn)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(bn, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_rho_zero_is_instance_norm(training: bool) -> None:
    layer, _ = rho_extreme(0.0)
    layer.train(training)
    x = batch(0, torch.float64)
    expected = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["train", "eval", "no-running-stats"])
def test_gradcheck(mode: str, channels_last: bool, kernel: str) -> None:
    layer = random_bin(torch.float64)
    x = batch(0, torch.float64, channels_last, shape=(3, C, 3, 4)).requires_grad_()
    running = mode != "no-running-stats"

    def f(x: Tensor, rho: Tensor, w: Tensor, b: Tensor) -> Tensor:
        rm = layer.running_mean.clone() if running else None
        rv = layer.running_var.clone() if running else None
        return batch_instance_norm(x, rho, rm, rv, w, b, mode == "train", 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, layer.rho, layer.weight, layer.bias))


def test_autocast_bfloat16() -> None:
    """Under CPU autocast: output in the (bf16) input dtype, statistics and grads in float32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 3)
    layer = random_bin(torch.float32)
    ref = ReferenceBIN(layer)  # float32 copy, before the step
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32
    y.float().square().mean().backward()
    assert layer.rho.grad.dtype == torch.float32 and torch.isfinite(layer.rho.grad).all()
    assert torch.isfinite(conv.weight.grad).all()
    # Same statistics as float32 on the same (bf16-rounded) input.
    y_ref = ref(h.detach().float())
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)


def test_state_dict_compatible_with_batchnorm() -> None:
    bn = nn.BatchNorm2d(C).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_()
    bn.num_batches_tracked.fill_(7)
    layer = BatchInstanceNorm2d(C).double()
    layer.load_state_dict(bn.state_dict())  # strict: rho is the only extra entry and keeps 1
    assert torch.equal(layer.rho, torch.ones(C, dtype=torch.float64))
    assert layer.num_batches_tracked.item() == 7
    x = batch(0, torch.float64)
    torch.testing.assert_close(layer.eval()(x), bn.eval()(x))
    keys = set(layer.state_dict())
    assert keys == set(bn.state_dict()) | {"rho"}
    restored = BatchInstanceNorm2d(C).double()
    with torch.no_grad():
        layer.rho.fill_(0.25)
    restored.load_state_dict(layer.state_dict())
    assert torch.equal(restored.rho, layer.rho)


def test_input_errors() -> None:
    layer = BatchInstanceNorm2d(C)
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, C, 1, 1))
    with pytest.raises(ValueError, match="4D"):
        layer(torch.randn(2, C, 4))
    layer.eval()(torch.randn(1, C, 1, 1))  # eval with running statistics is fine


# --------------------------------------------------------------------------- convert_norm

def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(3)
    return model


def norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()
            if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, BatchInstanceNorm2d))}


def set_mode(model: nn.Module, training: bool) -> nn.Module:
    """train/eval, with dropout always off so that two models see the same function."""
    model.train(training)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_convert_bn_to_bin_keeps_outputs(arch: str, dtype: torch.dtype) -> None:
    """rho = 1: same logits and running-stat updates as the BN network, in eval and train mode.

    float64: equal to 1e-10 of the output scale. float32: within 1e-5 of the output scale,
    or, where BN itself is less accurate than that (train mode, batch 2, deep ResNet: the
    normalisation amplifies rounding), no further from the float64 BN than 2x BN's own error.
    """
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=7)
    bn_model = randomise_norms(model).to(dtype)
    exact_model = copy.deepcopy(bn_model).double()
    bin_model = convert_norm(copy.deepcopy(bn_model), "bin")
    assert norm_types(bin_model) == {BatchInstanceNorm2d}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bn_model.modules())
    assert len(gate_values(bin_model)) == n_bn
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        for training in (False, True):
            expected = set_mode(bn_model, training)(x)
            actual = set_mode(bin_model, training)(x)
            scale = max(1.0, expected.abs().max().item())
            if dtype == torch.float64:
                assert (actual - expected).abs().max().item() <= 1e-10 * scale
                continue
            exact = set_mode(exact_model, training)(x.double())
            bn_error = (expected.double() - exact).abs().max().item()
            bin_error = (actual.double() - exact).abs().max().item()
            close = (actual - expected).abs().max().item() <= 1e-5 * scale
            assert close or bin_error <= 2 * bn_error, (training, bin_error, bn_error)
    # train mode updated the running statistics alike (float32: the same rule as the outputs,
    # as a deep layer's statistics carry the rounding of every layer before it)
    def norms(m: nn.Module, kind: type) -> list[nn.Module]:
        return [layer for layer in m.modules() if isinstance(layer, kind)]

    layers = zip(norms(bn_model, nn.BatchNorm2d), norms(bin_model, BatchInstanceNorm2d),
                 norms(exact_model, nn.BatchNorm2d))
    for a, b, e in layers:
        assert b.num_batches_tracked.item() == a.num_batches_tracked.item() == 4
        for stat in ("running_mean", "running_var"):
            bn_stat, bin_stat, exact_stat = getattr(a, stat), getattr(b, stat), getattr(e, stat)
            if torch.allclose(bin_stat, bn_stat, rtol=1e-4, atol=1e-5):
                continue
            assert dtype == torch.float32, stat
            bn_error = (bn_stat.double() - exact_stat).abs().max().item()
            bin_error = (bin_stat.double() - exact_stat).abs().max().item()
            assert bin_error <= 2 * bn_error, (stat, bin_error, bn_error)


def test_convert_round_trip_and_instance_norm() -> None:
    torch.manual_seed(0)
    model = randomise_norms(torchvision.models.resnet18(weights=None, num_classes=3)).double()
    model.layer1[0].bn1.weight.requires_grad_(False)
    original = copy.deepcopy(model.state_dict())
    assert convert_norm(model, "bin") is model
    assert model.layer1[0].bn1.rho.dtype == torch.float64
    assert not model.layer1[0].bn1.weight.requires_grad
    convert_norm(model.eval(), "bn")
    assert norm_types(model) == {nn.BatchNorm2d} and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key

    # "in" equals BIN with every gate at 0, in train and eval mode
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    as_bin = convert_norm(copy.deepcopy(model), "bin")
    for rho in gate_parameters(as_bin):
        rho.data.zero_()
    as_in = convert_norm(copy.deepcopy(model), "in")
    assert norm_types(as_in) == {nn.InstanceNorm2d}
    assert as_in.bn1.affine and torch.equal(as_in.bn1.weight, model.bn1.weight)
    with torch.no_grad():
        for training in (False, True):
            as_bin.train(training), as_in.train(training)
            torch.testing.assert_close(as_in(x), as_bin(x))


def test_convert_unknown_kind_and_bare_layer() -> None:
    with pytest.raises(UserError, match="unknown norm 'no-such-norm'"):
        convert_norm(nn.Sequential(nn.BatchNorm2d(3)), "no-such-norm")
    layer = convert_norm(nn.BatchNorm2d(3), "bin")
    assert isinstance(layer, BatchInstanceNorm2d)


def test_gate_helpers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                          nn.BatchNorm2d(2))
    assert mean_gate(model) is None and gate_values(model) == {}
    convert_norm(model, "bin")
    with torch.no_grad():
        model[1].rho.copy_(torch.tensor([0.0, 0.5, 1.0, 0.5]))
        model[4].rho.copy_(torch.tensor([0.0, 0.0]))
    values = gate_values(model)
    assert list(values) == ["1", "4"]
    assert torch.equal(values["1"], model[1].rho.detach())
    values["1"].fill_(9)  # a copy, not the parameter
    assert model[1].rho.max().item() == 1.0
    assert mean_gate(model) == pytest.approx(2.0 / 6.0)
    assert [p is q for p, q in zip(gate_parameters(model), (model[1].rho, model[4].rho))] == [True] * 2
