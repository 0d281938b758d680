"""Typed configuration: dataclasses built strictly from YAML/dicts.

A config file is YAML; ``_base_: [a.yaml, b.yaml]`` composes files (later files and the file itself win,
dicts merge key by key). Every key is checked against the dataclass fields, so a typo is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from segrank.errors import SegrankError


class ConfigError(SegrankError, ValueError):
    """A configuration that cannot be used; the message names the key and the problem."""


# --------------------------------------------------------------------------------------------------------------
# Model


VIT_PRESETS: dict[str, dict[str, int]] = {
    "vit_t16": {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16},
    "vit_s16": {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16},
    "vit_b16": {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16},
    "vit_l16": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16},
}


@dataclass
class BackboneConfig:
    preset: str | None = None  # fills embed_dim/depth/num_heads/patch_size (explicit keys win)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pos_embed_grid: tuple[int, int] = (32, 32)  # grid of the learned position table (img_size / patch)
    drop_path_rate: float = 0.1
    final_norm: bool = True
    norm_eps: float = 1e-6  # mmseg fork: 1e-6, official Segmenter: 1e-5
    pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # fork: bicubic, official: bilinear
    oce_start_layer: int | None = None  # OCE: class tokens join the sequence before this block

    @staticmethod
    def expand_keys(data: dict[str, Any], path: str) -> dict[str, Any]:
        """A ``preset`` fills embed_dim/depth/num_heads/patch_size; keys given explicitly win."""
        preset = data.get("preset")
        if preset is None:
            return data
        if preset not in VIT_PRESETS:
            raise ConfigError(f"{_join(path, 'preset')}: unknown preset {preset!r}{_suggest(preset, VIT_PRESETS)}")
        return {**VIT_PRESETS[preset], **data}


@dataclass
class HeadConfig:
    type: Literal["segmenter", "rankseg", "rankseg_gt", "linear"] = "segmenter"
    d_model: int | None = None  # None: the backbone width
    n_heads: int | None = None  # None: d_model // 64
    d_ff: int | None = None  # None: 4 * d_model
    n_layers: int = 2
    dropout: float = 0.1
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    cls_emb_from_backbone: bool = False  # OCE: class tokens come from the backbone
    # RankSeg
    topk: int = 50
    multilabel_head: Literal["encoder_layer", "query2label", "global_pool"] = "encoder_layer"
    downsample: int | None = 8  # pooled grid the multi-label branch sees (None: all patch tokens)
    q2l_heads: int = 8
    q2l_d_ff: int = 2048
    q2l_dropout: float = 0.1


@dataclass
class LossConfig:
    image_loss: Literal["bce", "asl"] = "bce"
    image_loss_weight: float = 10.0
    asl_gamma_neg: float = 2.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    asl_eps: float = 1e-5
    # all_pixels: sum over valid pixels / all pixels (mmseg 0.17 reference); valid_pixels: mean over valid pixels
    seg_reduction: Literal["all_pixels", "valid_pixels"] = "all_pixels"


@dataclass
class ModelConfig:
    num_classes: int = 150
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # How patch-grid logits of a zero-padded input map back onto the input:
    # stretch = resize the padded grid onto the input (mmseg fork); crop = upsample to padded size, crop (official).
    padding: Literal["stretch", "crop"] = "stretch"
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        h = self.head
        if h.d_model is None:
            h.d_model = self.backbone.embed_dim
        if h.n_heads is None:
            h.n_heads = max(1, h.d_model // 64)
        if h.d_ff is None:
            h.d_ff = 4 * h.d_model
        validate_model_config(self)


def validate_model_config(cfg: ModelConfig) -> None:
    b, h = cfg.backbone, cfg.head
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes: must be >= 1, got {cfg.num_classes}")
    if b.embed_dim % b.num_heads:
        raise ConfigError(f"model.backbone.embed_dim: {b.embed_dim} is not divisible by num_heads {b.num_heads}")
    if h.d_model % h.n_heads:
        raise ConfigError(f"model.head.d_model: {h.d_model} is not divisible by n_heads {h.n_heads}")
    if b.oce_start_layer is not None and not 0 <= b.oce_start_layer < b.depth:
        raise ConfigError(f"model.backbone.oce_start_layer: {b.oce_start_layer} is outside [0, {b.depth})")
    if h.cls_emb_from_backbone:
        if b.oce_start_layer is None:
            raise ConfigError("model.head.cls_emb_from_backbone: needs model.backbone.oce_start_layer")
        if h.d_model != b.embed_dim:
            raise ConfigError("model.head.cls_emb_from_backbone: needs head.d_model == backbone.embed_dim")
    if h.type == "rankseg":
        if not 1 <= h.topk <= cfg.num_classes:
            raise ConfigError(f"model.head.topk: {h.topk} must be in [1, num_classes={cfg.num_classes}]")
        first = 1 if h.multilabel_head == "encoder_layer" else 0
        if h.n_layers <= first:
            raise ConfigError(f"model.head.n_layers: {h.n_layers} leaves no segmentation block")
        if h.multilabel_head != "encoder_layer" and h.cls_emb_from_backbone:
            raise ConfigError(f"model.head.multilabel_head: {h.multilabel_head} does not support OCE")
        if h.multilabel_head != "encoder_layer" and h.downsample is None:
            raise ConfigError(f"model.head.downsample: {h.multilabel_head} needs a pooled grid size")
    if cfg.class_names is not None and len(cfg.class_names) != cfg.num_classes:
        raise ConfigError(
            f"model.class_names: {len(cfg.class_names)} names for num_classes={cfg.num_classes}"
        )


# --------------------------------------------------------------------------------------------------------------
# Generic strict construction


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    if hasattr(cls, "expand_keys"):  # keys that stand for others, e.g. a backbone preset
        data = cls.expand_keys(data, path)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(f"{_join(path, key)}: unknown key{_suggest(key, names)}")
    kwargs = {key: _coerce(hints[key], value, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe structure of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _suggest(key: str, options: Any) -> str:
    match = difflib.get_close_matches(str(key), [str(o) for o in options], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{_suggest(value, args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value] * len(args) if args and args[-1] is not Ellipsis else [value]
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()} if args else dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


# --------------------------------------------------------------------------------------------------------------
# YAML files


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file, resolving ``_base_`` files relative to it; returns the merged plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge_dicts(merged, load_yaml(path.parent / base))
    return merge_dicts(merged, data)


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not value.pop("_delete_", False):
            out[key] = merge_dicts(out[key], value)
        else:
            if isinstance(value, dict):
                value.pop("_delete_", None)
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a plain config dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[keys[-1]] = value
    return data


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
class DataConfig:
    dataset: str = "synthetic"  # a name from segrank.data (``segrank datasets list``) or "folder"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    img_scale: tuple[int, int] = (2048, 512)  # (long, short) keep-ratio target, train and test
    crop_size: tuple[int, int] = (512, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    normalization: Literal["imagenet", "half"] | None = None  # None: the dataset's reference default
    workers: int = 2
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific (e.g. synthetic sizes)


@dataclass
class TrainConfig:
    max_iters: int = 160000
    batch_size: int = 8  # global batch per optimiser step, whatever the number of processes
    grad_accum: int = 1
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    # Per-parameter weight-decay multipliers: the longest key that is a substring of the parameter's
    # reference (mmseg) name wins, as in mmcv's DefaultOptimizerConstructor.
    decay_mult: dict[str, float] = field(
        default_factory=lambda: {"pos_embed": 0.0, "cls_token": 0.0, "norm": 0.0}
    )
    lr_power: float = 0.9
    min_lr: float = 1e-5
    warmup_iters: int = 0
    amp: Literal["none", "bf16", "fp16"] = "none"
    seed: int = 0
    checkpoint_interval: int = 0  # 0: max_iters // 10
    eval_interval: int = 0  # 0: max_iters // 10; -1: no evaluation during training
    keep_checkpoints: int = 3
    log_interval: int = 50
    pretrained: str | None = None  # backbone weights (.npz AugReg or timm state dict)
    nonfinite: Literal["stop", "skip"] = "stop"


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "slide"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (512, 512)
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    ms_scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])  # --ms-flip
    batch_size: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (with ``_base_`` composition) and apply ``key=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)
