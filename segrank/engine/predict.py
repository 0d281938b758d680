"""Segment image files: label PNG, colour PNG, overlay PNG and (RankSeg) the image-level class ranking as JSON.

Test settings (normalisation, test scale, whole/slide windows, class names, palette) come from, in order of priority:
command-line flags, ``--config``, the ``config.yaml`` of the training run a checkpoint belongs to, the config text
stored in an mmseg checkpoint, and finally defaults (printed, so a wrong guess is visible).
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segrank import files
from segrank.checkpoints.mmseg import parse_mmseg_config
from segrank.config import EvalConfig, load_config
from segrank.data.datasets import IMAGE_EXTENSIONS, read_image
from segrank.data.info import NORMALIZATIONS, dataset_info, generated_palette
from segrank.data.transforms import eval_transform
from segrank.engine.inference import Prediction, predict_image
from segrank.errors import SegrankError
from segrank.models.segmentor import Segmentor

DEFAULT_NORMALIZATION = "half"
DEFAULT_IMG_SCALE = (2048, 512)


@dataclass
class TestSettings:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_scale: tuple[int, int]
    eval: EvalConfig
    class_names: list[str]
    palette: np.ndarray  # (N, 3) uint8
    notes: list[str] = field(default_factory=list)  # which values are defaults


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted, not recursive) and glob patterns -> image paths, in order."""
    paths: dict[Path, None] = {}  # ordered set
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise SegrankError(f"{item}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
            if not found:
                raise SegrankError(f"{item}: pattern matches no file")
        else:
            raise SegrankError(f"{item}: no such file or folder")
        paths.update(dict.fromkeys(found))
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise SegrankError(f"{p} and {stems[p.stem]}: same name, outputs would collide (use separate --out)")
        stems[p.stem] = p
    return list(paths)


def _run_config(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` of the training run holding ``checkpoint`` (work_dir/checkpoints/iter_*.safetensors)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _mmseg_settings(checkpoint: Path) -> dict[str, Any]:
    """Normalisation, test scale and windows from the config text stored in an mmseg checkpoint, where present."""
    ckpt = files.read_torch(checkpoint)  # load_model has read it already
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), str):
        return {}
    parsed = parse_mmseg_config(meta["config"])
    out: dict[str, Any] = {}
    if isinstance(parsed.get("img_norm_cfg"), dict):
        out["mean"], out["std"] = tuple(parsed["img_norm_cfg"]["mean"]), tuple(parsed["img_norm_cfg"]["std"])
    for step in parsed.get("test_pipeline") or []:
        if isinstance(step, dict) and step.get("type") == "MultiScaleFlipAug":
            out["img_scale"] = tuple(step["img_scale"])
    test_cfg = (parsed.get("model") or {}).get("test_cfg") or parsed.get("test_cfg") or {}  # new or old mmseg style
    if test_cfg.get("mode") in ("slide", "whole"):
        out["eval"] = EvalConfig(mode=test_cfg["mode"], crop_size=tuple(test_cfg.get("crop_size", (512, 512))),
                                 stride=tuple(test_cfg.get("stride", (512, 512))))
    if meta.get("PALETTE"):
        out["palette"] = meta["PALETTE"]
    return out


def resolve_settings(model: Segmentor, checkpoint: Path, config: str | None = None,
                     mean: list[float] | None = None, std: list[float] | None = None,
                     img_scale: list[int] | None = None) -> TestSettings:
    found: dict[str, Any] = {}
    config_path = Path(config) if config else _run_config(checkpoint)
    if config_path is not None:
        cfg = load_config(config_path)
        info = dataset_info(cfg.data.dataset, cfg.data.options, cfg.data.root)
        norm = NORMALIZATIONS[cfg.data.normalization] if cfg.data.normalization else (info.mean, info.std)
        found = {"mean": norm[0], "std": norm[1], "img_scale": cfg.data.img_scale, "eval": cfg.eval,
                 "palette": info.palette, "class_names": info.classes}
    elif checkpoint.suffix == ".pth":
        found = _mmseg_settings(checkpoint)
    if mean is not None:
        found["mean"] = tuple(mean)
    if std is not None:
        found["std"] = tuple(std)
    if img_scale is not None:
        found["img_scale"] = tuple(img_scale)
    notes = []
    if "mean" not in found or "std" not in found:
        notes.append(f"normalisation mean/std {NORMALIZATIONS[DEFAULT_NORMALIZATION][0]} (pass --mean/--std)")
        found["mean"], found["std"] = NORMALIZATIONS[DEFAULT_NORMALIZATION]
    if "img_scale" not in found:
        notes.append(f"test scale {DEFAULT_IMG_SCALE} (pass --img-scale)")
    if "eval" not in found:
        # The training crop: the size the position table was learned at.
        crop = tuple(g * model.patch_size for g in model.cfg.backbone.pos_embed_grid)
        found["eval"] = EvalConfig(mode="slide", crop_size=crop, stride=crop)
    n = model.num_classes
    names = model.cfg.class_names or found.get("class_names") or [str(i) for i in range(n)]
    palette = found.get("palette")
    if palette is None or len(palette) < n:
        palette = generated_palette(n)
    return TestSettings(found["mean"], found["std"], found.get("img_scale", DEFAULT_IMG_SCALE), found["eval"],
                        list(names), np.asarray(palette, dtype=np.uint8)[:n], notes)


def _save_png(array: np.ndarray, path: Path) -> None:
    image = Image.fromarray(array)
    files.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_outputs(image_path: Path, rgb: np.ndarray, pred: Prediction, settings: TestSettings, out: Path,
                  topk: int | None) -> list[Path]:
    """``<stem>.png`` class ids (8-bit, 16-bit above 256 classes), ``<stem>_color.png``, ``<stem>_overlay.png`` and,
    for RankSeg, ``<stem>.json`` with every class ranked by its image-level score."""
    label = pred.label.cpu().numpy()
    n = len(settings.class_names)
    stem = image_path.stem
    color = settings.palette[label]
    overlay = (0.5 * rgb + 0.5 * color).round().astype(np.uint8)
    written = [out / f"{stem}.png", out / f"{stem}_color.png", out / f"{stem}_overlay.png"]
    _save_png(label.astype(np.uint8 if n <= 256 else np.uint16), written[0])
    _save_png(color, written[1])
    _save_png(overlay, written[2])
    if pred.image_scores is not None:
        scores = pred.image_scores.cpu()
        order = scores.argsort(descending=True).tolist()
        selected = set(pred.selected.tolist())
        area = np.bincount(label.reshape(-1), minlength=n)
        record = {
            "image": str(image_path), "topk": topk,
            "selected_classes": sorted(selected),
            "ranking": [{"class": c, "name": settings.class_names[c], "score": round(float(scores[c]), 6),
                         "selected": c in selected, "pixel_fraction": round(float(area[c]) / label.size, 6)}
                        for c in order],
        }
        written.append(out / f"{stem}.json")
        files.write_json(written[-1], record, indent=1)
    return written


def predict_files(model: Segmentor, paths: list[Path], out: Path, settings: TestSettings, *, ms_flip: bool = False,
                  device: str | torch.device = "cpu", progress: bool = True) -> list[Path]:
    if out.exists() and not out.is_dir():
        raise SegrankError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    topk = model.cfg.head.topk if model.cfg.head.type == "rankseg" else None
    written = []
    for i, path in enumerate(paths):
        rgb = read_image(path)
        image = eval_transform(rgb, settings.img_scale, settings.mean, settings.std).to(device)
        pred = predict_image(model, image, rgb.shape[:2], settings.eval, ms_flip=ms_flip, img_scale=settings.img_scale)
        written += write_outputs(path, rgb, pred, settings, out, topk)
        if progress:
            print(f"[{i + 1}/{len(paths)}] {path} -> {out / path.stem}.png", file=sys.stderr, flush=True)
    return written
