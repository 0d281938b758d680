"""A new checkpoint format is one record in the table of segrank.checkpoints.formats (docs/architecture.md, "A
checkpoint format"): a toy JSON layout added that way is detected by content, written by ``export_checkpoint``, and
``segrank predict`` on its file gives the files the same model gives as a native checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segrank
from segrank import files
from segrank.checkpoints import CheckpointError, detect_format, export_checkpoint, formats, load_model, save_model
from segrank.checkpoints.detect import CheckpointContent
from segrank.cli import main
from segrank.config import EvalConfig, ModelConfig, from_dict, to_dict
from segrank.config.inference import InferenceConfig

TOY = "toy-json"


def is_toy(content: CheckpointContent) -> bool:
    """A JSON file that says it is a toy checkpoint (the built-in formats see a text file, which none claims)."""
    if content.kind is not None:
        return False
    try:
        data = json.loads(content.path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == TOY


def load_toy(path: Path, cfg: ModelConfig | None) -> segrank.Segmentor:
    data = json.loads(path.read_text())
    model = segrank.Segmentor(cfg or from_dict(ModelConfig, data["model"], "model"))
    sd = {name: torch.tensor(w["values"], dtype=getattr(torch, w["dtype"])).reshape(w["shape"])
          for name, w in data["weights"].items()}
    files.load_state_dict_strict(model, sd, str(path))
    model.inference = from_dict(InferenceConfig, data["inference"], "inference")
    return model


def export_toy(model: segrank.Segmentor, path: Path) -> None:
    weights = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                      "values": t.flatten().tolist()} for name, t in model.state_dict().items()}
    files.write_json(path, {"format": TOY, "model": to_dict(model.cfg), "inference": to_dict(model.inference),
                            "weights": weights})


TOY_FORMAT = formats.CheckpointFormat(TOY, is_toy, load_toy, export_toy)


def tiny_model() -> segrank.Segmentor:
    cfg = from_dict(ModelConfig, {
        "num_classes": 6, "class_names": [f"thing {i}" for i in range(6)],
        "backbone": {"embed_dim": 16, "depth": 1, "num_heads": 2, "pos_embed_grid": [2, 2]},
        "head": {"type": "rankseg", "topk": 3, "downsample": 2, "n_layers": 2}})
    torch.manual_seed(0)
    model = segrank.build_model(cfg).eval()
    with torch.no_grad():  # make every parameter matter (LayerNorms start at 1/0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # Settings unlike the defaults a checkpoint without them gets: a loader that dropped them would predict otherwise.
    model.inference = InferenceConfig(
        palette=[[40 * i, 255 - 40 * i, 90] for i in range(6)], mean=(120.0, 110.0, 100.0), std=(60.0, 58.0, 57.0),
        img_scale=(48, 40), eval=EvalConfig(mode="slide", crop_size=(24, 24), stride=(16, 16)))
    return model


def predicted_files(checkpoint: Path, images: Path, out: Path) -> dict[str, bytes]:
    assert main(["predict", str(checkpoint), str(images), "--out", str(out), "--no-progress"]) == 0
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setattr(formats, "CHECKPOINT_FORMATS", (*formats.CHECKPOINT_FORMATS, TOY_FORMAT))


def test_a_format_unknown_to_the_table_is_refused_as_what_it_is(tmp_path):
    path = tmp_path / "model.json"
    export_toy(tiny_model(), path)
    with pytest.raises(CheckpointError, match=r"model\.json: a text file, not a checkpoint"):
        load_model(path)
    with pytest.raises(CheckpointError, match=f"cannot export to format '{TOY}'"):
        export_checkpoint(tiny_model(), tmp_path / "again.json", TOY)


def test_a_format_added_to_the_table_predicts_like_a_native_checkpoint(toy_registered, tmp_path, capsys):
    model = tiny_model()
    toy = export_checkpoint(model, tmp_path / "model.json", TOY)
    native = save_model(model, tmp_path / "model.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("wide", (30, 50)), ("tall", (44, 28))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"{name}.png")

    assert detect_format(toy) == TOY and detect_format(native) == "native"
    loaded = load_model(toy)
    assert loaded.cfg == model.cfg and loaded.inference == model.inference and not loaded.training
    from_toy = predicted_files(toy, images, tmp_path / "from_toy")
    assert "no setting stored" not in capsys.readouterr().out  # the toy file's own settings were used
    assert from_toy == predicted_files(native, images, tmp_path / "from_native")
    assert {"wide.png", "wide_color.png", "tall.json"} <= set(from_toy)
