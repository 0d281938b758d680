"""Typed configuration: dataclasses built strictly from YAML/dicts.

A config file is YAML; ``_base_: [a.yaml, b.yaml]`` composes files (later files and the file itself win,
dicts merge key by key). Every key is checked against the dataclass fields, so a typo is an error naming the key,
and every value against the bound its field declares (segrank.config.fields), so a value out of range is refused
when the config is loaded, before any work starts. docs/config.md is generated from the same declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from segrank.config.build import (
    apply_overrides,
    from_dict,
    load_yaml,
    merge_dicts,
    to_dict,
)
from segrank.config.fields import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    RATE,
    Bound,
    Section,
    above,
    at_least,
    setting,
    within,
)
from segrank.config.losses import LossConfig, PixelTermConfig, class_weights_fit
from segrank.errors import ConfigError

# The public config interface: the classes below and the loaders of segrank.config.build.
__all__ = ["VIT_PRESETS", "BackboneConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "HeadConfig",
           "LossConfig", "ModelConfig", "PixelTermConfig", "TrainConfig", "ViTPreset", "apply_overrides", "from_dict",
           "load_config", "load_yaml", "merge_dicts", "model_config_from", "to_dict"]


# --------------------------------------------------------------------------------------------------------------
# Model


ViTPreset = Literal["vit_t16", "vit_s16", "vit_b16", "vit_l16"]
VIT_PRESETS: dict[str, dict[str, int]] = {
    "vit_t16": {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16},
    "vit_s16": {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16},
    "vit_b16": {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16},
    "vit_l16": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16},
}


@dataclass
class BackboneConfig(Section):
    key: ClassVar[str] = "model.backbone"
    preset: ViTPreset | None = setting(None, "ViT size filling patch_size, embed_dim, depth and num_heads; keys given "
                                             "explicitly win")
    patch_size: int = setting(16, "side of the square patches, in pixels", COUNT)
    embed_dim: int = setting(768, "token width", COUNT)
    depth: int = setting(12, "transformer blocks", COUNT)
    num_heads: int = setting(12, "attention heads per block; embed_dim must be divisible by it", COUNT)
    mlp_ratio: float = setting(4.0, "MLP hidden width / embed_dim", POSITIVE)
    pos_embed_grid: tuple[int, int] = setting((32, 32), "grid of the learned position table: training image size / "
                                                        "patch_size (rows, columns)", COUNT)
    drop_path_rate: float = setting(0.1, "stochastic depth of the last block, linear from 0 over the blocks", RATE)
    final_norm: bool = setting(True, "LayerNorm after the last block")
    norm_eps: float = setting(1e-6, "LayerNorm epsilon (mmseg fork: 1e-6, official Segmenter: 1e-5)", POSITIVE)
    pos_embed_interpolation: Literal["bicubic", "bilinear"] = setting(
        "bicubic", "resampling of the position table to other grids (fork: bicubic, official: bilinear)")
    oce_start_layer: int | None = setting(None, "OCE: class tokens join the sequence before this block (< depth); "
                                                "null: no OCE", NON_NEGATIVE)

    @staticmethod
    def expand_keys(data: dict[str, Any], path: str) -> dict[str, Any]:
        """A ``preset`` fills embed_dim/depth/num_heads/patch_size; keys given explicitly win (an unknown preset is
        refused by the field's type)."""
        preset = data.get("preset")
        return {**VIT_PRESETS[preset], **data} if isinstance(preset, str) and preset in VIT_PRESETS else data


@dataclass
class HeadConfig(Section):
    key: ClassVar[str] = "model.head"
    type: Literal["segmenter", "rankseg", "rankseg_gt", "linear"] = setting(
        "segmenter", "segmenter: mask transformer; rankseg: top-k ranking head; rankseg_gt: RankSeg given the "
                     "classes present (oracle); linear: linear decoder")
    d_model: int | None = setting(None, "decoder width; null: the backbone's embed_dim", COUNT)
    n_heads: int | None = setting(None, "decoder attention heads; null: d_model // 64", COUNT)
    d_ff: int | None = setting(None, "decoder MLP width; null: 4 * d_model", COUNT)
    n_layers: int = setting(2, "decoder blocks (RankSeg's encoder_layer branch uses the first)", NON_NEGATIVE)
    dropout: float = setting(0.1, "dropout rate in the decoder blocks", RATE)
    drop_path_rate: float = setting(0.0, "stochastic depth of the last decoder block", RATE)
    norm_eps: float = setting(1e-5, "LayerNorm epsilon of the decoder", POSITIVE)
    cls_emb_from_backbone: bool = setting(False, "OCE: class tokens come from the backbone")
    topk: int = setting(50, "RankSeg: classes kept per image, at most num_classes", COUNT)
    multilabel_head: Literal["encoder_layer", "query2label", "global_pool"] = setting(
        "encoder_layer", "RankSeg image-level branch: the first decoder block, a cross-attention decoder or pooling")
    downsample: int | None = setting(8, "side of the pooled grid the image-level branch sees; null: all patch "
                                        "tokens", COUNT)
    image_prior_prob: float | None = setting(
        None, "RankSeg encoder_layer branch: initial probability of every class, its classifier bias set to "
              "-log((1 - p) / p) (RetinaNet's prior init); null: the reference's uniform init",
        Bound(lo=0, hi=1, lo_open=True, hi_open=True))
    q2l_heads: int = setting(8, "query2label: attention heads", COUNT)
    q2l_d_ff: int = setting(2048, "query2label: MLP width", COUNT)
    q2l_dropout: float = setting(0.1, "query2label: dropout rate", RATE)


def _heads_divide_widths(cfg: ModelConfig) -> str | None:
    """backbone.embed_dim is divisible by backbone.num_heads, and head.d_model by head.n_heads."""
    b, h = cfg.backbone, cfg.head
    if b.embed_dim % b.num_heads:
        return f"model.backbone.embed_dim: {b.embed_dim} is not divisible by num_heads {b.num_heads}"
    if h.d_model % h.n_heads:
        return f"model.head.d_model: {h.d_model} is not divisible by n_heads {h.n_heads}"
    return None


def _oce_fits(cfg: ModelConfig) -> str | None:
    """backbone.oce_start_layer is below backbone.depth; head.cls_emb_from_backbone needs it, and head.d_model equal
    to backbone.embed_dim."""
    b, h = cfg.backbone, cfg.head
    if b.oce_start_layer is not None and not b.oce_start_layer < b.depth:
        return f"model.backbone.oce_start_layer: {b.oce_start_layer} is outside [0, {b.depth})"
    if h.cls_emb_from_backbone:
        if b.oce_start_layer is None:
            return "model.head.cls_emb_from_backbone: needs model.backbone.oce_start_layer"
        if h.d_model != b.embed_dim:
            return "model.head.cls_emb_from_backbone: needs head.d_model == backbone.embed_dim"
    return None


def _rankseg_head_fits(cfg: ModelConfig) -> str | None:
    """RankSeg: head.topk is at most num_classes; a segmentation block is left after the image-level one; only the
    encoder_layer branch supports OCE; the other branches need head.downsample; query2label needs head.d_model
    divisible by head.q2l_heads and by 4 (its sine position table has d_model / 4 frequencies per axis)."""
    h = cfg.head
    if h.type != "rankseg":
        return None
    if not 1 <= h.topk <= cfg.num_classes:
        return f"model.head.topk: {h.topk} must be in [1, num_classes={cfg.num_classes}]"
    first = 1 if h.multilabel_head == "encoder_layer" else 0
    if h.n_layers <= first:
        return f"model.head.n_layers: {h.n_layers} leaves no segmentation block"
    if h.multilabel_head != "encoder_layer" and h.cls_emb_from_backbone:
        return f"model.head.multilabel_head: {h.multilabel_head} does not support OCE"
    if h.multilabel_head != "encoder_layer" and h.downsample is None:
        return f"model.head.downsample: {h.multilabel_head} needs a pooled grid size"
    if h.multilabel_head == "query2label" and (h.d_model % h.q2l_heads or h.d_model % 4):
        return f"model.head.d_model: {h.d_model} is not divisible by 4 and by q2l_heads {h.q2l_heads}"
    return None


def _class_weights_fit(cfg: ModelConfig) -> str | None:
    """Each pixel term's class_weight has num_classes entries."""
    return class_weights_fit(cfg.num_classes, cfg.loss)


def _one_name_per_class(cfg: ModelConfig) -> str | None:
    """class_names, when given, has num_classes names."""
    if cfg.class_names is not None and len(cfg.class_names) != cfg.num_classes:
        return f"model.class_names: {len(cfg.class_names)} names for num_classes={cfg.num_classes}"
    return None


@dataclass
class ModelConfig(Section):
    key: ClassVar[str] = "model"
    rules: ClassVar[tuple[Callable[[Any], str | None], ...]] = (
        _heads_divide_widths, _oce_fits, _rankseg_head_fits, _one_name_per_class, _class_weights_fit)
    num_classes: int = setting(150, "classes the model predicts", COUNT)
    backbone: BackboneConfig = setting(doc="the ViT encoder", factory=BackboneConfig)
    head: HeadConfig = setting(doc="the decoder head", factory=HeadConfig)
    loss: LossConfig = setting(doc="the training losses", factory=LossConfig)
    padding: Literal["stretch", "crop"] = setting(
        "stretch", "how patch-grid logits of a zero-padded input map back onto it: stretch the padded grid onto the "
                   "input (mmseg fork) or upsample to the padded size and crop (official)")
    class_names: list[str] | None = setting(None, "one name per class; null: the dataset's names")

    def __post_init__(self) -> None:
        h = self.head
        if h.d_model is None:
            h.d_model = self.backbone.embed_dim
        if h.n_heads is None:
            h.n_heads = max(1, h.d_model // 64)
        if h.d_ff is None:
            h.d_ff = 4 * h.d_model
        super().__post_init__()


def model_config_from(data: ModelConfig | dict[str, Any] | str | Path) -> ModelConfig:
    """A ModelConfig from a dataclass, a dict (``model`` section or whole config), or a YAML path."""
    if isinstance(data, ModelConfig):
        return data
    if isinstance(data, (str, Path)):
        data = load_yaml(data)
    if "model" in data and isinstance(data["model"], dict):
        return from_dict(ModelConfig, data["model"], "model")
    return from_dict(ModelConfig, data, "model")


# --------------------------------------------------------------------------------------------------------------
# Data, training, evaluation


@dataclass
class DataConfig(Section):
    key: ClassVar[str] = "data"
    dataset: str = setting("synthetic", "a dataset name (segrank datasets list) or folder")
    root: str | None = setting(None, "the dataset's folder (the synthetic dataset has none)")
    train_split: str = setting("train", "split trained on")
    val_split: str = setting("val", "split evaluated on")
    img_scale: tuple[int, int] = setting((2048, 512), "(long, short) target of the keep-ratio resize, train and test",
                                         COUNT)
    crop_size: tuple[int, int] = setting((512, 512), "training crop (height, width)", COUNT)
    ratio_range: tuple[float, float] = setting((0.5, 2.0), "training rescale: img_scale times a ratio drawn from "
                                                           "this range", above(0, ordered=True))
    cat_max_ratio: float = setting(0.75, "a training crop is redrawn (up to 10 times) while one class covers this "
                                         "fraction of it or more; 1: no redraw", Bound(lo=0, hi=1, lo_open=True))
    flip_prob: float = setting(0.5, "probability of a horizontal flip in training", PROBABILITY)
    photometric: bool = setting(True, "random brightness, contrast, saturation and hue in training")
    normalization: Literal["imagenet", "half"] | None = setting(
        None, "pixel normalisation: ImageNet mean/std, or (x - 127.5) / 127.5; null: the dataset's reference "
                     "default")
    workers: int = setting(2, "data-loading worker processes per process; 0: load in the main process",
                           NON_NEGATIVE)
    options: dict[str, Any] = setting(doc="dataset-specific options: synthetic sizes, huggingface columns, classes and "
                                          "label encoding (docs/datasets.md)", factory=dict)


def _accumulation_divides_batch(tc: TrainConfig) -> str | None:
    """batch_size is divisible by grad_accum (and, when training, by grad_accum x processes)."""
    if tc.batch_size % tc.grad_accum:
        return f"train.batch_size: {tc.batch_size} is not divisible by grad_accum {tc.grad_accum}"
    return None


def _precision_agrees(tc: TrainConfig) -> str | None:
    """train.amp (deprecated) and train.precision do not contradict each other."""
    if tc.amp != "none" and tc.precision is not None and tc.precision != tc.amp:
        return f"train.precision: {tc.precision} contradicts train.amp {tc.amp} (deprecated; drop it)"
    return None


def _schedule_decays(tc: TrainConfig) -> str | None:
    """min_lr is at most lr: the poly schedule decays from lr to min_lr."""
    if tc.min_lr > tc.lr:
        return f"train.min_lr: {tc.min_lr} is above train.lr {tc.lr} (the schedule decays from lr to min_lr)"
    return None


@dataclass
class TrainConfig(Section):
    key: ClassVar[str] = "train"
    rules: ClassVar[tuple[Callable[[Any], str | None], ...]] = (_accumulation_divides_batch, _schedule_decays,
                                                                 _precision_agrees)
    max_iters: int = setting(160000, "optimiser steps of the run", COUNT)
    batch_size: int = setting(8, "global batch per optimiser step, whatever the number of processes", COUNT)
    grad_accum: int = setting(1, "micro-batches per optimiser step", COUNT)
    optimizer: Literal["sgd", "adamw"] = setting("sgd", "sgd (the reference) or adamw (decoupled weight decay)")
    lr: float = setting(1e-3, "learning rate at step 0, before lr_mult", POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", RATE)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW moment decay rates (beta1, beta2)", RATE)
    weight_decay: float = setting(0.0, "weight decay (SGD: added to the gradient; AdamW: decoupled)", NON_NEGATIVE)
    # The longest key that is a substring of the parameter's reference (mmseg) name wins, as in mmcv's
    # DefaultOptimizerConstructor.
    decay_mult: dict[str, float] = setting(
        doc="weight-decay multiplier per parameter-name substring (longest matching key wins; a key that matches "
            "no parameter is refused, except these default keys)", bound=NON_NEGATIVE,
        factory=lambda: {"pos_embed": 0.0, "cls_token": 0.0, "norm": 0.0})
    lr_mult: dict[str, float] = setting(
        doc="learning-rate multiplier per parameter-name substring, matched like decay_mult (mmcv custom_keys "
            "lr_mult); {}: one learning rate", bound=NON_NEGATIVE, factory=dict)
    norm_decay_mult: float | None = setting(
        None, "weight-decay multiplier of normalisation-layer parameters no decay_mult key matches (mmcv "
              "paramwise_cfg); null: the base decay", NON_NEGATIVE)
    bias_decay_mult: float | None = setting(
        None, "weight-decay multiplier of the other layers' biases no decay_mult key matches (mmcv paramwise_cfg); "
              "null: the base decay", NON_NEGATIVE)
    lr_power: float = setting(0.9, "exponent of the poly decay", NON_NEGATIVE)
    min_lr: float = setting(1e-5, "learning rate the poly decay ends at", NON_NEGATIVE)
    warmup_iters: int = setting(0, "steps of linear warmup", NON_NEGATIVE)
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = setting(
        None, "compute precision of the forward and backward passes (fp32 master weights; bf16/fp16 autocast on CPU "
              "and CUDA, fp16 with a gradient scaler on CUDA); auto: the fastest here (announced); null: train.amp")
    amp: Literal["none", "bf16", "fp16"] = setting("none", "deprecated alias of train.precision (none: fp32)")
    seed: int = setting(0, "seed of the weights, the data order, augmentation and dropout", within(0, 2**32 - 1))
    checkpoint_interval: int = setting(0, "steps between checkpoints; 0: max_iters // 10", NON_NEGATIVE)
    eval_interval: int = setting(0, "steps between evaluations; 0: max_iters // 10; -1: no evaluation during "
                                    "training", at_least(-1))
    keep_checkpoints: int = setting(3, "newest checkpoints kept on disk; 0: all", NON_NEGATIVE)
    log_interval: int = setting(50, "steps between log.jsonl records", COUNT)
    pretrained: str | None = setting(None, "backbone weights to start from (.npz AugReg or timm state dict)")
    nonfinite: Literal["stop", "skip"] = setting("stop", "on a NaN/inf loss: stop the run, or skip the step")
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] | None = setting(
        None, "experiment trackers that receive the log records, the config and the eval results (README: Experiment "
              "trackers); "
              "null: tensorboard when installed; []: none")


def _windows_cover_image(ec: EvalConfig) -> str | None:
    """slide mode: stride is at most crop_size on each side, so the windows leave no gap."""
    if ec.mode == "slide" and any(s > c for s, c in zip(ec.stride, ec.crop_size, strict=True)):
        return (f"eval.stride: {list(ec.stride)} is larger than eval.crop_size {list(ec.crop_size)} (the windows "
                "would leave gaps)")
    return None


@dataclass
class EvalConfig(Section):
    key: ClassVar[str] = "eval"
    rules: ClassVar[tuple[Callable[[Any], str | None], ...]] = (_windows_cover_image,)
    mode: Literal["whole", "slide"] = setting("slide", "whole image in one pass, or sliding windows")
    crop_size: tuple[int, int] = setting((512, 512), "sliding window (height, width)", COUNT)
    stride: tuple[int, int] = setting((512, 512), "step between sliding windows (height, width)", COUNT)
    scales: list[float] = setting(doc="test scales, as ratios of data.img_scale", bound=above(0, nonempty=True),
                                  factory=lambda: [1.0])
    flip: bool = setting(False, "also average the horizontally flipped image")
    ms_scales: list[float] = setting(doc="test scales of --ms-flip", bound=above(0, nonempty=True),
                                     factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    batch_size: int = setting(1, "windows per forward pass", COUNT)


@dataclass
class Config:
    model: ModelConfig = setting(doc="the network and its losses", factory=ModelConfig)
    data: DataConfig = setting(doc="the dataset and its augmentation", factory=DataConfig)
    train: TrainConfig = setting(doc="optimisation, checkpoints and logging", factory=TrainConfig)
    eval: EvalConfig = setting(doc="test-time inference", factory=EvalConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (with ``_base_`` composition) and apply ``key=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)
