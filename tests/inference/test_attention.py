"""Attention maps (``Predictor(attention=...)``, ``segrank predict --attention``): the recorded rows are the class
tokens' (and the ViT class token's) weights on the patches, laid on the image's patch grid, windows averaged by shared
area; RankSeg's kept classes and multi-label layer; class and layer choice; the PNG; predictions unchanged."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from PIL import Image

import segrank
from segrank.config import EvalConfig, ModelConfig, from_dict
from segrank.errors import SegrankError
from segrank.inference.attention import AttentionOptions, Canvas, spread_pooled
from segrank.models.blocks import AttentionRecorder, recording
from tests.reliability.common import run_cli

NAMES = ["sky", "tree", "road", "car", "person", "wall", "grass"]
PATCH = 8


def tiny(head: str = "segmenter", mode: str = "whole", downsample: int | None = 2, topk: int = 3,
         scale: tuple[int, int] = (64, 48)) -> segrank.Segmentor:
    cfg = from_dict(ModelConfig, {
        "num_classes": len(NAMES), "class_names": NAMES,
        "backbone": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": PATCH, "pos_embed_grid": [4, 4]},
        "head": {"type": head, "topk": topk, "downsample": downsample, "n_layers": 2, "n_heads": 2}})
    torch.manual_seed(0)
    model = segrank.build_model(cfg).eval()
    model.inference = segrank.InferenceConfig(mean=(120.0, 115.0, 100.0), std=(60.0, 58.0, 57.0), img_scale=scale,
                                              eval=EvalConfig(mode=mode, crop_size=(32, 32), stride=(20, 20)))
    return model


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """48 x 64: at the test scale (64, 48) the input is the photo itself, 6 x 8 patches."""
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (6, 8, 3)).repeat(8, 0).repeat(8, 1)
    return np.clip(smooth + rng.integers(-20, 20, smooth.shape), 0, 255).astype(np.uint8)


def full_weights(model: segrank.Segmentor, predictor: segrank.Predictor, photo: np.ndarray) -> dict[str, torch.Tensor]:
    """Every attention layer's whole (heads, L, L) weights on the whole preprocessed ``photo``, and the output."""
    image = predictor.preprocess(photo)[None]
    blocks = {f"backbone.{i}": b for i, b in enumerate(model.backbone.blocks)}
    blocks.update({f"head.{i}": b for i, b in enumerate(model.decode_head.blocks)})
    stored: dict[str, torch.Tensor] = {}
    with torch.no_grad(), ExitStack() as stack:
        for name, block in blocks.items():
            recorder = AttentionRecorder(rows=lambda length: slice(None),
                                         store=lambda w, name=name: stored.__setitem__(name, w[0]))
            stack.enter_context(recording(block.attn, recorder))
        stored["output"] = model(image)
    return stored


def test_segmenter_maps_are_the_class_tokens_weights_on_the_patches(photo):
    model = tiny()
    # fp32: the weights are compared with an fp32 forward of the model (auto is bf16 on CPUs with bf16 units)
    predictor = segrank.Predictor(model, attention=True, warn=False, precision="fp32")
    prediction = predictor(photo)
    maps = prediction.attention
    assert maps.layers == ["decoder.1", "backbone.1"]  # default: last mask-transformer layer, last ViT block
    legend = [c["class"] for c in prediction.legend()]
    assert maps.classes.tolist() == legend and maps.class_names == [NAMES[c] for c in legend]
    assert maps.heads["decoder.1"].shape == (2, len(legend), 6, 8)
    assert maps.heads["backbone.1"].shape == (2, 1, 6, 8) and maps.queries["backbone.1"] == ["cls"]
    full = full_weights(model, predictor, photo)
    n_patch, ids = 48, torch.tensor(legend)
    decoder = full["head.1"][:, n_patch + ids, :n_patch].reshape(2, len(legend), 6, 8)
    np.testing.assert_allclose(maps.heads["decoder.1"], decoder.numpy(), rtol=1e-5, atol=1e-7)
    cls = full["backbone.1"][:, :1, 1:1 + n_patch].reshape(2, 1, 6, 8)
    np.testing.assert_allclose(maps.heads["backbone.1"], cls.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps.maps["decoder.1"], decoder.mean(0).numpy(), rtol=1e-5, atol=1e-7)
    # the patches' share of each class token's attention: at most one, the rest is on the class tokens
    assert np.all(maps.maps["decoder.1"].sum((1, 2)) < 1) and np.all(maps.maps["decoder.1"] > 0)
    # at the image's size: each cell spread over its 8 x 8 pixels (the photo is the input here)
    up = maps.upsampled("decoder.1")
    assert up.shape == (len(legend), 48, 64)
    np.testing.assert_allclose(up, np.kron(maps.maps["decoder.1"], np.ones((PATCH, PATCH))), rtol=1e-6)


