"""Checkpoint round trips through every layout, and clear refusals of bad files."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import segrank
from segrank.checkpoints import CheckpointError, detect_format, export_checkpoint, load_model, save_model
from segrank.checkpoints.mmseg import to_mmseg_name
from segrank.checkpoints.vit_weights import load_backbone_weights
from segrank.cli import main
from segrank.config import EvalConfig, ModelConfig, from_dict, to_dict


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
    # Frozen like every model load_model returns: on AVX2 CPUs a kernel path of the GT head differs with
    # requires_grad (by ~2e-6, also under no_grad), which the exact round-trip comparisons would see.
    return model.requires_grad_(False)


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


# --------------------------------------------------------------------------------------------------------------
# Test settings carried by every layout, the Hugging Face folder, folders that stand for a checkpoint, and formats
# told apart by content.


def with_settings(model: segrank.Segmentor) -> segrank.Segmentor:
    model.inference = segrank.InferenceConfig(
        palette=[[i * 20, 255 - i * 20, (i * 70) % 256] for i in range(11)], mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5), img_scale=(96, 64),
        eval=EvalConfig(mode="slide", crop_size=(48, 48), stride=(32, 32), ms_scales=[0.5, 1.0]))
    return model


def test_test_settings_survive_native_mmseg_and_official_layouts(tmp_path):
    model = with_settings(random_model(config("rankseg")))
    native = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert native.inference == model.inference
    mmseg = load_model(export_checkpoint(model, tmp_path / "m.pth", "mmseg")).inference
    assert (mmseg.mean, mmseg.std, mmseg.img_scale, mmseg.palette) == (
        model.inference.mean, model.inference.std, model.inference.img_scale, model.inference.palette)
    assert (mmseg.eval.mode, mmseg.eval.crop_size, mmseg.eval.stride) == ("slide", (48, 48), (32, 32))
    cfg = config("segmenter", padding="crop", backbone={"norm_eps": 1e-5, "pos_embed_interpolation": "bilinear"})
    official = load_model(export_checkpoint(with_settings(random_model(cfg)), tmp_path / "run", "segmenter"))
    # The official variant.yml records the 'vit' normalisation and square windows; im_size is the short side.
    assert (official.inference.mean, official.inference.img_scale) == ((127.5, 127.5, 127.5), (256, 64))
    assert (official.inference.eval.crop_size, official.inference.eval.stride) == ((48, 48), (32, 32))
    untouched = load_model(save_model(random_model(config("rankseg")), tmp_path / "plain.safetensors"))
    assert untouched.inference is None  # nothing invented for a model that never had settings


def test_official_fixture_carries_its_normalisation_and_windows():
    from tests.parity.common import FIXTURES

    model = load_model(FIXTURES / "official_segmenter" / "mask_transformer")
    assert model.inference.mean == (127.5, 127.5, 127.5) and model.inference.img_scale == (512, 128)
    assert (model.inference.eval.crop_size, model.inference.eval.stride) == ((128, 128), (128, 128))


def test_save_pretrained_folder(tmp_path):
    cfg = config("rankseg", class_names=[f"thing{i}" for i in range(11)])
    model = with_settings(random_model(cfg))
    folder = segrank.save_pretrained(model, tmp_path / "hf")
    data = json.loads((folder / "config.json").read_text())
    assert data["id2label"]["3"] == "thing3" and data["label2id"]["thing3"] == 3 and data["num_labels"] == 11
    for loaded in (segrank.from_pretrained(folder), load_model(folder), load_model(folder / "model.safetensors")):
        assert loaded.cfg == model.cfg and loaded.inference == model.inference
        assert torch.equal(outputs(model, X), outputs(loaded, X))
    data["id2label"]["3"] = "renamed"  # as in Hugging Face, config.json is what from_pretrained reads
    (folder / "config.json").write_text(json.dumps(data))
    assert load_model(folder).cfg.class_names[3] == "renamed"
    data["id2label"].pop("3")
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="id2label: needs one name for each class id 0..10"):
        load_model(folder)


def test_run_work_dir_stands_for_its_latest_checkpoint(tmp_path):
    first, second = random_model(config("segmenter")), with_settings(random_model(config("segmenter")))
    ckpts = tmp_path / "run" / "checkpoints"
    save_model(first, ckpts / "iter_0000001.safetensors")
    save_model(second, ckpts / "iter_0000002.safetensors")
    (ckpts / "latest").write_text("iter_0000002\n")
    for path in (tmp_path / "run", ckpts):
        assert torch.equal(outputs(load_model(path), X), outputs(second, X))
    (ckpts / "latest").write_text("iter_0000003\n")
    with pytest.raises(CheckpointError, match=r"latest: names checkpoint 'iter_0000003'"):
        load_model(tmp_path / "run")


def test_formats_are_told_apart_by_content_not_name(tmp_path):
    model = random_model(config("rankseg"))
    renamed = tmp_path / "weights.pth"  # a native .safetensors under a PyTorch name loads as what it is
    save_model(model, tmp_path / "m.safetensors").rename(renamed)
    assert detect_format(renamed) == "native"
    assert torch.equal(outputs(load_model(renamed), X), outputs(model, X))
    mmseg = export_checkpoint(model, tmp_path / "ref.pth", "mmseg").rename(tmp_path / "ref.safetensors")
    assert detect_format(mmseg) == "mmseg" and torch.equal(outputs(load_model(mmseg), X), outputs(model, X))
    npz = export_checkpoint(model, tmp_path / "b.npz", "npz").rename(tmp_path / "backbone.bin")
    timm = export_checkpoint(model, tmp_path / "b.safetensors", "timm").rename(tmp_path / "backbone.pt")
    assert (detect_format(npz), detect_format(timm)) == ("npz", "timm")
    for path in (npz, timm):
        loaded = load_model(path, config=model.cfg)
        with torch.no_grad():
            assert torch.equal(loaded.backbone(X).feature_map, model.backbone(X).feature_map)
    for path in (npz, timm):  # train.pretrained reads backbones by content too
        fresh = load_backbone_weights(segrank.build_model(model.cfg).eval(), path)
        with torch.no_grad():
            assert torch.equal(fresh.backbone(X).feature_map, model.backbone(X).feature_map)


WRONG_FILES = {
    "training state": (lambda p: torch.save({"step": 2, "seed": 0, "optimizer": {}, "scaler": {}},
                                            p / "iter_0000002.state.pt") or p / "iter_0000002.state.pt",
                       "iter_0000002.state.pt: a segrank training state (optimizer state and step, read by train "
                       "--resume), not model weights; the weights are in iter_0000002.safetensors beside it"),
    "optimizer state": (lambda p: torch.save({"state": {}, "param_groups": []}, p / "opt.pt") or p / "opt.pt",
                        "opt.pt: an optimizer state, not model weights"),
    "folder": (lambda p: (p / "photos").mkdir() or p / "photos",
               "photos: not a checkpoint folder (expected config.json + model.safetensors (save_pretrained), a "
               "training run's work dir (checkpoints/latest) or an official Segmenter run"),
    "image": (lambda p: Image.new("RGB", (4, 4)).save(p / "cat.png") or p / "cat.png",
              "cat.png: a PNG image, not a checkpoint"),
    "empty": (lambda p: (p / "model.pth").touch() or p / "model.pth", "model.pth: empty file, not a checkpoint"),
    "yaml": (lambda p: (p / "cfg.pth").write_text("model:\n  num_classes: 3\n") and p / "cfg.pth",
             "cfg.pth: a text file, not a checkpoint (it starts with 'model:')"),
    "zip": (lambda p: zipfile.ZipFile(p / "a.zip", "w").close() or p / "a.zip",
            "a.zip: a zip archive holding neither PyTorch weights (data.pkl) nor .npy arrays"),
    "official without variant": (lambda p: torch.save({"model": {"x": torch.zeros(1)}, "n_cls": 3}, p / "c.pth")
                                 or p / "c.pth", "c.pth: official Segmenter checkpoint without the variant.yml"),
    "truncated header": (lambda p: (p / "t.safetensors").write_bytes(b"\x00\x10\x00\x00\x00\x00\x00\x00{\"a\"")
                         and p / "t.safetensors", "t.safetensors: truncated .safetensors file"),
    "not a mapping": (lambda p: torch.save([torch.zeros(2)], p / "list.pt") or p / "list.pt",
                      "list.pt: holds a list, not a checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(WRONG_FILES))
def test_each_wrong_kind_of_file_gets_its_own_message(kind, tmp_path, capsys):
    make, message = WRONG_FILES[kind]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, config=config())
    assert str(err.value).startswith(str(path)) and message in str(err.value), str(err.value)
    assert "run code" not in str(err.value) and "timm" not in str(err.value)
    assert main(["info", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_tensors_that_are_no_model_are_not_called_backbone_weights(tmp_path, capsys):
    save_file({"in.64x96": torch.zeros(1, 3, 4, 4), "out.logits": torch.zeros(2)}, tmp_path / "io.safetensors")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    for name, what in (("io.safetensors", "a .safetensors file"), ("other.pth", "a PyTorch file")):
        assert main(["info", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{name}: {what} of tensors (" in err and "neither a segrank model nor ViT backbone weights" in err
