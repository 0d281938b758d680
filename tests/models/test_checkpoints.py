"""Checkpoint round trips through every layout, and clear refusals of bad files."""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import segrank
from segrank.checkpoints import CheckpointError, export_checkpoint, load_model, save_model
from segrank.checkpoints.mmseg import to_mmseg_name
from segrank.cli import main
from segrank.config import ModelConfig, from_dict, to_dict


def config(head: str = "rankseg", head_extra: dict | None = None, **kw) -> ModelConfig:
    heads = {
        "rankseg": {"type": "rankseg", "topk": 4, "downsample": 2, "n_layers": 3},
        "q2l": {"type": "rankseg", "topk": 4, "downsample": 2, "n_layers": 2, "multilabel_head": "query2label",
                "q2l_heads": 2, "q2l_d_ff": 32},
        "gap": {"type": "rankseg", "topk": 4, "downsample": 2, "n_layers": 2, "multilabel_head": "global_pool"},
        "gt": {"type": "rankseg_gt", "n_layers": 2},
        "segmenter": {"type": "segmenter", "n_layers": 2},
        "linear": {"type": "linear"},
    }
    backbone = {"embed_dim": 32, "depth": 2, "num_heads": 2, "pos_embed_grid": [3, 3], **kw.pop("backbone", {})}
    head_cfg = {**heads[head], **(head_extra or {})}
    return from_dict(ModelConfig, {"num_classes": 11, "backbone": backbone, "head": head_cfg, **kw})


def random_model(cfg: ModelConfig) -> segrank.Segmentor:
    torch.manual_seed(0)
    model = segrank.build_model(cfg).eval()
    with torch.no_grad():  # make every parameter matter (LayerNorms start at 1/0, OCE tokens at zero)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def outputs(model, x):
    present = torch.zeros(x.shape[0], model.num_classes, dtype=torch.bool)
    present[:, [1, 4]] = True
    with torch.no_grad():
        return model.dense_logits(x, tuple(x.shape[2:]), present if model.needs_present_classes else None)


X = torch.randn(2, 3, 40, 56)


@pytest.mark.parametrize("head", ["rankseg", "q2l", "gap", "gt", "segmenter", "linear"])
def test_native_round_trip(head, tmp_path):
    model = random_model(config(head))
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = segrank.load_model(path)
    assert loaded.cfg == model.cfg and not loaded.training
    assert torch.equal(outputs(model, X), outputs(loaded, X))


@pytest.mark.parametrize("head", ["rankseg", "q2l", "gap", "gt", "segmenter"])
def test_mmseg_round_trip(head, tmp_path):
    oce = {"backbone": {"oce_start_layer": 1}, "head_extra": {"cls_emb_from_backbone": True}}
    model = random_model(config(head, **(oce if head == "rankseg" else {})))
    path = export_checkpoint(model, tmp_path / "m.pth", "mmseg")
    loaded = load_model(path)  # architecture parsed back from meta.config
    assert torch.equal(outputs(model, X), outputs(loaded, X))


@pytest.mark.parametrize("head", ["segmenter", "linear"])
def test_official_segmenter_round_trip(head, tmp_path):
    cfg = config(head, padding="crop", backbone={"norm_eps": 1e-5, "pos_embed_interpolation": "bilinear"})
    cfg.head.norm_eps = 1e-5
    model = random_model(cfg)
    folder = export_checkpoint(model, tmp_path / "official", "segmenter")
    loaded = load_model(folder)
    assert torch.equal(outputs(model, X), outputs(loaded, X))


@pytest.mark.parametrize("fmt", ["npz", "timm"])
def test_backbone_formats_round_trip(fmt, tmp_path):
    model = random_model(config("segmenter"))
    path = export_checkpoint(model, tmp_path / ("b.npz" if fmt == "npz" else "b.safetensors"), fmt)
    loaded = load_model(path, format=fmt, config=model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(X).feature_map, model.backbone(X).feature_map, atol=0, rtol=0)