def test_predictions_and_model_are_unchanged_by_attention(photo):
    model = tiny("rankseg", "slide")
    plain = segrank.Predictor(model, warn=False, probabilities=True)(photo)
    with_maps = segrank.Predictor(model, attention=True, warn=False, probabilities=True)(photo)
    assert np.array_equal(plain.label, with_maps.label)
    assert np.array_equal(plain.probabilities, with_maps.probabilities) and plain.ranking == with_maps.ranking
    assert plain.attention is None and with_maps.attention is not None
    assert all(m.recorder is None for m in model.modules() if hasattr(m, "recorder"))


def test_rankseg_kept_classes_and_multilabel_layer(photo):
    model = tiny("rankseg", downsample=None, topk=3)
    predictor = segrank.Predictor(model, attention=AttentionOptions(classes=None), warn=False, precision="fp32")
    full = full_weights(model, predictor, photo)
    kept = full["output"].class_index[0].tolist()
    absent = next(c for c in range(len(NAMES)) if c not in kept)
    shown = [kept[2], absent, kept[0]]
    options = AttentionOptions(classes=[NAMES[shown[0]], str(absent), shown[2]])
    maps = segrank.Predictor(model, attention=options, warn=False, precision="fp32")(photo).attention
    assert maps.layers == ["decoder.0", "multilabel", "backbone.1"]
    assert maps.classes.tolist() == shown
    n_patch = 48
    # mask transformer (after the multi-label layer): rows are the top-k slots in rank order
    decoder = full["head.1"][:, n_patch + torch.tensor([2, 0]), :n_patch].reshape(2, 2, 6, 8).numpy()
    np.testing.assert_allclose(maps.heads["decoder.0"][:, [0, 2]], decoder, rtol=1e-5, atol=1e-7)
    assert np.isnan(maps.heads["decoder.0"][:, 1]).all()  # not kept: no weights
    assert [title for title, _ in maps.panels()[0][1]] == [NAMES[shown[0]], NAMES[absent] + " (not kept)",
                                                           NAMES[shown[2]]]
    # multi-label layer: all N class tokens over all patch tokens, kept or not
    multilabel = full["head.0"][:, n_patch + torch.tensor(shown), :n_patch].reshape(2, 3, 6, 8).numpy()
    np.testing.assert_allclose(maps.heads["multilabel"], multilabel, rtol=1e-5, atol=1e-7)


def test_pooled_multilabel_weights_are_shared_among_their_patches():
    pooled = torch.arange(1.0, 5.0).reshape(1, 1, 2, 2)  # 2 x 2 pooled cells
    spread = spread_pooled(pooled, (3, 4))  # rows 0,1 -> cell 0 and row 2 -> cell 1; columns in pairs
    expected = torch.tensor([[1 / 4, 1 / 4, 2 / 4, 2 / 4], [1 / 4, 1 / 4, 2 / 4, 2 / 4], [3 / 2, 3 / 2, 4 / 2, 4 / 2]])
    torch.testing.assert_close(spread[0, 0], expected)
    assert spread.sum() == pytest.approx(pooled.sum())
    maps = segrank.Predictor(tiny("rankseg", downsample=2), attention=True, warn=False)(
        np.zeros((48, 64, 3), np.uint8)).attention
    assert maps.heads["multilabel"].shape[2:] == (6, 8)


@pytest.mark.parametrize("head", ["segmenter", "rankseg"])
def test_maps_in_bf16_are_the_fp32_maps_to_bf16_accuracy(photo, head):
    """In bf16 the Predictor converts a copy of the model; its own layers are the ones recorded, under autocast."""
    model = tiny(head)
    fp32 = segrank.Predictor(model, attention=True, warn=False, precision="fp32")(photo).attention
    bf16 = segrank.Predictor(model, attention=True, warn=False, precision="bf16")(photo).attention
    assert bf16.layers == fp32.layers and bf16.classes.tolist() == fp32.classes.tolist()
    for layer in fp32.layers:
        np.testing.assert_allclose(bf16.heads[layer], fp32.heads[layer], atol=2e-2, rtol=0)


def test_windows_are_averaged_by_the_pixels_they_share():
    canvas = Canvas((16, 20), patch=4)  # image grid: 4 x 5 cells
    first = torch.full((1, 2, 4, 3), 1.0)  # window x 0..12: 3 cells
    second = torch.full((1, 2, 4, 3), 3.0)  # window x 10..20: cells from 10 (10-14, 14-18, 18-20)
    canvas.add((0, 16, 0, 12), first, torch.tensor([True, False]))
    canvas.add((0, 16, 10, 20), second, torch.tensor([True, False]))
    result = canvas.result()
    # image cells x 0-4, 4-8: first only; 8-12: first on 4 px, second on 2 px; 12-16, 16-20: second only
    np.testing.assert_allclose(result[0, 0, 0], [1, 1, (4 * 1 + 2 * 3) / 6, 3, 3])
    assert np.isnan(result[0, 1]).all()  # a row no window kept
    whole = Canvas((14, 10), patch=4)  # one window covering a grid whose last cells are cut: unchanged
    values = torch.rand(2, 3, 4, 3)
    whole.add((0, 14, 0, 10), values, None)
    np.testing.assert_allclose(whole.result(), values.numpy(), rtol=1e-6)


