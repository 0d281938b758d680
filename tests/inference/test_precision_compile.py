"""``--compile``: the compiled model segments as the eager one (probabilities within 1e-4: inductor fuses and
reorders float sums), and a machine without a C++ compiler gets one clear line instead of a compiler traceback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import segrank
from segrank.errors import SegrankError
from segrank.inference import compiled
from tests.inference.test_predictor import tiny
from tests.reliability.common import run_cli, voc_photo

TOLERANCE = 1e-4  # max |probability difference| compiled vs eager (fp32)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(voc_photo()[0][120:190, 160:260])


@pytest.mark.slow  # one inductor compile: 30 s to 2 min on the shared 2-core machine
@pytest.mark.skipif(compiled.compile_problem(torch.device("cpu")) is not None, reason="no C++ compiler")
def test_compiled_equals_eager(photo):
    model = tiny("rankseg")
    eager = segrank.Predictor(model, precision="fp32", probabilities=True)(photo)
    predictor = segrank.Predictor(model, precision="fp32", probabilities=True, compile=True)
    assert predictor.runner is not predictor.model  # really compiled
    result = predictor(photo)
    assert np.abs(result.probabilities - eager.probabilities).max() <= TOLERANCE
    assert (result.label == eager.label).mean() >= 0.999
    assert [r["class"] for r in result.ranking] == [r["class"] for r in eager.ranking]


def test_no_cpp_compiler_is_one_clear_line(monkeypatch, tmp_path, photo, capsys):
    monkeypatch.setattr(compiled, "cpu_compiler", lambda: None)
    with pytest.raises(SegrankError, match=r"^--compile: torch.compile on CPU needs a C\+\+ compiler"):
        segrank.Predictor(tiny(), compile=True)
    checkpoint = segrank.save_model(tiny(), tmp_path / "model.safetensors")
    Image.fromarray(photo).save(tmp_path / "a.png")
    code, out, err = run_cli(["predict", checkpoint, tmp_path / "a.png", "--out", tmp_path / "out", "--compile",
                              "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "C++ compiler" in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is written
