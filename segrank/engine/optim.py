"""Optimiser and learning-rate schedule with the reference's semantics (mmcv SGD + paramwise decay, poly lr)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from segrank.checkpoints.mmseg import to_mmseg_name
from segrank.config import TrainConfig


def decay_multiplier(reference_name: str, decay_mult: dict[str, float]) -> float:
    """mmcv ``DefaultOptimizerConstructor`` rule: keys sorted by length (longest first, ties alphabetical); the first
    key that is a substring of the parameter's reference name gives its multiplier; none matching gives 1."""
    for key in sorted(sorted(decay_mult), key=len, reverse=True):
        if key in reference_name:
            return decay_mult[key]
    return 1.0


def param_groups(
    model: nn.Module, weight_decay: float, decay_mult: dict[str, float], reference_name: Callable[[str], str]
) -> list[dict]:
    """One SGD param group per distinct weight decay, in order of first appearance (deterministic).

    ``reference_name`` maps our parameter names to the reference's (``checkpoints.mmseg.to_mmseg_name``): the keys in
    the configs were written against the reference's names (e.g. its backbone LayerNorms are ``ln1``/``ln2``, so "norm"
    must not match them).
    """
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        wd = weight_decay * decay_multiplier(reference_name(name), decay_mult)
        groups.setdefault(wd, []).append(param)
    return [{"params": params, "weight_decay": wd} for wd, params in groups.items()]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_mult, to_mmseg_name)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of iteration ``step`` (0-based): mmcv poly decay to ``min_lr``, then an optional linear warmup
    factor (step + 1) / (warmup_iters + 1) over the first ``warmup_iters`` iterations."""
    lr = (cfg.lr - cfg.min_lr) * (1 - step / cfg.max_iters) ** cfg.lr_power + cfg.min_lr
    if step < cfg.warmup_iters:
        lr *= (step + 1) / (cfg.warmup_iters + 1)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
