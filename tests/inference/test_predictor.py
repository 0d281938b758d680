"""``segrank.Predictor``: every input form gives the same labels as ``segrank predict``, images are read as a viewer
shows them, results at the input's size with names, ranking, probabilities and pictures."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import segrank
from segrank.config import EvalConfig
from segrank.errors import SegrankError
from segrank.inference.images import array_to_rgb, read_image
from tests.conftest import tiny_model
from tests.reliability.common import run_cli, voc_photo

NAMES = ["sky", "tree", "road", "car", "person", "wall", "grass"]
SCALE = (64, 48)  # test scale of the tiny model: predictions stay fast


def tiny(head: str = "rankseg") -> segrank.Segmentor:
    model = tiny_model(len(NAMES), {"type": head, "topk": 3, "downsample": 2, "n_layers": 2}, {"patch_size": 8},
                       class_names=NAMES)
    model.inference = segrank.InferenceConfig(mean=(120.0, 115.0, 100.0), std=(60.0, 58.0, 57.0), img_scale=SCALE,
                                              eval=EvalConfig(mode="slide", crop_size=(32, 32), stride=(24, 24)))
    return model


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(voc_photo()[0][120:190, 160:260])  # 70 x 100 RGB


def test_every_input_form_gives_the_same_labels_as_the_cli(tmp_path, photo, capsys):
    checkpoint = segrank.save_model(tiny(), tmp_path / "model.safetensors")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo).save(folder / "a.png")
    Image.fromarray(photo[::-1]).save(folder / "b.png")
    predictor = segrank.Predictor(checkpoint)
    single = predictor(folder / "a.png")
    assert isinstance(single, segrank.Prediction) and single.label.shape == photo.shape[:2]
    assert single.class_names == NAMES and single.source == str(folder / "a.png")
    forms = [str(folder / "a.png"), Image.open(folder / "a.png"), photo, photo.astype(np.float32) / 255]
    for form in forms:
        assert np.array_equal(predictor(form).label, single.label), type(form)
    listed = predictor([folder, str(folder / "*.png"), photo])
    assert [p.name for p in listed] == ["a", "b", "a", "b", "image"]
    assert np.array_equal(listed[1].label, predictor(photo[::-1]).label)

    code, _, err = run_cli(["predict", checkpoint, folder, "--out", tmp_path / "out", "--no-progress"], capsys)
    assert code == 0, err
    for prediction in listed[:2]:
        written = np.array(Image.open(tmp_path / "out" / f"{prediction.name}.png"))
        assert np.array_equal(written, prediction.label)
        ranking = json.loads((tmp_path / "out" / f"{prediction.name}.json").read_text())["ranking"]
        assert ranking == prediction.ranking
    assert segrank.predict(checkpoint, folder / "a.png").label.tolist() == single.label.tolist()


def test_prediction_contents(tmp_path, photo):
    prediction = segrank.Predictor(tiny(), probabilities=True)(photo)
    ranking = prediction.ranking
    assert [r["name"] for r in ranking] != [] and sorted(r["name"] for r in ranking) == sorted(NAMES)
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    assert set(np.unique(prediction.label)) <= {r["class"] for r in ranking if r["selected"]}
    probs, classes = prediction.probabilities, prediction.probability_classes
    assert probs.shape == (len(classes), *photo.shape[:2])
    assert np.array_equal(classes[probs.argmax(0)], prediction.label)
    legend = prediction.legend()
    assert sum(c["pixel_fraction"] for c in legend) == pytest.approx(1, abs=1e-5)
    assert {c["class"] for c in legend} == set(np.unique(prediction.label).tolist())
    color = np.array(prediction.colorize())
    assert np.array_equal(color, prediction.palette[prediction.label])
    overlay = np.array(prediction.overlay(alpha=1.0))
    assert np.array_equal(overlay, color) and np.array_equal(np.array(prediction.overlay(alpha=0.0)), photo)
    written = prediction.save(tmp_path / "out", name="x")
    assert [p.name for p in written] == ["x.png", "x_color.png", "x_overlay.png", "x.json"]
    dense = segrank.Predictor(tiny("segmenter"))(photo)
    assert dense.ranking is None and dense.probabilities is None


def test_runs_under_inference_mode_on_a_frozen_model(tmp_path, photo):
    loaded = segrank.load_model(segrank.save_model(tiny(), tmp_path / "m.safetensors"))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    seen = []
    loaded.register_forward_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    segrank.Predictor(loaded)(photo)
    assert seen and all(seen)


def test_defaults_are_announced_once_and_bad_options_refused(photo):
    model = tiny()
    model.inference = None
    with pytest.warns(UserWarning, match="defaults are used") as record:
        predictor = segrank.Predictor(model, img_scale=SCALE)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor([photo, photo])  # no further announcement per image
    for kwargs, message in [({"amp": "fp8"}, "amp"), ({"std": [0, 1, 1]}, "std: every value must be > 0"),
                            ({"img_scale": [0, 10]}, "img_scale"), ({"mode": "tiles"}, "mode"),
                            ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(SegrankError, match=message):
            segrank.Predictor(tiny(), **kwargs)
    with pytest.raises(SegrankError, match="expected a path"):
        segrank.Predictor(tiny())(42)
    with pytest.raises(SegrankError, match="expected H x W"):
        segrank.Predictor(tiny())(np.zeros((4, 5, 2), np.uint8))
    assert segrank.Predictor(tiny(), amp="bf16")(photo).label.shape == photo.shape[:2]
    with pytest.raises(SegrankError, match="a GT-oracle model needs label maps"):
        segrank.Predictor(tiny("rankseg_gt"))
    for image in (Image.fromarray(photo), photo):  # the bare model says where images go
        with pytest.raises(TypeError, match=r"takes a normalised \(B, 3, H, W\) tensor, got .*segrank.Predictor"):
            tiny().class_map(image)


def exif_rotated(path, rgb):
    """Save ``rgb`` stored sideways with EXIF orientation 6 (a viewer turns it 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(rgb, 1)).save(path, exif=exif)


def test_images_read_as_a_viewer_shows_them(tmp_path, photo):
    exif_rotated(tmp_path / "turned.png", photo)
    assert np.array_equal(read_image(tmp_path / "turned.png"), photo)

    ramp = np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    grey = read_image(tmp_path / "grey16.png")
    assert grey.shape == (40, 50, 3) and grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255
    assert np.abs(grey[..., 0].astype(int) - np.rint(ramp / 257)).max() <= 1  # scaled, not clipped to white
    assert np.array_equal(array_to_rgb(ramp.astype(">u2")), grey) and np.array_equal(array_to_rgb(ramp), grey)

    floats = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50)
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    assert read_image(tmp_path / "float.tif")[-1, -1, 0] == 255 and read_image(tmp_path / "float.tif")[20, 0, 0] > 100

    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:10, :, 3] = 0  # transparent strip: white on a page
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    read = read_image(tmp_path / "rgba.png")
    assert (read[:10] == 255).all() and np.array_equal(read[10:], photo[10:])

    Image.fromarray(photo).convert("P").save(tmp_path / "palette.png")
    assert np.array_equal(read_image(tmp_path / "palette.png"), np.array(Image.open(tmp_path / "palette.png")
                                                                          .convert("RGB")))
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert read_image(tmp_path / "cmyk.jpg").shape == photo.shape
    assert segrank.Predictor(tiny())(tmp_path / "turned.png").label.shape == photo.shape[:2]
