"""ViT backbone weights: Google AugReg ``.npz`` and timm-named state dicts (``.pth`` or ``.safetensors``).

They hold a backbone only: the decode head keeps its fresh initialisation, OCE class tokens start at zero and the
position table is resampled to the model's grid, as the reference's ``init_weights`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from segrank import files
from segrank.checkpoints.detect import CheckpointContent, file_kind
from segrank.checkpoints.native import weights
from segrank.config import ModelConfig
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor
from segrank.models.vit import resample_pos_embed

VIT_NAMES = ("patch_embed", "pos_embed", "cls_token")  # in every ViT backbone's parameter names (timm, ours)


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
# (our key, npz key) of the arrays outside the blocks that are stored as they are.
_NPZ_KEYS = [("patch_embed.proj.bias", "embedding/bias"), ("cls_token", "cls"),
             ("pos_embed", "Transformer/posembed_input/pos_embedding"),
             ("norm.weight", "Transformer/encoder_norm/scale"), ("norm.bias", "Transformer/encoder_norm/bias")]


def _attention(i: int) -> str:
    return f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"


def _attention_from_npz(arrays: dict[str, np.ndarray], i: int, dim: int) -> dict[str, np.ndarray]:
    """Block i's attention: per-head query/key/value/out kernels -> fused qkv and proj matrices."""
    attn = _attention(i)
    return {
        f"blocks.{i}.attn.qkv.weight": np.concatenate([arrays[attn + f"{n}/kernel"].reshape(dim, -1).T for n in _QKV]),
        f"blocks.{i}.attn.qkv.bias": np.concatenate([arrays[attn + f"{n}/bias"].reshape(-1) for n in _QKV]),
        f"blocks.{i}.attn.proj.weight": arrays[attn + "out/kernel"].reshape(-1, dim).T,
    }


def _attention_to_npz(a: dict[str, np.ndarray], i: int, num_heads: int) -> dict[str, np.ndarray]:
    """Inverse of _attention_from_npz."""
    attn, dim = _attention(i), a["cls_token"].shape[-1]
    head_dim = dim // num_heads
    qkv_w = a[f"blocks.{i}.attn.qkv.weight"].reshape(3, dim, dim)
    qkv_b = a[f"blocks.{i}.attn.qkv.bias"].reshape(3, dim)
    out = {attn + "out/kernel": a[f"blocks.{i}.attn.proj.weight"].T.reshape(num_heads, head_dim, dim)}
    for j, n in enumerate(_QKV):
        out[attn + f"{n}/kernel"] = qkv_w[j].T.reshape(dim, num_heads, head_dim)
        out[attn + f"{n}/bias"] = qkv_b[j].reshape(num_heads, head_dim)
    return out


def npz_to_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Google Flax ViT arrays -> timm-named backbone state dict (position table at its stored grid)."""
    try:
        sd = {ours: arrays[theirs] for ours, theirs in _NPZ_KEYS}
        sd["patch_embed.proj.weight"] = arrays["embedding/kernel"].transpose(3, 2, 0, 1)
        depth = len({k.split("/")[1] for k in arrays if k.startswith("Transformer/encoderblock_")})
        for i in range(depth):
            sd |= {ours: arrays[theirs].T for ours, theirs in _npz_block_keys(i)}
            sd |= _attention_from_npz(arrays, i, arrays["cls"].shape[-1])
    except KeyError as err:
        raise CheckpointError(f"npz: missing array {err}") from None
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}


def state_dict_to_npz(sd: dict[str, Tensor], num_heads: int) -> dict[str, np.ndarray]:
    """timm-named backbone state dict -> Google Flax ViT arrays (inverse of npz_to_state_dict)."""
    a = {k: v.detach().cpu().numpy() for k, v in sd.items()}
    out = {theirs: a[ours] for ours, theirs in _NPZ_KEYS}
    out["embedding/kernel"] = a["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    for i in range(len({k.split(".")[1] for k in a if k.startswith("blocks.")})):
        out |= {theirs: a[ours].T for ours, theirs in _npz_block_keys(i)}
        out |= _attention_to_npz(a, i, num_heads)
    return out


def fit_pos_embed(sd: dict[str, Tensor], model: Segmentor, key: str = "backbone.pos_embed") -> None:
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


def strip_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ViT state dict -> our backbone keys: drop classifier heads and a common prefix."""
    for prefix in ("backbone.", "encoder.", "module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}


def is_npz(content: CheckpointContent) -> bool:
    """An ``.npz`` archive (Google AugReg ViT arrays)."""
    return content.kind == "npz"


def is_timm(content: CheckpointContent) -> bool:
    """A plain mapping of tensors named as a ViT backbone's (native and official files match too: theirs come first)."""
    names = content.tensor_names
    return names is not None and any(part in name for name in names for part in VIT_NAMES)


def read_npz_backbone(path: Path) -> dict[str, Tensor]:
    """Our backbone state dict from an AugReg ``.npz``."""
    return npz_to_state_dict(files.read_npz(path))


def read_backbone_weights(path: Path) -> dict[str, Tensor]:
    """Our backbone state dict from an AugReg ``.npz`` or a timm-named PyTorch or safetensors file, told apart by the
    file's content."""
    kind = file_kind(path)[0]
    if kind == "npz":
        return read_npz_backbone(path)
    sd = files.read_safetensors(path)[0] if kind == "safetensors" else files.read_torch(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return strip_timm(sd)


def load_backbone_weights(model: Segmentor, path: str | Path,
                          read: Callable[[Path], dict[str, Tensor]] = read_backbone_weights) -> Segmentor:
    """Initialise the backbone of ``model`` from the weights ``read`` gets from ``path`` (default: an AugReg ``.npz``
    or timm weights, by content); the head keeps its fresh init and OCE class tokens stay zero, as in the reference."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    sd = {f"backbone.{k}": v for k, v in read(path).items()}
    fit_pos_embed(sd, model)
    if model.backbone.oce_start_layer is not None and "backbone.cls_emb" not in sd:
        sd["backbone.cls_emb"] = torch.zeros_like(model.backbone.cls_emb)
    for key, value in model.state_dict().items():
        if key.startswith("decode_head."):
            sd[key] = value
    files.load_state_dict_strict(model, sd, str(path))
    return model


def backbone_only_model(path: Path, cfg: ModelConfig | None, format_name: str) -> Segmentor:
    """A fresh model of architecture ``cfg``, which weights of a backbone alone cannot do without."""
    if cfg is None:
        raise CheckpointError(f"{path}: {format_name} weights hold a backbone only; pass a config for the model")
    return Segmentor(cfg)


def load_npz(path: Path, cfg: ModelConfig | None) -> Segmentor:
    """A model of architecture ``cfg`` whose backbone comes from an AugReg ``.npz``."""
    return load_backbone_weights(backbone_only_model(path, cfg, "npz"), path, read_npz_backbone)


def load_timm(path: Path, cfg: ModelConfig | None) -> Segmentor:
    """A model of architecture ``cfg`` whose backbone comes from timm weights (or an ``.npz``: read by content)."""
    return load_backbone_weights(backbone_only_model(path, cfg, "timm"), path)


def export_npz(model: Segmentor, path: Path) -> None:
    """Write the backbone of ``model`` as AugReg ``.npz`` arrays."""
    arrays = state_dict_to_npz(weights(model.backbone), model.cfg.backbone.num_heads)
    files.atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def export_timm(model: Segmentor, path: Path) -> None:
    """Write the backbone of ``model`` as a timm-named ``.safetensors``."""
    backbone = weights(model.backbone)
    files.atomic_write(path, lambda tmp: save_file(backbone, tmp))
