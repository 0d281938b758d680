"""Official Segmenter checkpoints: a run folder with ``checkpoint.pth`` ({"model": state dict}) and ``variant.yml``
(the architecture, ``net_kwargs``), as written by github.com/rstrudel/segmenter."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from segrank import files
from segrank.checkpoints.detect import CheckpointContent, pretrained_folder
from segrank.checkpoints.native import weights
from segrank.checkpoints.shapes import checked_model, tensor_shapes
from segrank.config import ConfigError, EvalConfig, ModelConfig, from_dict
from segrank.config.inference import InferenceConfig
from segrank.data.info import dataset_info
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor

# segm/data/utils.py STATS (0-1 scale); segm/data/base.py scales them by 255 and rounds to 2 decimals.
OFFICIAL_STATS = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                  "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
# Official dataset name -> (segrank dataset with the same classes, ``max_ratio`` of segm/data/config/<name>.py: the
# test scale is (max_ratio * im_size, im_size)).
OFFICIAL_DATASETS = {"ade20k": ("ade20k", 4), "pascal_context": ("pascal_context60", 8), "cityscapes": (None, 2)}


class _VariantLoader(files.YamlLoader):
    """segrank's YAML loader that also accepts the ``!!python/tuple`` tag the official Segmenter writes."""


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


