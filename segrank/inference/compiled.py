"""``torch.compile`` for inference (``--compile``): inductor with freezing, one graph per input shape.

Freezing (inductor's ``freezing`` option, passed with this compile only, not set globally) folds the weights into
the graph as constants, which lets inductor pre-pack them for the CPU's matrix kernels; the compiled model then
no longer sees later changes to the weights. ``dynamic=False``: every new input shape compiles a new graph (after
torch's ``recompile_limit`` shapes, 8 by default, it runs eager). Sliding windows give one shape (the crop, plus the
last batch of an image when ``batch_size`` does not divide its window count, and images smaller than the crop);
whole-image inference compiles once per distinct test-size image shape.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil

import torch
from torch import nn

from segrank.errors import SegrankError


def cpu_compiler() -> str | None:
    """The C++ compiler inductor builds CPU kernels with, when it is installed (None when not)."""
    try:  # imported when asked: inductor takes a second to import, and most runs do not compile
        name = importlib.import_module("torch._inductor.cpp_builder").get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own error classes when no compiler is found
        return None
    return shutil.which(name)


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here, or None."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "torch.compile on CUDA needs triton (pip install triton)"
    if device.type == "cpu" and cpu_compiler() is None:
        return ("torch.compile on CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); none was found: "
                "install one or leave out --compile")
    return None


def compile_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` compiled with inductor and freezing, static shapes. Compiling happens at the first call of each
    input shape (seconds to minutes: measured in docs/performance.md). The compiled module reaches the model's
    methods and attributes (``to_input_size``, ``decode_head``) through to the model."""
    problem = compile_problem(device)
    if problem is not None:
        raise SegrankError(f"--compile: {problem}")
    return torch.compile(model, backend="inductor", dynamic=False, options={"freezing": True})
