"""Checkpoints: segrank's native format and importers/exporters for the reference layouts.

Native: ``.safetensors`` weights whose metadata holds the ModelConfig as YAML, so the file alone rebuilds the model.
Foreign layouts (``format``):
- ``mmseg``: RankSeg fork / mmseg 0.17 ``.pth`` ({"meta": {"config": text, "CLASSES"}, "state_dict"}); the
  architecture is read from ``meta.config`` (parsed as literals, never executed) unless ``config`` is given.
- ``segmenter``: the official Segmenter ``checkpoint.pth`` with its ``variant.yml`` beside it.
- ``npz``: Google AugReg ViT weights (backbone only); the head is freshly initialised from ``config``.
- ``timm``: a timm-named ViT state dict (``.pth`` or ``.safetensors``; backbone only).
Pickled files are always read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import argparse
import ast
import os
import pprint
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from segrank.config import ConfigError, ModelConfig, from_dict, model_config_from, to_dict
from segrank.errors import SegrankError
from segrank.models.segmentor import Segmentor
from segrank.models.vit import resample_pos_embed

FORMATS = ("native", "mmseg", "segmenter", "npz", "timm")
NATIVE_KEY = "segrank_config"


class CheckpointError(SegrankError):
    """A file that is not a usable checkpoint, or one that does not fit the architecture."""


# --------------------------------------------------------------------------------------------------------------
# Key maps: (our name, foreign name) templates, used in both directions. {i}: a block index, {p}: weight|bias,
# {name}: any name.

MMSEG_BACKBONE_KEYS = [
    ("patch_embed.proj.{p}", "patch_embed.projection.{p}"),
    ("blocks.{i}.norm1.{p}", "layers.{i}.ln1.{p}"),
    ("blocks.{i}.norm2.{p}", "layers.{i}.ln2.{p}"),
    ("blocks.{i}.attn.qkv.weight", "layers.{i}.attn.attn.in_proj_weight"),
    ("blocks.{i}.attn.qkv.bias", "layers.{i}.attn.attn.in_proj_bias"),
    ("blocks.{i}.attn.proj.{p}", "layers.{i}.attn.attn.out_proj.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "layers.{i}.ffn.layers.0.0.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "layers.{i}.ffn.layers.1.{p}"),
    ("norm.{p}", "ln1.{p}"),
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("cls_emb", "cls_emb"),
]
# Global-pooling classifier: ours is Sequential(pool, conv, relu, conv); mmcv's ConvModule wraps conv + relu.
MMSEG_HEAD_KEYS = [
    ("img_cls_head.1.{p}", "img_cls_head.1.conv.{p}"),
    ("img_cls_head.3.{p}", "img_cls_head.2.{p}"),
    ("{name}", "{name}"),
]
_PLACEHOLDERS = {"i": r"\d+", "p": "weight|bias", "name": ".+"}


def _template_regex(template: str) -> str:
    parts = re.split(r"\{(\w+)\}", template)
    return "".join(
        re.escape(part) if j % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})" for j, part in enumerate(parts)
    )


def _rename(name: str, table: list[tuple[str, str]], reverse: bool = False) -> str | None:
    for ours, theirs in table:
        source, target = (theirs, ours) if reverse else (ours, theirs)
        match = re.fullmatch(_template_regex(source), name)
        if match:
            return target.format(**match.groupdict())
    return None


def to_mmseg_name(name: str) -> str:
    """The reference (mmseg) name of one of our parameters, e.g. for weight-decay key matching."""
    prefix, _, rest = name.partition(".")
    renamed = _rename(rest, MMSEG_BACKBONE_KEYS if prefix == "backbone" else MMSEG_HEAD_KEYS)
    if renamed is None:
        raise KeyError(f"no reference name for parameter {name!r}")
    return f"{prefix}.{renamed}"


def _from_mmseg_name(name: str) -> str | None:
    prefix, _, rest = name.partition(".")
    if prefix == "backbone":
        renamed = _rename(rest, MMSEG_BACKBONE_KEYS, reverse=True)
    elif prefix == "decode_head":
        renamed = _rename(rest, MMSEG_HEAD_KEYS, reverse=True)
    else:
        return None
    return None if renamed is None else f"{prefix}.{renamed}"


# --------------------------------------------------------------------------------------------------------------
# Safe reading


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means: not a safe checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            first = "it contains Python objects that would run code when loaded; refusing to load it"
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first[:200]})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid .safetensors file ({str(err)[:200]})") from None


def _literal(node: ast.AST) -> Any:
    """Evaluate an mmcv config expression made of literals and dict(...) calls, without executing anything."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, (ast.List, ast.Tuple)):
        values = [_literal(v) for v in node.elts]
        return values if isinstance(node, ast.List) else tuple(values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand)
    return ast.literal_eval(node)