def read_variant(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (the official checkpoint needs its variant.yml)")
    try:
        return files.parse_yaml(files.read_text(path, CheckpointError), _VariantLoader)
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: invalid YAML ({files.yaml_problem(err)})") from None


def is_segmenter(content: CheckpointContent) -> bool:
    """An official run: its folder (one that is no save_pretrained folder), its variant.yml, or its checkpoint.pth (a
    mapping with a ``model`` mapping and ``n_cls``), refused without the variant.yml that belongs beside it."""
    if content.kind == "folder":
        return not pretrained_folder(content.path)
    if content.path.name == "variant.yml":
        return True
    if content.kind != "torch":
        return False
    ckpt = content.model_mapping
    if not (isinstance(ckpt.get("model"), dict) and "n_cls" in ckpt):
        return False
    if not (content.path.parent / "variant.yml").is_file():
        raise CheckpointError(f"{content.path}: official Segmenter checkpoint without the variant.yml (the "
                              "architecture) that belongs beside it")
    return True


def load_segmenter(path: Path, cfg: ModelConfig | None) -> Segmentor:
    """A model from an official run folder, its ``checkpoint.pth`` or its ``variant.yml``; ``cfg`` overrides the
    architecture of ``variant.yml``."""
    folder = path if path.is_dir() else path.parent
    ckpt_path = folder / "checkpoint.pth" if path.is_dir() or path.name == "variant.yml" else path
    variant_path = folder / "variant.yml"
    variant = read_variant(variant_path) if cfg is None or variant_path.is_file() else {}
    if cfg is None:
        cfg = model_config_from_segmenter(variant)
    ckpt = files.read_torch(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{ckpt_path}: not an official Segmenter checkpoint (no 'model' mapping)")
    sd = {}
    for key, value in ckpt["model"].items():
        if key.startswith("encoder.head."):
            continue  # the unused ImageNet classifier
        prefix, _, rest = key.partition(".")
        sd[{"encoder": "backbone", "decoder": "decode_head"}.get(prefix, prefix) + "." + rest] = value
    model = checked_model(cfg, tensor_shapes(sd), str(ckpt_path))
    files.load_state_dict_strict(model, sd, str(ckpt_path))
    if isinstance(variant, dict):
        model.inference = segmenter_inference_config(variant)
        if cfg.class_names is None:
            model.cfg = dataclasses.replace(cfg, class_names=segmenter_class_names(variant, cfg.num_classes))
    return model


def segmenter_inference_config(variant: dict[str, Any]) -> InferenceConfig:
    """Normalisation (``dataset_kwargs.normalization``) and test scale and windows (``inference_kwargs``) of an
    official run, as its evaluation (segm/eval/miou.py) uses them; what the variant does not record stays unknown."""
    data, net, kwargs = (variant.get(k) if isinstance(variant.get(k), dict) else {}
                         for k in ("dataset_kwargs", "net_kwargs", "inference_kwargs"))
    inference = InferenceConfig()
    stats = OFFICIAL_STATS.get(data.get("normalization") or net.get("normalization"))
    if stats is not None:
        inference.mean, inference.std = (tuple(np.round(255 * np.array(v), 2).tolist()) for v in stats)
    ratio = OFFICIAL_DATASETS.get(data.get("dataset"), (None, 4))[1]
    try:
        if isinstance(kwargs.get("im_size"), int):
            inference.img_scale = (ratio * kwargs["im_size"], kwargs["im_size"])
        if isinstance(kwargs.get("window_size"), int) and isinstance(kwargs.get("window_stride"), int):
            window, stride = kwargs["window_size"], kwargs["window_stride"]
            inference.eval = from_dict(EvalConfig, {"mode": "slide", "crop_size": [window, window],
                                                    "stride": [stride, stride]}, "inference_kwargs")
    except ConfigError:
        inference.eval = None  # not in the form the official code writes: predict announces its default
    return inference


def segmenter_class_names(variant: dict[str, Any], num_classes: int) -> list[str] | None:
    """The class names of the official run's dataset, when segrank knows it and the class count matches."""
    data = variant.get("dataset_kwargs") if isinstance(variant.get("dataset_kwargs"), dict) else {}
    name = OFFICIAL_DATASETS.get(data.get("dataset"), (None, 0))[0]
    if name is None:
        return None
    classes = dataset_info(name).classes
    return list(classes) if len(classes) == num_classes else None


def segmenter_checkpoint(cfg: ModelConfig, state_dict: dict[str, Tensor],
                         inference: InferenceConfig | None = None) -> tuple[dict[str, Any], str]:
    """(``checkpoint.pth`` dict, ``variant.yml`` text) of a model (inverse of load_segmenter)."""
    if cfg.head.type not in ("segmenter", "linear"):
        raise CheckpointError(f"the official Segmenter has no {cfg.head.type!r} head")
    renamed = {("encoder" if k.startswith("backbone.") else "decoder") + k[k.index("."):]: v
               for k, v in state_dict.items()}
    variant = segmenter_variant(cfg) | segmenter_test_kwargs(inference or InferenceConfig())
    return {"model": renamed, "n_cls": cfg.num_classes}, yaml.safe_dump(variant)


def segmenter_variant(cfg: ModelConfig) -> dict[str, Any]:
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


def segmenter_test_kwargs(inference: InferenceConfig) -> dict[str, Any]:
    """The variant.yml entries that record ``inference`` where the official layout can (inverse of
    segmenter_inference_config for square windows and the official normalisations)."""
    out: dict[str, Any] = {}
    for name, stats in OFFICIAL_STATS.items():
        mean, std = (tuple(np.round(255 * np.array(v), 2).tolist()) for v in stats)
        if inference.mean == mean and inference.std == std:
            out["dataset_kwargs"] = {"normalization": name}
    e = inference.eval
    if inference.img_scale is not None and e is not None and e.mode == "slide" and \
            e.crop_size[0] == e.crop_size[1] and e.stride[0] == e.stride[1]:
        out["inference_kwargs"] = {"im_size": min(inference.img_scale), "window_size": e.crop_size[0],
                                   "window_stride": e.stride[0]}
    return out


def export_segmenter(model: Segmentor, folder: Path) -> None:
    """Write ``model`` as an official run folder: ``checkpoint.pth`` and ``variant.yml``."""
    ckpt, variant = segmenter_checkpoint(model.cfg, weights(model), model.inference)
    files.atomic_write(folder / "checkpoint.pth", lambda tmp: torch.save(ckpt, tmp))
    files.write_text(folder / "variant.yml", variant)
