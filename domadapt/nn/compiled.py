"""`torch.compile` for a run's modules (`--compile`).

    check_compiler(device)        # one-line UserError where inductor cannot build kernels
    compile_modules(method)       # the model's parts and the method's heads, compiled in place

What is compiled: the backbone, the bottleneck and the classifier of the model, and every other
child module of the method (its heads: DANN's discriminator, MCD's second classifier, ...),
each with `nn.Module.compile()`, in place, so parameter names, the checkpoint's `state_dict`
keys and every reference a method holds stay what they are. The glue between them (a method's
losses, the gradient reversal, `DomainAdaptModel.forward` with its domain labels and any
forward hooks a method puts on the model, e.g. MCC's) runs eagerly: those change every step
and would recompile a graph that held them. Evaluation runs eagerly too (`eager`): only the
training steps are compiled. A BIN layer is a custom operator
(`domadapt.nn.bin_function`), so a BIN backbone compiles without a graph break.

A compiled module's copy (`copy.deepcopy`) would still call the ORIGINAL module's compiled
forward; `uncompiled_copy` is the copy to take (AdaBN takes one).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import TypeVar

import torch
from torch import nn

from domadapt.errors import UserError

M = TypeVar("M", bound=nn.Module)


@functools.cache
def _cxx() -> str | None:
    """The C++ compiler inductor builds CPU kernels with (its own search: $CXX or g++, clang++
    on macOS), or None when there is none that runs."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, OSError):
        return None


def check_compiler(device: torch.device) -> None:
    """UserError (one line) when `torch.compile` cannot build kernels for `device`: on CPU it
    needs a working C++ compiler, on CUDA Triton."""
    if device.type == "cpu" and _cxx() is None:
        raise UserError("--compile on CPU needs a C++ compiler (torch.compile's inductor builds "
                        "its kernels with one) and none works here: install g++ or clang++, or "
                        "set CXX; or train without --compile")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError("--compile on CUDA needs Triton (pip install triton), which is "
                            "missing; or train without --compile")


def compile_info(device: torch.device) -> dict[str, str | None]:
    """What compiles the kernels: {"backend": "inductor", "cxx": first line of the C++
    compiler's version (CPU), else None}; recorded in config.json's runtime."""
    cxx = _cxx() if device.type == "cpu" else None
    version = None
    if cxx is not None:
        from torch._inductor.cpp_builder import _compiler_version_first_line

        version = _compiler_version_first_line(cxx) or cxx
    return {"backend": "inductor", "cxx": version}


def compiled_parts(method: nn.Module) -> dict[str, nn.Module]:
    """The modules `compile_modules` compiles, by name: the model's children (backbone,
    bottleneck, classifier) as `model.<name>`, and every other child of `method`."""
    model = getattr(method, "model", None)
    parts = {f"model.{name}": m for name, m in model.named_children()} if model else {}
    parts |= {name: m for name, m in method.named_children() if m is not model}
    return parts


def compile_modules(method: nn.Module) -> list[str]:
    """Compile the parts of `method` (`compiled_parts`) in place; their names."""
    parts = compiled_parts(method)
    for module in parts.values():
        module.compile()
    return list(parts)


def eager(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Within the block, compiled modules run their eager forward (`torch.compiler.set_stance
    ("force_eager")`): evaluation under --compile. Each evaluation mode and batch shape would
    otherwise compile graphs of its own (about a minute each for a CPU backbone), for passes
    that are a small part of a run, and fill the compiler's cache, which holds 8 graphs per
    function before it falls back to eager for good."""
    return torch.compiler.set_stance("force_eager") if enabled else contextlib.nullcontext()


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def uncompiled_copy(module: M) -> M:
    """A deep copy of `module` that runs eagerly: the compiled forward of every module inside
    is dropped (it is bound to the original module, whose weights and buffers it would use)."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        if is_compiled(m):
            m._compiled_call_impl = None
    return clone