def test_sliding_windows_cover_the_image_grid(photo):
    slide = segrank.Predictor(tiny("rankseg", "slide"), attention=True, warn=False)(photo).attention
    for layer, weights in slide.heads.items():
        assert weights.shape[2:] == (6, 8) and not np.isnan(weights).any(), layer  # predicted classes: kept somewhere
    # one window as large as the input is whole mode
    model = tiny("segmenter", "slide")
    model.inference.eval = EvalConfig(mode="slide", crop_size=(48, 64), stride=(48, 64))
    one_window = segrank.Predictor(model, attention=True, warn=False)(photo).attention
    whole = segrank.Predictor(tiny("segmenter", "whole"), attention=True, warn=False)(photo).attention
    for layer in whole.layers:
        np.testing.assert_allclose(one_window.heads[layer], whole.heads[layer], rtol=1e-5, atol=1e-7)


def test_class_and_layer_choice(photo):
    model = tiny()
    maps = segrank.Predictor(model, attention=AttentionOptions(max_classes=2), warn=False)(photo).attention
    prediction = segrank.Predictor(model, warn=False)(photo)
    assert maps.classes.tolist() == [c["class"] for c in prediction.legend()[:2]]
    options = AttentionOptions(classes=["wall", 1, "wall"], layers=["decoder.0", "backbone.0", "backbone"])
    maps = segrank.Predictor(model, attention=options, warn=False)(photo).attention
    assert maps.class_names == ["wall", "tree"] and maps.layers == ["decoder.0", "backbone.0", "backbone.1"]
    single = segrank.Predictor(model, attention=AttentionOptions(classes="wall", layers="decoder"), warn=False)
    assert single(photo).attention.layers == ["decoder.1"]  # a string is one name, not a list of letters
    linear = segrank.Predictor(tiny("linear"), attention=True, warn=False)(photo).attention
    assert linear.layers == ["backbone.1"]
    bad = [(AttentionOptions(classes=["wal"]), "'wal' is not a class of this model \\(did you mean 'wall'\\?\\)"),
           (AttentionOptions(classes=[7]), "7 is not a class id of this model \\(0-6\\)"),
           (AttentionOptions(classes=[]), "none given"),
           (AttentionOptions(layers=["decoder.2"]), "'decoder.2' is not a layer of this model \\(it has "
                                                    "decoder.0-decoder.1, backbone.0-backbone.1\\)"),
           (AttentionOptions(layers=["multilabel"]), "'multilabel' is not a layer"),
           (AttentionOptions(max_classes=0), "max_classes: 0")]
    for options, message in bad:
        with pytest.raises(SegrankError, match=message):
            segrank.Predictor(model, attention=options, warn=False)
    with pytest.raises(SegrankError, match="'decoder' is not a layer"):
        segrank.Predictor(tiny("linear"), attention=AttentionOptions(layers=["decoder"]), warn=False)


def test_save_writes_the_grid_only_when_attention_was_computed(tmp_path, photo):
    model = tiny("rankseg")
    plain = segrank.Predictor(model, warn=False)(photo).save(tmp_path / "plain", name="x")
    assert [p.name for p in plain] == ["x.png", "x_color.png", "x_overlay.png", "x.json"]
    prediction = segrank.Predictor(model, attention=True, warn=False)(photo)
    written = prediction.save(tmp_path / "maps", name="x")
    assert [p.name for p in written][-1] == "x_attention.png"
    grid = np.array(Image.open(written[-1]))
    assert grid.ndim == 3 and grid.shape[0] > 100 and grid.shape[1] > 300


def test_cli_writes_the_attention_png_and_refuses_bad_choices(tmp_path, photo, capsys):
    checkpoint = segrank.save_model(tiny("rankseg", "slide"), tmp_path / "model.safetensors")
    Image.fromarray(photo).save(tmp_path / "kitchen.png")
    code, out, err = run_cli(["predict", checkpoint, tmp_path / "kitchen.png", "--out", tmp_path / "out",
                              "--attention", "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "kitchen_attention.png").is_file() and "5 files written" in out
    code, _, err = run_cli(["predict", checkpoint, tmp_path / "kitchen.png", "--out", tmp_path / "named",
                            "--attention-classes", "sky", "3", "--attention-layers", "backbone.0"], capsys)
    assert code == 0, err
    assert (tmp_path / "named" / "kitchen_attention.png").is_file()
    code, _, err = run_cli(["predict", checkpoint, tmp_path / "kitchen.png", "--out", tmp_path / "bad",
                            "--attention-classes", "skyy"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "segrank predict: error: attention classes: 'skyy' is not a class of this model (did you mean 'sky'?)"]
    assert not (tmp_path / "bad").exists()
    oracle = segrank.save_model(tiny("rankseg_gt"), tmp_path / "oracle.safetensors")
    code, _, err = run_cli(["predict", oracle, tmp_path / "kitchen.png", "--out", tmp_path / "gt", "--attention"],
                           capsys)
    assert code == 2 and "GT-oracle model needs label maps" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "gt").exists()
