"""The bad-input matrix's cases and the helpers that build them: each case is a function of the test's tmp dir that
sets up files and returns the CLI arguments and the text the one error line must contain (test_bad_input.py runs
them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from segrank import build_model
from segrank.checkpoints import save_model
from segrank.cli import main
from segrank.config import ModelConfig, from_dict
from tests.reliability.common import folder_config, folder_dataset, write_config

Case = Callable[[Path], tuple[list, str]]  # tmp dir -> (CLI arguments, text the error line must contain)
CASES: dict[str, Case] = {}


def case(func: Case) -> Case:
    assert func.__name__ not in CASES, f"two bad-input cases named {func.__name__}"
    CASES[func.__name__] = func
    return func


def checkpoint(path: Path, cfg: dict, **model_changes) -> Path:
    model_cfg = from_dict(ModelConfig, {**cfg["model"], **model_changes})
    torch.manual_seed(0)
    return save_model(build_model(model_cfg), path)


def eval_setup(tmp: Path, workers: int = 0) -> tuple[Path, Path, Path]:
    """A folder dataset of 2 photos, its config and a matching checkpoint: (config, checkpoint, dataset root)."""
    root = folder_dataset(tmp / "data")
    cfg = folder_config(root, data={"workers": workers})
    return write_config(tmp / "cfg.yaml", cfg), checkpoint(tmp / "model.safetensors", cfg), root


def eval_args(config: Path, ckpt: Path) -> list:
    return ["eval", config, ckpt, "--out", config.parent / "results.json", "--no-progress"]


def train_args(tmp: Path, cfg: dict, *extra) -> list:
    return ["train", write_config(tmp / "train.yaml", cfg), "--work-dir", tmp / "run", "--no-progress", *extra]


def read_only(folder: Path) -> Path:
    """A folder nobody may write to (the test answers os.access from the mode bits when it runs as root)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    return folder


def run_cli_quiet(args: list) -> int:
    return main([str(a) for a in args])
