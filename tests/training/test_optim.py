"""Optimiser options beside the reference recipe: lr_mult rules, mmcv norm/bias decay multipliers, AdamW."""

from __future__ import annotations

import pytest
import torch

from segrank import build_model
from segrank.checkpoints.mmseg import to_mmseg_name
from segrank.config import ConfigError, TrainConfig
from segrank.training.optim import build_optimizer, key_multiplier, param_groups, set_lr
from tests.conftest import tiny_model
from tests.training.test_train import tiny_config


def settings_by_name(model: torch.nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    """parameter name -> (weight decay, lr multiplier) of its group."""
    of = {id(p): (g["weight_decay"], g["lr_mult"]) for g in groups for p in g["params"]}
    return {name: of[id(p)] for name, p in model.named_parameters()}


def test_reference_rules_give_one_learning_rate():
    model = build_model(tiny_config().model)
    cfg = TrainConfig(weight_decay=1e-6)
    groups = param_groups(model, cfg.weight_decay, cfg.decay_mult, to_mmseg_name)
    assert {g["lr_mult"] for g in groups} == {1.0}
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [g["weight_decay"] for g in groups]


def test_lr_mult_longest_key_wins_and_set_lr_applies_it():
    assert key_multiplier("decode_head.ml_fc.W", {"decode_head": 10.0, "decode_head.ml_fc": 2.0}) == 2.0
    assert key_multiplier("backbone.pos_embed", {"decode_head": 10.0}) is None
    model = build_model(tiny_config().model)
    cfg = TrainConfig(lr_mult={"backbone": 0.1, "decode_head.ml_fc": 5.0}, decay_mult={"norm": 0.0},
                      weight_decay=0.01)
    optimizer = build_optimizer(model, cfg)
    set_lr(optimizer, 1e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lr = {name: lr_of[id(p)] for name, p in model.named_parameters()}
    assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(1e-4)
    assert lr["decode_head.ml_fc.W"] == pytest.approx(5e-3)
    assert lr["decode_head.proj_dec.weight"] == pytest.approx(1e-3)
    # lr rules leave the decay alone: the head's norms keep decay_mult's 0, the rest the base decay.
    wd = settings_by_name(model, optimizer.param_groups)
    assert wd["decode_head.decoder_norm.weight"] == (0.0, 1.0)
    assert wd["backbone.blocks.0.attn.qkv.weight"] == (0.01, 0.1)


def test_norm_and_bias_decay_mults_apply_where_no_key_matches():
    model = build_model(tiny_config("rankseg_gt").model)
    groups = param_groups(model, 0.05, {"pos_embed": 0.0, "decode_head.blocks.0.": 2.0}, to_mmseg_name,
                          norm_decay_mult=0.0, bias_decay_mult=0.5)
    wd = {name: s[0] for name, s in settings_by_name(model, groups).items()}
    assert wd["backbone.blocks.0.norm1.weight"] == 0.0  # a LayerNorm, whatever the reference calls it
    assert wd["decode_head.mask_norm.gamma"] == 0.0  # the oracle's own normalisation layer
    assert wd["backbone.blocks.0.attn.qkv.bias"] == pytest.approx(0.025)
    assert wd["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.05)
    assert wd["backbone.pos_embed"] == 0.0
    assert wd["decode_head.blocks.0.norm1.weight"] == pytest.approx(0.1)  # a decay_mult key wins, as in mmcv


def test_adamw_option():
    model = build_model(tiny_config().model)
    cfg = TrainConfig(optimizer="adamw", betas=(0.8, 0.99), weight_decay=0.05, norm_decay_mult=0.0)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {g["betas"] for g in optimizer.param_groups} == {(0.8, 0.99)}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}


@pytest.mark.parametrize(("rules", "message"), [
    ({"lr_mult": {"decode_head.ml_fcc": 2.0}},
     "train.lr_mult: key 'decode_head.ml_fcc' matches no parameter of this model; nearest names: decode_head.ml_fc."),
    ({"decay_mult": {"backbone.layer.": 0.0}},
     "train.decay_mult: key 'backbone.layer.' matches no parameter of this model; nearest names: backbone.layers., "),
    ({"decay_mult": {"zzz": 0.0}}, "train.decay_mult: key 'zzz' matches no parameter of this model"),
])
def test_a_rule_key_that_names_no_parameter_is_refused_with_the_nearest_names(rules, message):
    """mmcv silently ignores such a key, so a typo would train with the default multiplier."""
    model = build_model(tiny_config().model)
    with pytest.raises(ConfigError) as err:
        build_optimizer(model, TrainConfig(**rules))
    assert str(err.value).startswith(message)


def test_the_default_decay_keys_may_match_nothing():
    """pos_embed / cls_token / norm name kinds of parameters: a linear head has no norm, and that is no typo."""
    model = tiny_model(5, {"type": "linear"})
    assert not any("norm" in to_mmseg_name(name) for name, _ in model.named_parameters())
    build_optimizer(model, TrainConfig())
    with pytest.raises(ConfigError, match="key 'norms' matches no parameter"):
        build_optimizer(model, TrainConfig(decay_mult={"norms": 0.0}))