def parse_mmseg_config(text: str) -> dict[str, Any]:
    """Top-level assignments of an mmcv config text that are plain literals (others are skipped)."""
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise CheckpointError(f"meta.config is not readable Python config text ({err.msg})") from None
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = _literal(stmt.value)
            except (ValueError, TypeError, SyntaxError):
                continue
    return out


# --------------------------------------------------------------------------------------------------------------
# Architecture from reference configs

_HEAD_TYPES = {
    "MaskTransformerHead": "segmenter",
    "MaskTransformerRankSegHead": "rankseg",
    "MaskTransformerRankSegGTHead": "rankseg_gt",
    "MaskTransformerRankSegDecoderHead": "rankseg",
}


def model_config_from_mmseg(model: dict[str, Any], class_names: list[str] | None = None) -> ModelConfig:
    """segrank ModelConfig from an mmseg ``model = dict(...)`` of the RankSeg fork."""
    try:
        bb, head = model["backbone"], model["decode_head"]
        head_type = head["type"].replace("MLSeg", "RankSeg")  # pre-rename names (commit fb7a30f)
        if head_type not in _HEAD_TYPES:
            raise CheckpointError(f"meta.config: decode head {head['type']!r} is not supported")
        patch = bb.get("patch_size", 16)
        img_size = bb.get("img_size", 224)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        backbone = {
            "patch_size": patch,
            "embed_dim": bb.get("embed_dims", 768),
            "depth": bb.get("num_layers", 12),
            "num_heads": bb.get("num_heads", 12),
            "mlp_ratio": float(bb.get("mlp_ratio", 4)),
            "pos_embed_grid": [img_size[0] // patch, img_size[1] // patch],
            "drop_path_rate": float(bb.get("drop_path_rate", 0.0)),
            "final_norm": bool(bb.get("final_norm", False)),
            "norm_eps": float(bb.get("norm_cfg", {}).get("eps", 1e-6)),
            "pos_embed_interpolation": bb.get("interpolate_mode", "bicubic"),
            "oce_start_layer": bb.get("cls_emb_start_layer") if bb.get("with_cls_emb") else None,
        }
        decode = {
            "type": _HEAD_TYPES[head_type],
            "d_model": head["d_model"],
            "n_heads": head["n_heads"],
            "d_ff": head["d_ff"],
            "n_layers": head["n_layers"],
            "dropout": float(head.get("dropout", 0.1)),
            "drop_path_rate": float(head.get("drop_path_rate", 0.0)),
            "cls_emb_from_backbone": bool(head.get("cls_emb_from_backbone", False)),
        }
        loss: dict[str, Any] = {}
        if decode["type"] == "rankseg":
            decode["topk"] = head["topk_cls"]
            decode["downsample"] = head.get("downsample")
            loss["image_loss_weight"] = float(head.get("img_loss_weight", 1.0))
            loss_img = head.get("loss_img", {"type": "BCELoss"})
            if loss_img["type"] == "AsymmetricLoss":
                loss.update(image_loss="asl", asl_gamma_neg=float(loss_img.get("gamma_neg", 4)),
                            asl_gamma_pos=float(loss_img.get("gamma_pos", 1)),
                            asl_clip=float(loss_img.get("clip", 0.05)), asl_eps=float(loss_img.get("eps", 1e-5)))
            else:
                loss["image_loss"] = "bce"
            if head_type == "MaskTransformerRankSegDecoderHead":
                cls_head = head["img_cls_head"]
                if cls_head["type"] == "RankSegDecoderHead":
                    decode.update(multilabel_head="query2label", q2l_heads=cls_head.get("nhead", 8),
                                  q2l_d_ff=cls_head.get("dim_feedforward", 2048),
                                  q2l_dropout=float(cls_head.get("dropout", 0.1)))
                else:
                    decode["multilabel_head"] = "global_pool"
        cfg = {"num_classes": head["n_cls"], "backbone": backbone, "head": decode, "loss": loss,
               "padding": "stretch", "class_names": list(class_names) if class_names else None}
    except KeyError as err:
        raise CheckpointError(f"meta.config: missing model key {err}") from None
    return from_dict(ModelConfig, cfg, "model")


def mmseg_config_text(cfg: ModelConfig) -> str:
    """The reference ``model = dict(...)`` text describing ``cfg`` (inverse of model_config_from_mmseg)."""
    b, h, loss = cfg.backbone, cfg.head, cfg.loss
    backbone = {
        "type": "VisionTransformer",
        "img_size": (b.pos_embed_grid[0] * b.patch_size, b.pos_embed_grid[1] * b.patch_size),
        "patch_size": b.patch_size, "embed_dims": b.embed_dim, "num_layers": b.depth, "num_heads": b.num_heads,
        "mlp_ratio": b.mlp_ratio, "qkv_bias": True, "drop_path_rate": b.drop_path_rate, "with_cls_token": True,
        "norm_cfg": {"type": "LN", "eps": b.norm_eps}, "final_norm": b.final_norm,
        "interpolate_mode": b.pos_embed_interpolation,
    }
    if b.oce_start_layer is not None:
        backbone.update(with_cls_emb=True, num_classes=cfg.num_classes, cls_emb_start_layer=b.oce_start_layer)
    types = {"segmenter": "MaskTransformerHead", "rankseg": "MaskTransformerRankSegHead",
             "rankseg_gt": "MaskTransformerRankSegGTHead"}
    if h.type not in types:
        raise CheckpointError(f"head type {h.type!r} has no mmseg equivalent")
    head: dict[str, Any] = {
        "type": types[h.type], "n_cls": cfg.num_classes, "patch_size": b.patch_size, "d_encoder": b.embed_dim,
        "n_layers": h.n_layers, "n_heads": h.n_heads, "d_model": h.d_model, "d_ff": h.d_ff,
        "drop_path_rate": h.drop_path_rate, "dropout": h.dropout, "cls_emb_from_backbone": h.cls_emb_from_backbone,
    }
    if h.type == "rankseg":
        head.update(topk_cls=h.topk, downsample=h.downsample, img_loss_weight=loss.image_loss_weight)
        head["loss_img"] = (
            {"type": "BCELoss"} if loss.image_loss == "bce"
            else {"type": "AsymmetricLoss", "gamma_neg": loss.asl_gamma_neg, "gamma_pos": loss.asl_gamma_pos,
                  "clip": loss.asl_clip, "eps": loss.asl_eps}
        )
        if h.multilabel_head != "encoder_layer":
            head["type"] = "MaskTransformerRankSegDecoderHead"
            head["img_cls_head"] = (
                {"type": "RankSegDecoderHead", "input_dim": b.embed_dim, "hidden_dim": h.d_model,
                 "size": h.downsample, "num_class": cfg.num_classes, "share_embedding": True,
                 "nhead": h.q2l_heads, "dim_feedforward": h.q2l_d_ff, "dropout": h.q2l_dropout}
                if h.multilabel_head == "query2label"
                else {"type": "RankSegGlobalPoolingHead", "d_encoder": b.embed_dim, "n_cls": cfg.num_classes}
            )
    model = {"type": "EncoderDecoder", "backbone": backbone,
             "neck": {"type": "UseIndexSingleOutNeck", "index": -1}, "decode_head": head}
    return "model = " + pprint.pformat(model, sort_dicts=False) + "\n"


class _VariantLoader(yaml.SafeLoader):
    """Safe YAML loader that also accepts the ``!!python/tuple`` tag the official Segmenter writes."""


_VariantLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def model_config_from_segmenter(variant: dict[str, Any]) -> ModelConfig:
    """segrank ModelConfig from an official Segmenter ``variant.yml`` (net_kwargs)."""
    try:
        net = variant["net_kwargs"]
        if net.get("distilled"):
            raise CheckpointError("variant.yml: distilled (DeiT) backbones are not supported")
        patch = net["patch_size"]
        size = net["image_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        d = net["d_model"]
        decoder = net["decoder"]
        head: dict[str, Any] = {"norm_eps": 1e-5}
        if decoder["name"] == "mask_transformer":
            head.update(type="segmenter", d_model=d, n_heads=max(1, d // 64), d_ff=4 * d,
                        n_layers=decoder["n_layers"], dropout=float(decoder.get("dropout", 0.1)),
                        drop_path_rate=float(decoder.get("drop_path_rate", 0.0)))
        elif "linear" in decoder["name"]:
            head["type"] = "linear"
        else:
            raise CheckpointError(f"variant.yml: decoder {decoder['name']!r} is not supported")
        cfg = {
            "num_classes": net["n_cls"],
            "backbone": {"patch_size": patch, "embed_dim": d, "depth": net["n_layers"], "num_heads": net["n_heads"],
                         "mlp_ratio": 4.0, "pos_embed_grid": [size[0] // patch, size[1] // patch],
                         "drop_path_rate": float(net.get("drop_path_rate", 0.0)), "final_norm": True,
                         "norm_eps": 1e-5, "pos_embed_interpolation": "bilinear"},
            "head": head,
            "padding": "crop",
        }
    except KeyError as err:
        raise CheckpointError(f"variant.yml: missing key {err}") from None
    return from_dict(ModelConfig, cfg, "model")


# --------------------------------------------------------------------------------------------------------------
# Google AugReg npz <-> timm-named backbone


def _npz_block_keys(i: int) -> list[tuple[str, str]]:
    """(our key, npz key) of block i whose arrays are equal up to a transpose (2-D) or identical (1-D)."""
    p = f"Transformer/encoderblock_{i}/"
    pairs = [("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")]
    keys = [(f"blocks.{i}.{ours}.weight", f"{p}{theirs}/scale") for ours, theirs in pairs]
    keys += [(f"blocks.{i}.{ours}.bias", f"{p}{theirs}/bias") for ours, theirs in pairs]
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        keys += [(f"blocks.{i}.mlp.{ours}.weight", f"{p}MlpBlock_3/{theirs}/kernel"),
                 (f"blocks.{i}.mlp.{ours}.bias", f"{p}MlpBlock_3/{theirs}/bias")]
    keys.append((f"blocks.{i}.attn.proj.bias", f"{p}MultiHeadDotProductAttention_1/out/bias"))
    return keys


_QKV = ("query", "key", "value")


def npz_to_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Google Flax ViT arrays -> timm-named backbone state dict (position table at its stored grid)."""
    try:
        dim = arrays["cls"].shape[-1]
        sd = {
            "patch_embed.proj.weight": arrays["embedding/kernel"].transpose(3, 2, 0, 1),
            "patch_embed.proj.bias": arrays["embedding/bias"],
            "cls_token": arrays["cls"],
            "pos_embed": arrays["Transformer/posembed_input/pos_embedding"],
            "norm.weight": arrays["Transformer/encoder_norm/scale"],
            "norm.bias": arrays["Transformer/encoder_norm/bias"],
        }
        depth = len({k.split("/")[1] for k in arrays if k.startswith("Transformer/encoderblock_")})
        for i in range(depth):
            for ours, theirs in _npz_block_keys(i):
                sd[ours] = arrays[theirs].T
            attn = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
            kernels = [arrays[attn + f"{n}/kernel"].reshape(dim, -1).T for n in _QKV]
            sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(kernels)
            sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([arrays[attn + f"{n}/bias"].reshape(-1) for n in _QKV])
            sd[f"blocks.{i}.attn.proj.weight"] = arrays[attn + "out/kernel"].reshape(-1, dim).T
    except KeyError as err:
        raise CheckpointError(f"npz: missing array {err}") from None
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}


def state_dict_to_npz(sd: dict[str, Tensor], num_heads: int) -> dict[str, np.ndarray]:
    """timm-named backbone state dict -> Google Flax ViT arrays (inverse of npz_to_state_dict)."""
    a = {k: v.detach().cpu().numpy() for k, v in sd.items()}
    dim = a["cls_token"].shape[-1]
    head_dim = dim // num_heads
    out = {
        "embedding/kernel": a["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": a["patch_embed.proj.bias"],
        "cls": a["cls_token"],
        "Transformer/posembed_input/pos_embedding": a["pos_embed"],
        "Transformer/encoder_norm/scale": a["norm.weight"],
        "Transformer/encoder_norm/bias": a["norm.bias"],
    }
    depth = len({k.split(".")[1] for k in a if k.startswith("blocks.")})
    for i in range(depth):
        for ours, theirs in _npz_block_keys(i):
            out[theirs] = a[ours].T
        attn = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        out[attn + "out/kernel"] = a[f"blocks.{i}.attn.proj.weight"].T.reshape(num_heads, head_dim, dim)
        qkv_w = a[f"blocks.{i}.attn.qkv.weight"].reshape(3, dim, dim)
        qkv_b = a[f"blocks.{i}.attn.qkv.bias"].reshape(3, dim)
        for j, n in enumerate(_QKV):
            out[attn + f"{n}/kernel"] = qkv_w[j].T.reshape(dim, num_heads, head_dim)
            out[attn + f"{n}/bias"] = qkv_b[j].reshape(num_heads, head_dim)
    return out


# --------------------------------------------------------------------------------------------------------------
# Loading into a model


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load with one clear error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: does not fit the architecture ({'; '.join(problems)})")
    model.load_state_dict(state_dict, strict=True)


def _fit_pos_embed(sd: dict[str, Tensor], model: Segmentor, key: str = "backbone.pos_embed") -> None:
    """Resample a stored position table to the model's grid at load time (as the reference's init_weights)."""
    if key not in sd:
        return
    table = sd[key]
    grid = tuple(model.backbone.pos_embed_grid)
    n_grid = table.shape[1] - 1
    if n_grid == grid[0] * grid[1] and table.shape[1] == model.backbone.pos_embed.shape[1]:
        return
    side = int(round(n_grid**0.5))
    if side * side != n_grid:
        raise CheckpointError(f"{key}: {n_grid} position entries are not a square grid")
    sd[key] = resample_pos_embed(table, (side, side), grid, model.cfg.backbone.pos_embed_interpolation)


def _backbone_only(model: Segmentor, backbone_sd: dict[str, Tensor], source: str) -> Segmentor:
    """Load backbone weights; the head keeps its fresh init. OCE class tokens stay zero, as in the reference."""
    sd = {f"backbone.{k}": v for k, v in backbone_sd.items()}
    _fit_pos_embed(sd, model)
    if model.backbone.oce_start_layer is not None and "backbone.cls_emb" not in sd:
        sd["backbone.cls_emb"] = torch.zeros_like(model.backbone.cls_emb)
    for key, value in model.state_dict().items():
        if key.startswith("decode_head."):
            sd[key] = value
    load_state_dict_strict(model, sd, source)
    return model


def _strip_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ViT state dict -> our backbone keys: drop classifier heads and a common prefix."""
    for prefix in ("backbone.", "encoder.", "module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}


def detect_format(path: Path) -> str:
    if path.is_dir() or path.name == "variant.yml" or (path.parent / "variant.yml").is_file():
        return "segmenter"
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".safetensors":
        _, metadata = _read_safetensors(path)
        return "native" if NATIVE_KEY in metadata else "timm"
    obj = _torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        return "mmseg"
    return "timm"


def load_model(
    path: str | Path, format: str = "auto", config: ModelConfig | dict | str | Path | None = None
) -> Segmentor:
    """Load a model in eval mode from any supported checkpoint layout (see module docstring).

    ``config`` (a ModelConfig, a dict in segrank's schema, or a YAML path) gives the architecture for formats
    that do not carry it (npz, timm), and overrides the one stored in mmseg/official checkpoints.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if format not in FORMATS + ("auto",):
        raise CheckpointError(f"unknown checkpoint format {format!r} (choose from {', '.join(FORMATS)})")
    fmt = detect_format(path) if format == "auto" else format
    cfg = model_config_from(config) if config is not None else None
    model = _LOADERS[fmt](path, cfg)
    return model.eval()


def _load_native(path: Path, cfg: ModelConfig | None) -> Segmentor:
    sd, metadata = _read_safetensors(path)
    if cfg is None:
        if NATIVE_KEY not in metadata:
            raise CheckpointError(f"{path}: no segrank config in the metadata; pass a config")
        try:
            cfg = from_dict(ModelConfig, yaml.safe_load(metadata[NATIVE_KEY]), "model")
        except (ConfigError, yaml.YAMLError) as err:
            raise CheckpointError(f"{path}: stored config is invalid ({err})") from None
    model = Segmentor(cfg)
    load_state_dict_strict(model, sd, str(path))
    return model


def _load_mmseg(path: Path, cfg: ModelConfig | None) -> Segmentor:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not an mmseg checkpoint (no 'state_dict' mapping)")
    meta = ckpt.get("meta") or {}
    if cfg is None:
        parsed = parse_mmseg_config(meta.get("config", "")) if isinstance(meta.get("config"), str) else {}
        if "model" not in parsed:
            raise CheckpointError(f"{path}: meta.config holds no model definition; pass --config")
        classes = meta.get("CLASSES")
        cfg = model_config_from_mmseg(parsed["model"], list(classes) if classes else None)
    sd = {}
    for key, value in ckpt["state_dict"].items():
        ours = _from_mmseg_name(key)
        sd[ours if ours is not None else key] = value
    model = Segmentor(cfg)
    load_state_dict_strict(model, sd, str(path))
    return model


def _load_segmenter(path: Path, cfg: ModelConfig | None) -> Segmentor:
    folder = path if path.is_dir() else path.parent
    ckpt_path = folder / "checkpoint.pth" if path.is_dir() or path.name == "variant.yml" else path
    if cfg is None:
        variant_path = folder / "variant.yml"
        if not variant_path.is_file():
            raise CheckpointError(f"{variant_path}: not found (the official checkpoint needs its variant.yml)")
        try:
            variant = yaml.load(variant_path.read_text(), Loader=_VariantLoader)  # noqa: S506 - safe subclass
        except yaml.YAMLError as err:
            raise CheckpointError(f"{variant_path}: invalid YAML ({str(err).splitlines()[0]})") from None
        cfg = model_config_from_segmenter(variant)
    ckpt = _torch_load(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{ckpt_path}: not an official Segmenter checkpoint (no 'model' mapping)")
    sd = {}
    for key, value in ckpt["model"].items():
        if key.startswith("encoder.head."):
            continue  # the unused ImageNet classifier
        prefix, _, rest = key.partition(".")
        sd[{"encoder": "backbone", "decoder": "decode_head"}.get(prefix, prefix) + "." + rest] = value
    model = Segmentor(cfg)
    load_state_dict_strict(model, sd, str(ckpt_path))
    return model


def _require_config(cfg: ModelConfig | None, path: Path, fmt: str) -> ModelConfig:
    if cfg is None:
        raise CheckpointError(f"{path}: {fmt} weights hold a backbone only; pass a config for the model")
    return cfg


def _load_npz(path: Path, cfg: ModelConfig | None) -> Segmentor:
    cfg = _require_config(cfg, path, "npz")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable .npz file ({str(err)[:200]})") from None
    return _backbone_only(Segmentor(cfg), npz_to_state_dict(arrays), str(path))


def _load_timm(path: Path, cfg: ModelConfig | None) -> Segmentor:
    cfg = _require_config(cfg, path, "timm")
    sd = _read_safetensors(path)[0] if path.suffix == ".safetensors" else _torch_load(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return _backbone_only(Segmentor(cfg), _strip_timm(sd), str(path))


_LOADERS = {"native": _load_native, "mmseg": _load_mmseg, "segmenter": _load_segmenter, "npz": _load_npz,
            "timm": _load_timm}


def load_backbone_weights(model: Segmentor, path: str | Path) -> Segmentor:
    """Initialise the backbone of ``model`` from AugReg ``.npz`` or timm weights (training from pretrained)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            sd = npz_to_state_dict({k: data[k] for k in data.files})
    else:
        raw = _read_safetensors(path)[0] if path.suffix == ".safetensors" else _torch_load(path)
        sd = _strip_timm(raw.get("model", raw) if isinstance(raw, dict) else raw)
    return _backbone_only(model, sd, str(path))


# --------------------------------------------------------------------------------------------------------------
# Writing


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: Segmentor, path: str | Path) -> Path:
    """Native checkpoint: ``.safetensors`` weights + the ModelConfig as YAML in the metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: native checkpoints are .safetensors files")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {NATIVE_KEY: yaml.safe_dump(to_dict(model.cfg), sort_keys=False), "format": "segrank"}
    _atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
    return path


def export_checkpoint(model: Segmentor, path: str | Path, format: str) -> Path:
    """Write ``model`` in a foreign layout: mmseg .pth, official Segmenter folder, npz or timm (backbones only)."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if format == "mmseg":
        ckpt = {
            "meta": {"config": mmseg_config_text(model.cfg), "CLASSES": tuple(model.cfg.class_names or ())},
            "state_dict": {to_mmseg_name(k): v for k, v in sd.items()},
        }
        _atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    elif format == "segmenter":
        if model.cfg.head.type not in ("segmenter", "linear"):
            raise CheckpointError(f"the official Segmenter has no {model.cfg.head.type!r} head")
        renamed = {("encoder" if k.startswith("backbone.") else "decoder") + k[k.index("."):]: v for k, v in sd.items()}
        ckpt = {"model": renamed, "n_cls": model.num_classes}
        variant = yaml.safe_dump(_segmenter_variant(model.cfg))
        _atomic_write(path / "checkpoint.pth", lambda tmp: torch.save(ckpt, tmp))
        _atomic_write(path / "variant.yml", lambda tmp: Path(tmp).write_text(variant))
    elif format == "npz":
        arrays = state_dict_to_npz(backbone, model.cfg.backbone.num_heads)
        _atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **arrays))  # noqa: SIM115
    elif format == "timm":
        _atomic_write(path, lambda tmp: save_file(backbone, tmp))
    else:
        raise CheckpointError(f"cannot export to format {format!r}")
    return path


def _segmenter_variant(cfg: ModelConfig) -> dict[str, Any]:
    b, h = cfg.backbone, cfg.head
    decoder = ({"name": "linear"} if h.type == "linear"
               else {"name": "mask_transformer", "n_layers": h.n_layers, "dropout": h.dropout,
                     "drop_path_rate": h.drop_path_rate})
    return {"net_kwargs": {
        "backbone": f"vit_patch{b.patch_size}", "image_size": [b.pos_embed_grid[0] * b.patch_size,
                                                              b.pos_embed_grid[1] * b.patch_size],
        "patch_size": b.patch_size, "d_model": b.embed_dim, "n_heads": b.num_heads, "n_layers": b.depth,
        "n_cls": cfg.num_classes, "distilled": False, "drop_path_rate": b.drop_path_rate, "dropout": 0.0,
        "decoder": decoder,
    }}


# --------------------------------------------------------------------------------------------------------------
# CLI: convert, info


def _convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: --out must end with .safetensors")
    if out.exists() and not args.force:
        raise CheckpointError(f"{out}: already exists (use --force to overwrite)")
    model = load_model(args.src, format=args.format, config=args.config)
    save_model(model, out)
    print(f"wrote {out}: {describe(model)}")
    return 0


def describe(model: Segmentor) -> str:
    cfg = model.cfg
    b, h = cfg.backbone, cfg.head
    head = h.type if h.type != "rankseg" else f"rankseg (top-{h.topk}, {h.multilabel_head})"
    params = sum(p.numel() for p in model.parameters())
    oce = ", OCE" if b.oce_start_layer is not None else ""
    return (f"ViT {b.embed_dim}d x {b.depth} (patch {b.patch_size}{oce}) + {head} head, "
            f"{cfg.num_classes} classes, {params / 1e6:.2f} M parameters")


def _info(args: argparse.Namespace) -> int:
    model = load_model(args.ckpt, format=args.format, config=args.config)
    cfg = model.cfg
    print(describe(model))
    if cfg.class_names:
        shown = ", ".join(cfg.class_names[:10]) + (", ..." if len(cfg.class_names) > 10 else "")
        print(f"classes: {shown}")
    print(yaml.safe_dump({"model": to_dict(cfg) | {"class_names": None}}, sort_keys=False).rstrip())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser("convert", help="convert a reference checkpoint to segrank's .safetensors")
    convert.add_argument("--from", dest="format", choices=["auto", *FORMATS[1:]], default="auto",
                         help="layout of SRC (default: detect)")
    convert.add_argument("src", help="checkpoint file (official Segmenter: checkpoint.pth or its folder)")
    convert.add_argument("--config", help="YAML config giving the architecture (needed for npz/timm)")
    convert.add_argument("--out", required=True, help="destination .safetensors")
    convert.add_argument("--force", action="store_true", help="overwrite an existing --out")
    convert.set_defaults(func=_convert)
    info = subparsers.add_parser("info", help="describe a checkpoint: architecture, classes, parameters")
    info.add_argument("ckpt")
    info.add_argument("--format", choices=["auto", *FORMATS], default="auto")
    info.add_argument("--config", help="YAML config for formats that do not carry their architecture")
    info.set_defaults(func=_info)
