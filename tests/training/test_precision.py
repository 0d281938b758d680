"""``train.precision``: bf16 autocast trains on a CPU with fp32 master weights, fp32 stays bit-identical to the
deprecated ``train.amp: none`` path, ``auto`` is announced, and the two keys may not contradict each other."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from segrank.config import ConfigError
from segrank.reporting.plots import read_log
from segrank.training.loop import train
from segrank.training.run import announce_precision
from tests.training import tiny_data
from tests.training.test_train import tiny_config


@pytest.fixture(autouse=True)
def tiny_dataset(monkeypatch):
    tiny_data.install(monkeypatch)


def test_bf16_trains_on_cpu_with_fp32_weights(tmp_path):
    cfg = tiny_config("segmenter", precision="bf16", max_iters=30, lr=0.003, optimizer="adamw", log_interval=5,
                      checkpoint_interval=30)
    result = train(cfg, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_log(tmp_path / "run") if r["type"] == "train"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    weights = load_file(result.checkpoint)
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())


def test_fp32_is_the_amp_none_path_bit_for_bit(tmp_path):
    runs = {}
    for name, train_cfg in (("amp", {"amp": "none"}), ("fp32", {"precision": "fp32"})):
        runs[name] = load_file(train(tiny_config("rankseg", max_iters=4, **train_cfg), tmp_path / name,
                                     progress=False).checkpoint)
    assert runs["amp"].keys() == runs["fp32"].keys()
    assert all(torch.equal(runs["amp"][k], runs["fp32"][k]) for k in runs["amp"])


def test_bf16_differs_from_fp32(tmp_path):
    """bf16 really computes in bf16 (the autocast is not a no-op)."""
    out = {p: load_file(train(tiny_config("segmenter", max_iters=2, precision=p), tmp_path / p,
                              progress=False).checkpoint) for p in ("fp32", "bf16")}
    assert any(not torch.equal(out["fp32"][k], out["bf16"][k]) for k in out["fp32"])


def test_auto_is_announced_once(tmp_path, capsys):
    announce_precision.cache_clear()
    for name in ("a", "b"):
        train(tiny_config("segmenter", max_iters=1, precision="auto"), tmp_path / name, progress=False)
    err = capsys.readouterr().err
    assert err.count("segrank train: precision ") == 1
    assert any(name in err for name in ("fp32:", "bf16:"))


def test_amp_and_precision_may_not_contradict():
    with pytest.raises(ConfigError, match="train.precision: fp32 contradicts train.amp bf16"):
        tiny_config(amp="bf16", precision="fp32")
    assert tiny_config(amp="bf16", precision="bf16").train.precision == "bf16"
