"""The model names its normalisation-layer parameters and other biases (``Segmentor.norm_parameter_names`` /
``bias_parameter_names``); the optimiser's param groups built from them equal those of the rule the optimiser
applied itself before: parameters of LayerNorm/GroupNorm/SelectedLayerNorm modules, and other ``*.bias``."""

from __future__ import annotations

import pytest
from torch import nn

from segrank import build_model
from segrank.checkpoints.mmseg import to_mmseg_name
from segrank.models.rankseg_head import SelectedLayerNorm
from segrank.training.optim import key_multiplier, param_groups
from tests.training.test_train import tiny_config

PREVIOUS_NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, SelectedLayerNorm)

RULES = [
    {"decay_mult": {"pos_embed": 0.0, "cls_token": 0.0, "norm": 0.0}},  # the reference configs
    {"decay_mult": {}, "norm_decay_mult": 0.0, "bias_decay_mult": 0.5},
    {"decay_mult": {"pos_embed": 0.0, "decode_head.blocks.0.": 2.0}, "norm_decay_mult": 0.3, "bias_decay_mult": 0.0,
     "lr_mult": {"backbone": 0.1, "decode_head.ml_fc": 5.0, "decode_head": 10.0}},
]


def previous_param_groups(model: nn.Module, weight_decay: float, decay_mult: dict[str, float], *,
                          lr_mult: dict[str, float] | None = None, norm_decay_mult: float | None = None,
                          bias_decay_mult: float | None = None) -> list[dict]:
    """``optim.param_groups`` as it was when it told norm layers by their class itself."""
    in_norm = {id(p) for m in model.modules() if isinstance(m, PREVIOUS_NORM_LAYERS)
               for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        ref = to_mmseg_name(name)
        decay = key_multiplier(ref, decay_mult)
        if decay is None and norm_decay_mult is not None and id(param) in in_norm:
            decay = norm_decay_mult
        if decay is None and bias_decay_mult is not None and name.rsplit(".", 1)[-1] == "bias" \
                and id(param) not in in_norm:
            decay = bias_decay_mult
        lr = key_multiplier(ref, lr_mult or {})
        key = (weight_decay * (1.0 if decay is None else decay), 1.0 if lr is None else lr)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "weight_decay": wd, "lr_mult": lr} for (wd, lr), params in groups.items()]


def keys_the_model_has(model: nn.Module, rules: dict) -> dict:
    """``rules`` without the decay_mult / lr_mult keys that no parameter's reference name contains."""
    names = [to_mmseg_name(name) for name, _ in model.named_parameters()]
    return {rule: {k: v for k, v in value.items() if any(k in name for name in names)}
            if rule in ("decay_mult", "lr_mult") else value for rule, value in rules.items()}


def as_names(model: nn.Module, groups: list[dict]) -> list[tuple[float, float, list[str]]]:
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [(g["weight_decay"], g["lr_mult"], [name_of[id(p)] for p in g["params"]]) for g in groups]


@pytest.mark.parametrize("head", ["rankseg", "rankseg_gt", "segmenter", "linear"])
@pytest.mark.parametrize("rules", RULES, ids=["reference", "norm_bias_mults", "lr_mult"])
def test_param_groups_equal_the_previous_rules(head, rules):
    model = build_model(tiny_config(head).model)
    rules = keys_the_model_has(model, rules)  # a key naming no parameter is refused now (test_optim.py)
    expected = as_names(model, previous_param_groups(model, 0.01, **rules))
    assert as_names(model, param_groups(model, 0.01, reference_name=to_mmseg_name, **rules)) == expected
    assert len(expected) > 1  # the rules do split the parameters


def test_the_model_names_its_norm_and_bias_parameters():
    model = build_model(tiny_config("rankseg_gt").model)
    norms, biases = model.norm_parameter_names(), model.bias_parameter_names()
    assert {"backbone.blocks.0.norm1.weight", "backbone.blocks.0.norm1.bias", "decode_head.mask_norm.gamma",
            "decode_head.mask_norm.beta"} <= norms
    assert "backbone.blocks.0.attn.qkv.bias" in biases and "backbone.blocks.0.attn.qkv.weight" not in biases
    assert not norms & biases
