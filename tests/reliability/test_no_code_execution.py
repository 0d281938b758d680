"""No code execution on load: files whose loading would create a marker file (a pickle calling ``open``, a YAML
``python/object`` tag, an mmseg config text calling ``__import__``) go through every segrank entry point that reads
them; each refuses with exit 2 and one line, and the marker never appears."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from segrank import build_model
from segrank.checkpoints import export_checkpoint
from segrank.checkpoints.mmseg import mmseg_config_text
from segrank.config import ModelConfig, from_dict
from tests.conftest import tiny_run_config
from tests.reliability.common import folder_config, folder_dataset, run_cli, write_config


class CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears if the loader runs code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def malicious_pth(path: Path, marker: Path, layout: str = "mmseg") -> Path:
    """A checkpoint that looks right (real weights of the tiny model) with one object that runs code."""
    cfg = from_dict(ModelConfig, tiny_run_config()["model"])
    weights = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    if layout == "mmseg":
        ckpt = {"meta": {"config": mmseg_config_text(cfg)}, "state_dict": weights, "hook": CreatesFile(marker)}
    elif layout == "segmenter":
        ckpt = {"model": weights, "n_cls": cfg.num_classes, "hook": CreatesFile(marker)}
    else:  # a training state: what --resume reads beside the weights
        ckpt = {"step": 2, "seed": 0, "optimizer": {"state": {}, "param_groups": []}, "scaler": CreatesFile(marker)}
    torch.save(ckpt, path)
    return path


def assert_refused(args: list, marker: Path, capsys, expected: str) -> None:
    code, out, err = run_cli(args, capsys)
    assert not marker.exists(), "loading ran code from the file"
    assert code == 2, f"exit {code}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]


REFUSED = "it contains Python objects that would run code when loaded; refusing to load it"


@pytest.mark.parametrize("command", ["convert", "info", "eval", "predict"])
def test_pickled_checkpoint_is_refused_by_every_command(command, tmp_path, capsys):
    marker = tmp_path / "pwned"
    pth = malicious_pth(tmp_path / "model.pth", marker)
    root = folder_dataset(tmp_path / "data", count=1)
    args = {
        "convert": ["convert", pth, "--out", tmp_path / "out.safetensors"],
        "info": ["info", pth],
        "eval": ["eval", write_config(tmp_path / "cfg.yaml", folder_config(root)), pth, "--no-progress"],
        "predict": ["predict", pth, root / "images", "--out", tmp_path / "pred", "--no-progress"],
    }[command]
    assert_refused(args, marker, capsys, f"model.pth: not a loadable checkpoint ({REFUSED})")
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "pred").exists()


def test_official_segmenter_checkpoint_is_refused(tmp_path, capsys):
    marker, folder = tmp_path / "pwned", tmp_path / "segmenter"
    model = build_model(from_dict(ModelConfig, tiny_run_config(model={"head": {"type": "segmenter"}})["model"]))
    export_checkpoint(model, folder, "segmenter")
    malicious_pth(folder / "checkpoint.pth", marker, layout="segmenter")
    assert_refused(["convert", "--from", "segmenter", folder, "--out", tmp_path / "out.safetensors"], marker, capsys,
                   f"checkpoint.pth: not a loadable checkpoint ({REFUSED})")


def test_pretrained_backbone_file_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    pth = malicious_pth(tmp_path / "backbone.pth", marker)
    cfg = tiny_run_config(train={"pretrained": str(pth)})
    args = ["train", write_config(tmp_path / "cfg.yaml", cfg), "--work-dir", tmp_path / "run", "--no-progress"]
    assert_refused(args, marker, capsys, f"backbone.pth: not a loadable checkpoint ({REFUSED})")
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_training_state_that_runs_code(tmp_path, capsys):
    """The latest training-state file of a run is replaced by a pickle that runs code: --resume refuses it."""
    marker = tmp_path / "pwned"
    config = write_config(tmp_path / "cfg.yaml", tiny_run_config(train={"max_iters": 2}))
    args = ["train", config, "--work-dir", tmp_path / "run", "--no-progress"]
    assert run_cli(args, capsys)[0] == 0
    state_file = tmp_path / "run" / "checkpoints" / "iter_0000002.state.pt"
    malicious_pth(state_file, marker, layout="state")
    assert_refused([*args, "--resume"], marker, capsys, f"iter_0000002.state.pt: not a loadable checkpoint ({REFUSED})")


def test_variant_yaml_with_python_tag_is_refused(tmp_path, capsys):
    marker, folder = tmp_path / "pwned", tmp_path / "segmenter"
    model = build_model(from_dict(ModelConfig, tiny_run_config(model={"head": {"type": "segmenter"}})["model"]))
    export_checkpoint(model, folder, "segmenter")
    variant = folder / "variant.yml"
    variant.write_text(f"hook: !!python/object/apply:builtins.open ['{marker}', 'w']\n" + variant.read_text())
    assert_refused(["info", folder / "checkpoint.pth"], marker, capsys, "variant.yml: invalid YAML")


def test_config_yaml_with_python_tag_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = tmp_path / "cfg.yaml"
    config.write_text(f"hook: !!python/object/apply:builtins.open ['{marker}', 'w']\n"
                      + yaml.safe_dump(tiny_run_config()))
    assert_refused(["train", config, "--work-dir", tmp_path / "run"], marker, capsys, "cfg.yaml: not valid YAML")


def test_mmseg_config_text_is_parsed_never_executed(tmp_path, capsys):
    """mmseg checkpoints carry their config as Python text: segrank reads its literals and never runs it."""
    marker = tmp_path / "pwned"
    cfg = from_dict(ModelConfig, tiny_run_config()["model"])
    ckpt = {"meta": {"config": f"model = open({str(marker)!r}, 'w')\n"}, "state_dict": build_model(cfg).state_dict()}
    torch.save(ckpt, tmp_path / "model.pth")
    assert_refused(["info", tmp_path / "model.pth"], marker, capsys, "meta.config holds no model definition")
