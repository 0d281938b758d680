"""Running a model for inference in a lower precision (bf16, fp16): the weights converted once, activations under
autocast, what accuracy needs kept in fp32.

``prepare_for_precision`` casts the weights (and biases) of the matrix layers, ``nn.Linear`` and ``nn.Conv2d``, to the
dtype once. Autocast would otherwise re-cast every fp32 weight at every call: its weight cache is off under
``torch.inference_mode``, where prediction runs. Norms, token and position tables, the RankSeg per-class vectors
stay fp32 parameters. ``precision_autocast`` then makes the activations enter the matrix products (and attention) in
the low precision; LayerNorm accumulates in fp32 and the residual stream stays fp32 (an fp32 position table added to
the patch embedding promotes it). The model's outputs are taken back to fp32 before windows are merged, resized and
soft-maxed (``inference/windows.py``), so the multi-scale + flip averaging is fp32 throughout.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

from segrank.runtime.devices import PRECISIONS
from segrank.runtime.precision import PrecisionChoice, choose_precision

LOG = logging.getLogger("segrank")
# What --precision and precision= accept: auto and the table's names ("none" is only the config's old spelling).
PRECISION_CHOICES = ("auto", *(name for name in PRECISIONS if name != "none"))
# The layers whose weights are converted: exactly these types (nn.MultiheadAttention's out_proj, a Linear subclass,
# stays fp32 with its fp32 in_proj_weight; autocast casts both per call in those small query-to-label layers).
MATRIX_LAYERS = (nn.Linear, nn.Conv2d)


def resolve_precision(precision: str | None, device: torch.device, who: str = "segrank") -> PrecisionChoice:
    """The precision to run with on ``device``: ``auto`` (or None) picks the fastest here and logs one record saying
    which and why (logger ``segrank``, INFO); a name is taken as given."""
    choice = choose_precision(precision, device)
    if precision in (None, "auto"):
        LOG.info("%s: precision auto -> %s (%s)", who, choice.name, choice.reason)
    return choice


def prepare_for_precision(model: nn.Module, choice: PrecisionChoice) -> nn.Module:
    """Cast ``model``'s Linear and Conv2d weights and biases to ``choice.dtype``, in place (fp32: nothing to do);
    returns the model. Run it under ``precision_autocast``: its matrix layers no longer take fp32 inputs."""
    if choice.dtype == torch.float32:
        return model
    for module in model.modules():
        if type(module) in MATRIX_LAYERS:
            module.to(choice.dtype)
    return model


def inference_copy(model: nn.Module, choice: PrecisionChoice) -> nn.Module:
    """``model`` itself for fp32; for a lower precision a converted copy, leaving the caller's model (which may
    still be trained) as it is."""
    if choice.dtype == torch.float32:
        return model
    return prepare_for_precision(copy.deepcopy(model), choice)


@contextlib.contextmanager
def precision_autocast(choice: PrecisionChoice, device: torch.device) -> Iterator[None]:
    """Autocast to ``choice.dtype`` on ``device`` (nothing for fp32)."""
    if choice.dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=choice.dtype):
        yield
