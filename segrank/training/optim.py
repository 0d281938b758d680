"""Optimiser and learning-rate schedule with the reference's semantics (mmcv SGD + paramwise rules, poly lr), and
AdamW as an option.

Parameter rules follow mmcv's ``DefaultOptimizerConstructor`` ``paramwise_cfg``: ``decay_mult`` and ``lr_mult`` map
substrings of the reference (mmseg) parameter names to multipliers; ``norm_decay_mult`` and ``bias_decay_mult`` set
the decay of normalisation-layer parameters and of other layers' biases that no ``decay_mult`` key matches. The
reference configs use ``decay_mult`` only, so with the defaults every parameter gets the one base learning rate.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from segrank.checkpoints.mmseg import to_mmseg_name
from segrank.config import TrainConfig
from segrank.errors import ConfigError
from segrank.models.segmentor import Segmentor


def key_multiplier(reference_name: str, rules: dict[str, float]) -> float | None:
    """mmcv ``custom_keys`` rule: keys sorted by length (longest first, ties alphabetical); the first key that is a
    substring of the parameter's reference name gives its multiplier; None when no key matches."""
    for key in sorted(sorted(rules), key=len, reverse=True):
        if key in reference_name:
            return rules[key]
    return None


def decay_multiplier(reference_name: str, decay_mult: dict[str, float]) -> float:
    """The weight-decay multiplier ``decay_mult`` gives a parameter (1 when no key matches)."""
    mult = key_multiplier(reference_name, decay_mult)
    return 1.0 if mult is None else mult


# The default decay_mult keys name kinds of parameters (position table, class token, norms) that a model may lack.
GENERIC_KEYS = frozenset(TrainConfig().decay_mult)


def check_rules_match(rules: dict[str, dict[str, float]], reference_names: Iterable[str]) -> None:
    """Refuse a rule key that is a substring of no parameter's reference name (mmcv ignores it, so a typo would train
    with the default multiplier), except the default decay_mult keys (``GENERIC_KEYS``); the message names the rule,
    the key and the nearest parameter-name prefixes."""
    names = list(reference_names)
    # Prefixes that end at a dot, the way rule keys are written ("decode_head.blocks.0.", "backbone.layers.11").
    prefixes = sorted({name[:i + 1] for name in names for i, ch in enumerate(name) if ch == "."} | set(names))
    for rule, keys in rules.items():
        for key in keys:
            if key not in GENERIC_KEYS and not any(key in name for name in names):
                nearest = difflib.get_close_matches(key, prefixes, n=3, cutoff=0.5)
                hint = f"; nearest names: {', '.join(nearest)}" if nearest else ""
                raise ConfigError(f"train.{rule}: key {key!r} matches no parameter of this model{hint}")


def param_groups(
    model: Segmentor, weight_decay: float, decay_mult: dict[str, float], reference_name: Callable[[str], str], *,
    lr_mult: dict[str, float] | None = None, norm_decay_mult: float | None = None,
    bias_decay_mult: float | None = None,
) -> list[dict]:
    """One param group per distinct (weight decay, lr multiplier), in order of first appearance (deterministic).

    ``reference_name`` maps our parameter names to the reference's (``checkpoints.mmseg.to_mmseg_name``): the keys in
    the configs were written against the reference's names (e.g. its backbone LayerNorms are ``ln1``/``ln2``, so "norm"
    must not match them). Each group carries ``lr_mult``, which ``set_lr`` applies. ``lr_mult`` and
    ``decay_mult`` are matched independently, so a learning-rate rule never changes a parameter's decay. The model
    names its normalisation-layer parameters and its other biases (``norm_parameter_names``,
    ``bias_parameter_names``). A key that matches no parameter is refused (``check_rules_match``).
    """
    check_rules_match({"decay_mult": decay_mult, "lr_mult": lr_mult or {}},
                      (reference_name(name) for name, _ in model.named_parameters()))
    norms, biases = model.norm_parameter_names(), model.bias_parameter_names()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ref = reference_name(name)
        decay = key_multiplier(ref, decay_mult)
        if decay is None and norm_decay_mult is not None and name in norms:
            decay = norm_decay_mult
        if decay is None and bias_decay_mult is not None and name in biases:
            decay = bias_decay_mult
        lr = key_multiplier(ref, lr_mult or {})
        key = (weight_decay * (1.0 if decay is None else decay), 1.0 if lr is None else lr)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "weight_decay": wd, "lr_mult": lr} for (wd, lr), params in groups.items()]


def build_optimizer(model: Segmentor, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over ``param_groups``, the configs' keys matched against the reference (mmseg) names."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_mult, to_mmseg_name, lr_mult=cfg.lr_mult,
                          norm_decay_mult=cfg.norm_decay_mult, bias_decay_mult=cfg.bias_decay_mult)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def state_tensors_per_parameter(cfg: TrainConfig) -> int:
    """The tensors the optimiser keeps per parameter, each of the parameter's size: AdamW its two moments, SGD its
    momentum buffer (none without momentum)."""
    if cfg.optimizer == "adamw":
        return 2
    return 1 if cfg.momentum else 0


def poly_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of iteration ``step`` (0-based): mmcv poly decay to ``min_lr``, then an optional linear warmup
    factor (step + 1) / (warmup_iters + 1) over the first ``warmup_iters`` iterations."""
    lr = (cfg.lr - cfg.min_lr) * (1 - step / cfg.max_iters) ** cfg.lr_power + cfg.min_lr
    if step < cfg.warmup_iters:
        lr *= (step + 1) / (cfg.warmup_iters + 1)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Base learning rate ``lr`` times each group's ``lr_mult`` (groups of checkpoints written before lr_mult
    existed have none: 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
