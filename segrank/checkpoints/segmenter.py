"""Official Segmenter checkpoints: a run folder with ``checkpoint.pth`` ({"model": state dict}) and ``variant.yml``
(the architecture, ``net_kwargs``), as written by github.com/rstrudel/segmenter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from segrank import files
from segrank.config import ModelConfig, from_dict
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor


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


def read_variant(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (the official checkpoint needs its variant.yml)")
    try:
        return yaml.load(path.read_text(), Loader=_VariantLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None


def load_segmenter(path: Path, cfg: ModelConfig | None) -> Segmentor:
    """A model from an official run folder, its ``checkpoint.pth`` or its ``variant.yml``; ``cfg`` overrides the
    architecture of ``variant.yml``."""
    folder = path if path.is_dir() else path.parent
    ckpt_path = folder / "checkpoint.pth" if path.is_dir() or path.name == "variant.yml" else path
    if cfg is None:
        cfg = model_config_from_segmenter(read_variant(folder / "variant.yml"))
    ckpt = files.read_torch(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{ckpt_path}: not an official Segmenter checkpoint (no 'model' mapping)")
    sd = {}
    for key, value in ckpt["model"].items():
        if key.startswith("encoder.head."):
            continue  # the unused ImageNet classifier
        prefix, _, rest = key.partition(".")
        sd[{"encoder": "backbone", "decoder": "decode_head"}.get(prefix, prefix) + "." + rest] = value
    model = Segmentor(cfg)
    files.load_state_dict_strict(model, sd, str(ckpt_path))
    return model


def segmenter_checkpoint(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], str]:
    """(``checkpoint.pth`` dict, ``variant.yml`` text) of a model (inverse of load_segmenter)."""
    if cfg.head.type not in ("segmenter", "linear"):
        raise CheckpointError(f"the official Segmenter has no {cfg.head.type!r} head")
    renamed = {("encoder" if k.startswith("backbone.") else "decoder") + k[k.index("."):]: v
               for k, v in state_dict.items()}
    return {"model": renamed, "n_cls": cfg.num_classes}, yaml.safe_dump(segmenter_variant(cfg))


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

