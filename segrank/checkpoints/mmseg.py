"""RankSeg-fork / mmseg 0.17 checkpoints: ``{"meta": {"config": text, "CLASSES"}, "state_dict"}``.

The architecture is read from ``meta.config``, an mmcv Python config text, by parsing its literals: the text is
never executed. Parameter names map both ways through the key templates below.
"""

from __future__ import annotations

import ast
import pprint
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from segrank import files
from segrank.checkpoints.detect import CheckpointContent
from segrank.checkpoints.native import weights
from segrank.checkpoints.shapes import checked_model, tensor_shapes
from segrank.config import ConfigError, ModelConfig, from_dict, to_dict
from segrank.config.inference import InferenceConfig
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor

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


def from_mmseg_name(name: str) -> str | None:
    """Our name of a reference (mmseg) parameter name, or None for names outside backbone/decode_head."""
    prefix, _, rest = name.partition(".")
    if prefix == "backbone":
        renamed = _rename(rest, MMSEG_BACKBONE_KEYS, reverse=True)
    elif prefix == "decode_head":
        renamed = _rename(rest, MMSEG_HEAD_KEYS, reverse=True)
    else:
        return None
    return None if renamed is None else f"{prefix}.{renamed}"


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


def is_mmseg(content: CheckpointContent) -> bool:
    """A PyTorch mapping with a ``state_dict`` mapping, as mmcv's ``save_checkpoint`` writes."""
    return content.kind == "torch" and isinstance(content.mapping.get("state_dict"), dict)


def load_mmseg(path: Path, cfg: ModelConfig | None) -> Segmentor:
    """A model from an mmseg checkpoint; ``cfg`` overrides the architecture stored in ``meta.config``."""
    ckpt = files.read_torch(path)
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
        ours = from_mmseg_name(key)
        sd[ours if ours is not None else key] = value
    model = checked_model(cfg, tensor_shapes(sd), str(path))
    files.load_state_dict_strict(model, sd, str(path))
    model.inference = mmseg_inference_config(meta if isinstance(meta, dict) else {})
    return model


def mmseg_inference_config(meta: dict[str, Any]) -> InferenceConfig:
    """What the checkpoint's reference config records for testing: ``img_norm_cfg``, the test pipeline's
    ``MultiScaleFlipAug`` scale (and, in an ms+flip test config, its ``img_ratios`` as the ms-flip scales),
    ``test_cfg`` windows and ``PALETTE``.
    A value that is absent or not in the expected form stays unknown."""
    parsed = parse_mmseg_config(meta["config"]) if isinstance(meta.get("config"), str) else {}
    found: dict[str, Any] = {}
    norm = parsed.get("img_norm_cfg")
    if isinstance(norm, dict):
        found |= {"mean": norm.get("mean"), "std": norm.get("std")}
    ms_scales = None
    for step in parsed.get("test_pipeline") or []:
        if isinstance(step, dict) and step.get("type") == "MultiScaleFlipAug":
            found["img_scale"] = step.get("img_scale")
            if step.get("flip") and isinstance(step.get("img_ratios"), (list, tuple)):  # an ms+flip test config
                ms_scales = list(step["img_ratios"])
    model = parsed.get("model") if isinstance(parsed.get("model"), dict) else {}
    test_cfg = model.get("test_cfg") or parsed.get("test_cfg") or {}  # mmseg >= 0.12 style, or the older one
    if isinstance(test_cfg, dict) and test_cfg.get("mode") in ("slide", "whole"):
        found["eval"] = {"mode": test_cfg["mode"], "crop_size": test_cfg.get("crop_size", (512, 512)),
                         "stride": test_cfg.get("stride", (512, 512))}
        if ms_scales is not None:
            found["eval"]["ms_scales"] = ms_scales
    if meta.get("PALETTE"):
        found["palette"] = [list(c) for c in meta["PALETTE"]]
    inference = InferenceConfig()
    for key, value in found.items():
        try:
            setattr(inference, key, getattr(from_dict(InferenceConfig, {key: value}, "meta.config"), key))
        except ConfigError:
            continue  # not in the form the reference writes: stays unknown, and predict announces its default
    return inference


def mmseg_test_text(inference: InferenceConfig) -> str:
    """The reference config lines that record ``inference`` (inverse of mmseg_inference_config)."""
    lines, test = [], to_dict(inference)
    if inference.mean is not None and inference.std is not None:
        lines.append(f"img_norm_cfg = {dict(mean=test['mean'], std=test['std'], to_rgb=True)!r}")
    if inference.img_scale is not None:
        aug = {"type": "MultiScaleFlipAug", "img_scale": tuple(inference.img_scale), "flip": False}
        lines.append(f"test_pipeline = {[{'type': 'LoadImageFromFile'}, aug]!r}")
    if inference.eval is not None:
        e = inference.eval
        lines.append(f"test_cfg = {dict(mode=e.mode, crop_size=tuple(e.crop_size), stride=tuple(e.stride))!r}")
    return "".join(line + "\n" for line in lines)


def mmseg_checkpoint(cfg: ModelConfig, state_dict: dict[str, Tensor],
                     inference: InferenceConfig | None = None) -> dict[str, Any]:
    """The mmseg checkpoint dict of a model (inverse of load_mmseg)."""
    meta: dict[str, Any] = {"config": mmseg_config_text(cfg), "CLASSES": tuple(cfg.class_names or ())}
    if inference is not None:
        meta["config"] += mmseg_test_text(inference)
        if inference.palette is not None:
            meta["PALETTE"] = [list(c) for c in inference.palette]
    return {"meta": meta, "state_dict": {to_mmseg_name(k): v for k, v in state_dict.items()}}


def export_mmseg(model: Segmentor, path: Path) -> None:
    """Write ``model`` as an mmseg ``.pth`` at ``path``."""
    ckpt = mmseg_checkpoint(model.cfg, weights(model), model.inference)
    files.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
