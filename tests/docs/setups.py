"""Tiny stand-ins, named as the docs name them, for the files a doc block needs (``<!-- doc-test: setup: NAME -->``).

Every block runs in a fresh folder whose ``configs/`` holds each model-zoo config shrunk to test size (``tiny_config``:
a 2-block ViT of width 64, 64-pixel crops and windows, 2 training iterations of batch 2, no data-loader workers); the
dataset, head type, loss and schedule shape stay the config's. The setups below add downloads and checkpoints built
from those tiny configs, so every command of a block runs as written, at toy size. Built files are cached for the
session and copied into each block's folder.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image
from scipy.io import savemat

from segrank.checkpoints import export_checkpoint, save_model
from segrank.checkpoints.segmenter import model_config_from_segmenter
from segrank.config import load_config, to_dict
from segrank.data import dataset_info
from segrank.models import Segmentor

REPO = Path(__file__).resolve().parents[2]
ADE_SAMPLE = REPO.parent / "shared" / "data" / "ade20k_sample" / "ADEChallengeData2016"
NPZ_NAMES = {  # the Google AugReg weights the configs' train.pretrained name
    "B": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "L": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz",
}
ADE_RANKSEG = "configs/ade20k/rankseg_vit-b16_512x512_160k.yaml"
ADE_GT = "configs/ade20k/rankseg_gt_vit-b16_512x512_160k.yaml"


def tiny_config(path: Path) -> dict[str, Any]:
    """The resolved config of ``path`` at test size."""
    data = to_dict(load_config(path))
    backbone, head = data["model"]["backbone"], data["model"]["head"]
    backbone.update(preset=None, embed_dim=64, depth=2, num_heads=2, pos_embed_grid=[4, 4])
    if backbone["oce_start_layer"] is not None:
        backbone["oce_start_layer"] = 1  # OCE joins before the last block, as in the full configs
    head.update(d_model=64, n_heads=2, d_ff=128, topk=min(head["topk"], 10), q2l_heads=2, q2l_d_ff=128)
    if head["downsample"] is not None:
        head["downsample"] = 2
    data["data"].update(img_scale=[256, 64], crop_size=[64, 64], workers=0)
    data["eval"].update(crop_size=[64, 64], stride=[48, 48])
    data["train"].update(max_iters=2, batch_size=2, grad_accum=1, log_interval=1, checkpoint_interval=2,
                         eval_interval=2)
    return data


class Cache:
    """Files built once per session in ``folder``: the tiny configs, checkpoints and downloads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.built: dict[str, Path] = {}

    def get(self, name: str, build: Callable[[Path], None]) -> Path:
        """``folder/name`` (a file or folder), built by ``build(path)`` the first time."""
        if name not in self.built:
            path = self.folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            build(path)
            self.built[name] = path
        return self.built[name]

    def configs(self) -> Path:
        def build(out: Path) -> None:
            for path in sorted((REPO / "configs").rglob("*.yaml")):
                rel = path.relative_to(REPO / "configs")
                if rel.parts[0] == "_base_":
                    continue
                header = f"# {path.relative_to(REPO)} at test size (tests/docs/setups.py)\n"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_text(header + yaml.safe_dump(tiny_config(path), sort_keys=False))
        return self.get("configs", build)

    def model(self, config: str) -> Segmentor:
        """A seeded tiny model of a zoo config (relative to the repository), with its dataset's class names."""
        cfg = load_config(self.configs() / Path(config).relative_to("configs"))
        cfg.model.class_names = list(dataset_info(cfg.data.dataset).classes)
        torch.manual_seed(0)
        return Segmentor(cfg.model).eval()


def copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


def rankseg_release(cache: Cache, cwd: Path, home: Path) -> None:
    """``segmenter_vitb_ade20k_rankseg.pth``: the RankSeg release's mmseg checkpoint (ADE20K RankSeg ViT-B row)."""
    path = cache.get("segmenter_vitb_ade20k_rankseg.pth",
                     lambda p: export_checkpoint(cache.model(ADE_RANKSEG), p, "mmseg"))
    copy(path, cwd / path.name)


def rankseg_converted(cache: Cache, cwd: Path, home: Path) -> None:
    """``segmenter_vitb_ade20k_rankseg.safetensors``: that release converted by ``segrank convert``."""
    path = cache.get("segmenter_vitb_ade20k_rankseg.safetensors", lambda p: save_model(cache.model(ADE_RANKSEG), p))
    copy(path, cwd / path.name)


def gt_converted(cache: Cache, cwd: Path, home: Path) -> None:
    """``segmenter_vitb_ade_gt.safetensors``: the ADE20K GT-oracle release, converted."""
    path = cache.get("segmenter_vitb_ade_gt.safetensors", lambda p: save_model(cache.model(ADE_GT), p))
    copy(path, cwd / path.name)


