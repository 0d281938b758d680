"""Determinism: the same seed and config give identical weights, metrics and logged losses on a CPU; another seed
gives other weights (the seed is what fixes them)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import segrank.training.loop as engine
from segrank.config import Config, from_dict
from tests.conftest import tiny_run_config


def run(tmp_path, name: str, seed: int) -> tuple[dict, dict, list]:
    # Evaluation during training, augmentation in a DataLoader worker process, dropout and drop path in the model.
    cfg = from_dict(Config, tiny_run_config(train={"max_iters": 6, "eval_interval": 3, "checkpoint_interval": 3,
                                               "seed": seed},
                                        data={"workers": 1}))
    result = engine.train(cfg, tmp_path / name, progress=False)
    records = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in r.items() if k not in ("time_s", "eta_s", "memory_mb")} for r in records]
    return load_file(result.checkpoint), result.evaluation, losses


def test_same_seed_same_weights_metrics_and_losses(tmp_path):
    weights_a, metrics_a, log_a = run(tmp_path, "a", seed=3)
    weights_b, metrics_b, log_b = run(tmp_path, "b", seed=3)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert json.dumps(metrics_a, sort_keys=True) == json.dumps(metrics_b, sort_keys=True)  # NaN-safe equality
    assert {"mIoU", "aAcc", "mAcc", "IoU"} <= metrics_a.keys()
    assert log_a == log_b and [r["step"] for r in log_a if r["type"] == "eval"] == [3, 6]

    weights_c, _, log_c = run(tmp_path, "c", seed=4)
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    assert log_c != log_a
