"""Hostile images given to ``segrank predict``: a damaged EXIF block is read past with one warning line (the image as
stored), and an image beyond the pixel limit is refused with one line before it is decoded."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from segrank.errors import SegrankError
from segrank.inference import images
from tests.reliability.bad_images_and_models import damaged_exif_jpeg
from tests.reliability.bad_input import eval_setup
from tests.reliability.common import run_cli, voc_photo


def test_damaged_exif_is_read_without_orientation(tmp_path, capsys):
    _, ckpt, _ = eval_setup(tmp_path)
    photo = voc_photo()[0][:60, :90]
    (tmp_path / "photo.jpg").write_bytes(damaged_exif_jpeg(photo))
    with Image.open(tmp_path / "photo.jpg") as img, pytest.raises(struct.error, match="not an integer"):
        ImageOps.exif_transpose(img)  # what Pillow itself does with it
    code, out, err = run_cli(["predict", ckpt, tmp_path / "photo.jpg", "--out", tmp_path / "pred", "--no-progress"],
                             capsys)
    assert code == 0, err
    assert err.splitlines() == [f"segrank predict: warning: {tmp_path / 'photo.jpg'}: damaged EXIF metadata (error: "
                                "required argument is not an integer); read without its orientation"]
    assert Image.open(tmp_path / "pred" / "photo.png").size == (90, 60)  # as stored: the 'rotate 90' is not applied


def test_image_beyond_the_pixel_limit_is_refused_before_decoding(tmp_path, capsys, monkeypatch):
    """The check reads the header only: a limit of 5000 pixels refuses a 100 x 60 PNG, whose pixels are never
    decoded (Image.load is not called)."""
    _, ckpt, _ = eval_setup(tmp_path)
    Image.fromarray(np.zeros((60, 100, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 5000)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    code, _, err = run_cli(["predict", ckpt, tmp_path / "big.png", "--out", tmp_path / "pred", "--no-progress"],
                           capsys)
    assert code == 2 and err.splitlines() == [
        f"segrank predict: error: {tmp_path / 'big.png'}: image of 100x60 pixels is larger than the limit of 0.005 "
        "megapixels"]
    assert not any(p.is_file() for p in tmp_path.joinpath("pred").rglob("*"))
    with pytest.raises(SegrankError, match="array of shape \\(60, 100, 3\\): image of 100x60 pixels is larger"):
        images.array_to_rgb(np.zeros((60, 100, 3), np.uint8))