def official_segmenter(cache: Cache, cwd: Path, home: Path) -> None:
    """``seg_large_mask_640/`` with ``checkpoint.pth`` and ``variant.yml``: an official Segmenter run folder."""
    def build(out: Path) -> None:
        variant = {"net_kwargs": {"backbone": "vit_large_patch16_384", "image_size": [64, 64], "patch_size": 16,
                                  "d_model": 64, "n_heads": 2, "n_layers": 2, "n_cls": 150, "drop_path_rate": 0.1,
                                  "decoder": {"name": "mask_transformer", "n_layers": 2, "drop_path_rate": 0.0,
                                              "dropout": 0.1}}}
        torch.manual_seed(0)
        export_checkpoint(Segmentor(model_config_from_segmenter(variant)), out, "segmenter")
    copy(cache.get("seg_large_mask_640", build), cwd / "seg_large_mask_640")


def pretrained(cache: Cache, cwd: Path, home: Path) -> None:
    """``pretrain/{B,L}_16-i21k-...-res_384.npz``: the AugReg ViT weights the configs start from (tiny backbone)."""
    path = cache.get("augreg.npz", lambda p: export_checkpoint(cache.model(ADE_RANKSEG), p, "npz"))
    for name in NPZ_NAMES.values():
        copy(path, cwd / "pretrain" / name)


def ade20k_data(cache: Cache, cwd: Path, home: Path) -> None:
    """``data/ade/ADEChallengeData2016``: the three real ADE20K validation images in ../shared, as both splits."""
    if not ADE_SAMPLE.is_dir():
        raise FileNotFoundError(f"{ADE_SAMPLE} is missing: the doc test needs ../shared beside the checkout")
    root = cwd / "data" / "ade" / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            copy(ADE_SAMPLE / kind / "validation", root / kind / split)


def photos(cache: Cache, cwd: Path, home: Path) -> None:
    """``photos/kitchen.jpg`` and ``photos/street.jpg``: two photos to segment (ADE20K validation images)."""
    sample = sorted((ADE_SAMPLE / "images" / "validation").glob("*.jpg"))[:2]
    for path, name in zip(sample, ("kitchen.jpg", "street.jpg"), strict=True):
        copy(path, cwd / "photos" / name)


def cocostuff10k_download(cache: Cache, cwd: Path, home: Path) -> None:
    """``~/Downloads/cocostuff-10k``: the COCO-Stuff 10k release unpacked (``imageLists/``, ``images/``,
    ``annotations/*.mat``), three train and two test images."""
    def build(out: Path) -> None:
        rng = np.random.default_rng(0)
        lists = {"train": [f"COCO_train2014_00000000{i:04d}" for i in (9, 25, 30)],
                 "test": [f"COCO_train2014_00000000{i:04d}" for i in (34, 36)]}
        for split, names in lists.items():
            (out / "imageLists").mkdir(parents=True, exist_ok=True)
            (out / "imageLists" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
            for name in names:
                (out / "images").mkdir(exist_ok=True)
                (out / "annotations").mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(out / "images" / f"{name}.jpg")
                raw = rng.choice(np.array([0, 1, 3, 17, 92, 105, 149, 182], np.uint8), (48, 64))
                savemat(out / "annotations" / f"{name}.mat", {"S": raw})
    copy(cache.get("cocostuff-10k", build), home / "Downloads" / "cocostuff-10k")


def scene_parse_150(cache: Cache, cwd: Path, home: Path) -> None:
    """``data/scene_parse_150``: the Hub's Parquet files of scene_parse_150 (``data/{train,validation}-00000-of-
    00001.parquet``: ``image`` and ``annotation`` Image structs, ``scene_category``), three 48x64 rows per split whose
    labels hold 0 ("other") and ADE20K classes 1..150."""
    def build(out: Path) -> None:
        rng = np.random.default_rng(0)
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        features = {"image": {"_type": "Image"}, "annotation": {"_type": "Image"},
                    "scene_category": {"names": ["airport_terminal", "art_gallery"], "_type": "ClassLabel"}}
        schema = pa.schema([("image", image_type), ("annotation", image_type), ("scene_category", pa.int64())],
                           metadata={"huggingface": json.dumps({"info": {"features": features}})})
        for split in ("train", "validation"):
            rows = {"image": [], "annotation": [], "scene_category": []}
            for i in range(3):
                label = np.repeat(rng.choice(np.array([0, 1, 3, 13, 150], np.uint8), (6, 8)), 8, 0).repeat(8, 1)
                for column, array in (("image", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)),
                                      ("annotation", label)):
                    encoded = io.BytesIO()
                    Image.fromarray(array).save(encoded, format="JPEG" if column == "image" else "PNG")
                    rows[column].append({"bytes": encoded.getvalue(), "path": f"{split}_{i}.jpg"})
                rows["scene_category"].append(i % 2)
            (out / "data").mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(rows, schema=schema), out / "data" / f"{split}-00000-of-00001.parquet")
    copy(cache.get("scene_parse_150", build), cwd / "data" / "scene_parse_150")


SETUPS: dict[str, Callable[[Cache, Path, Path], None]] = {
    f.__name__: f for f in (rankseg_release, rankseg_converted, gt_converted, official_segmenter, pretrained,
                            ade20k_data, photos, cocostuff10k_download, scene_parse_150)
}