def test_timm_state_dict_with_prefix_and_classifier_resamples_position_table(tmp_path):
    model = random_model(config("segmenter"))
    sd = {f"module.{k}": v for k, v in model.backbone.state_dict().items()}
    sd["module.pos_embed"] = torch.randn(1, 1 + 6 * 6, 32)  # another grid: resampled to 3x3 at load
    sd["module.head.weight"] = torch.randn(1000, 32)
    torch.save(sd, tmp_path / "vit.pth")
    loaded = load_model(tmp_path / "vit.pth", config=model.cfg)
    assert loaded.backbone.pos_embed.shape == (1, 10, 32)


def test_oce_tokens_stay_zero_when_loading_backbone_weights(tmp_path):
    model = random_model(config("segmenter"))
    path = export_checkpoint(model, tmp_path / "b.npz", "npz")
    oce = config("segmenter", backbone={"oce_start_layer": 1})
    loaded = load_model(path, config=oce)
    assert torch.count_nonzero(loaded.backbone.cls_emb) == 0


def test_mmseg_names_follow_the_reference():
    assert to_mmseg_name("backbone.blocks.3.norm1.weight") == "backbone.layers.3.ln1.weight"
    assert to_mmseg_name("backbone.blocks.0.attn.qkv.bias") == "backbone.layers.0.attn.attn.in_proj_bias"
    assert to_mmseg_name("backbone.norm.bias") == "backbone.ln1.bias"
    assert to_mmseg_name("decode_head.img_cls_head.3.weight") == "decode_head.img_cls_head.2.weight"
    assert to_mmseg_name("decode_head.blocks.0.norm1.weight") == "decode_head.blocks.0.norm1.weight"


def test_mismatched_checkpoint_lists_keys(tmp_path):
    path = save_model(random_model(config("rankseg")), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit the architecture \(mis-shaped: .*mask_norm"):
        load_model(path, config=_other_topk())
    sd = load_file(path)
    sd.pop("decode_head.ml_fc.W")
    sd["decode_head.extra"] = torch.zeros(1)
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: decode_head\.ml_fc\.W; unexpected: decode_head\.extra"):
        load_model(tmp_path / "broken.safetensors", format="native", config=config("rankseg"))


def _other_topk() -> ModelConfig:
    cfg = config("rankseg")
    cfg.head.topk = 5
    return cfg


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(str(marker))}}, f)
    for fmt in ("auto", "mmseg", "timm"):
        with pytest.raises(CheckpointError, match="refusing to load it|not a loadable checkpoint"):
            load_model(evil, format=fmt, config=config())
    assert main(["info", str(evil)]) == 2
    assert not marker.exists()


def test_cli_convert_and_info(tmp_path, capsys):
    src = export_checkpoint(random_model(config("rankseg")), tmp_path / "ref.pth", "mmseg")
    out = tmp_path / "out.safetensors"
    assert main(["convert", "--from", "mmseg", str(src), "--out", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rankseg (top-4, encoder_layer)" in text and "11 classes" in text
    assert "classes: no names stored" in text and "class_names" not in text
    assert main(["convert", str(src), "--out", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["convert", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "j.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "junk.pth" in err
    assert not (tmp_path / "j.safetensors").exists()


def test_info_prints_the_class_names_once_and_the_architecture_as_a_model_section(tmp_path, capsys):
    cfg = config("rankseg", class_names=[f"thing {i}" for i in range(11)])
    path = save_model(random_model(cfg), tmp_path / "named.safetensors")
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "classes: thing 0, thing 1, " in text and "thing 9, ..." in text and "thing 10" not in text
    section = yaml.safe_load(text[text.index("model:"):])["model"]
    assert "class_names" not in section
    assert to_dict(from_dict(ModelConfig, section, "model")) == to_dict(cfg) | {"class_names": None}
