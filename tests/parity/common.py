"""Parity with the reference implementations: golden files in ../shared/fixtures (or $SEGRANK_FIXTURES_DIR).

Cases are discovered from each folder's index.json / JSON files and tensor names; nothing about case names,
sizes or class counts is hard-coded, so the same tests run on any fixture folder of this layout.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("SEGRANK_FIXTURES_DIR", REPO.parent / "shared" / "fixtures"))

# fixtures README §3
FLOAT_TOL = {"atol": 2e-5, "rtol": 1e-5}
LOSS_TOL = {"atol": 1e-5, "rtol": 1e-5}

MAX_DIFF: dict[str, float] = defaultdict(float)

# The reference's names of the logged training metrics -> (segrank's name, factor from segrank's fraction to the
# reference's unit): mmseg logs acc_seg in percent, the RankSeg fork its three selection metrics as fractions.
REFERENCE_METRICS = {"acc_seg": ("pixel_acc", 100.0), "acc_pix": ("pixel_recall", 1.0),
                     "acc_img": ("image_recall", 1.0), "acc_img_accuracy": ("image_precision", 1.0)}


def reference_term(losses: dict[str, torch.Tensor], term: str) -> torch.Tensor:
    """segrank's value of the reference's loss or metric ``term``, in the reference's unit."""
    name, factor = REFERENCE_METRICS.get(term, (term, 1.0))
    return losses[name].double() * factor  # in double: the unit change adds no rounding of its own


def folder(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"fixture folder {path} is absent (the golden files live in ../shared/fixtures; "
                    "set SEGRANK_FIXTURES_DIR to read them elsewhere)")
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: dict = FLOAT_TOL) -> None:
    """Float comparison within the README tolerances; records the max |diff| per fixture (the name's first word)."""
    actual = actual.detach().float().reshape(expected.shape)
    diff = (actual - expected.float()).abs().max().item() if expected.numel() else 0.0
    fixture = name.split(" ")[0]
    MAX_DIFF[fixture] = max(MAX_DIFF[fixture], diff)
    torch.testing.assert_close(actual, expected.float(), **tol, msg=lambda m: f"{name}: {m}")


def assert_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual = actual.detach().reshape(expected.shape).to(expected.dtype)
    mismatches = int((actual != expected).sum())
    assert mismatches == 0, f"{name}: {mismatches} of {expected.numel()} entries differ"


def index_cases(folder_path: Path) -> list:
    """One pytest param per top-level key of ``folder_path/index.json`` (none when the folder is absent)."""
    if not (folder_path / "index.json").is_file():
        return []
    return [pytest.param(name, id=name) for name in read_json(folder_path / "index.json")]
