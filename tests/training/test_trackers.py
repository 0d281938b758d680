"""Experiment trackers (train.loggers), offline: MLflow into a local file store, W&B in offline mode. They receive
log.jsonl's numbers, the resolved config and the eval results; a tracker failing mid-run is disabled with one
warning line and changes nothing of log.jsonl or the checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segrank.training import trackers
from tests.conftest import tiny_run_config
from tests.reliability.common import run_cli, write_config

TRAIN = {"max_iters": 4, "log_interval": 2, "checkpoint_interval": 2, "eval_interval": 4}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """MLflow and W&B write under tmp_path and never reach the network."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    return tmp_path


def train(tmp: Path, name: str, capsys, loggers: list[str]) -> tuple[Path, str]:
    cfg = tiny_run_config(train={**TRAIN, "loggers": loggers})
    work = tmp / name
    code, _, err = run_cli(["train", write_config(tmp / f"{name}.yaml", cfg), "--work-dir", work, "--no-progress"],
                           capsys)
    assert code == 0, err
    return work, err


def records(work: Path, kind: str) -> list[dict]:
    return [r for line in (work / "log.jsonl").read_text().splitlines() if (r := json.loads(line))["type"] == kind]


def mlflow_metric(run: Path, key: str) -> dict[int, float]:
    """step -> value of a metric in an MLflow file-store run folder."""
    return {int(step): float(value) for _, value, step in
            (line.split() for line in (run / "metrics" / key).read_text().splitlines())}


def wandb_history(run_file: Path, key: str) -> list[float]:
    """The distinct values logged under ``key`` in an offline W&B run file, in order (protobuf items of history and
    summary records: the key, then the value as JSON, each length-prefixed)."""
    data = run_file.read_bytes()
    pattern = re.compile(re.escape(bytes([len(key)]) + key.encode()) + rb"\x82\x01(.)", re.DOTALL)
    return list(dict.fromkeys(float(data[m.end():m.end() + m.group(1)[0]]) for m in pattern.finditer(data)))


def test_mlflow_and_wandb_receive_the_log_the_config_and_the_eval_results(offline, capsys):
    work, _ = train(offline, "run", capsys, ["mlflow", "wandb"])
    train_records, eval_records = records(work, "train"), records(work, "eval")
    assert len(train_records) == 2 and len(eval_records) == 1

    (run,) = [p.parent for p in (offline / "mlruns").glob("*/*/meta.yaml") if (p.parent / "metrics").is_dir()]
    assert mlflow_metric(run, "train/loss") == pytest.approx({r["step"]: r["loss"] for r in train_records})
    assert mlflow_metric(run, "eval/mIoU") == pytest.approx({4: eval_records[0]["mIoU"]})
    assert (run / "params" / "train.lr").read_text() == "0.01"
    assert (run / "artifacts" / "config.yaml").read_text() == (work / "config.yaml").read_text()
    assert json.loads((run / "artifacts" / "eval" / "iter_0000004.json").read_text())["step"] == 4

    (run_file,) = (offline / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    assert wandb_history(run_file, "train/loss") == pytest.approx([r["loss"] for r in train_records])
    assert wandb_history(run_file, "eval/mIoU") == pytest.approx([eval_records[0]["mIoU"]])
    assert b"0.01" in run_file.read_bytes() and b"max_iters" in run_file.read_bytes()  # the config


def test_failing_tracker_is_disabled_and_changes_nothing_of_the_run(offline, capsys, monkeypatch):
    plain, _ = train(offline, "plain", capsys, [])
    calls = []

    def failing_log(self, step, scalars):
        calls.append(step)
        raise ConnectionError("tracking server went away\nsecond line")

    monkeypatch.setattr(trackers.MLflowTracker, "log", failing_log)
    tracked, err = train(offline, "tracked", capsys, ["mlflow"])
    assert calls == [2]  # disabled after its first failure
    warnings = [line for line in err.splitlines() if "tracker" in line]
    assert warnings == ["segrank train: warning: tracker mlflow failed (ConnectionError: tracking server went "
                        "away); it is disabled, training continues"]

    def steady(work: Path) -> list[dict]:  # the log without its timings
        return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "eta_s", "memory_mb")}
                for line in (work / "log.jsonl").read_text().splitlines()]

    assert steady(tracked) == steady(plain)
    names = sorted(p.name for p in (plain / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (tracked / "checkpoints").iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            a, b = load_file(plain / "checkpoints" / name), load_file(tracked / "checkpoints" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        elif name.endswith(".state.pt"):
            a = torch.load(plain / "checkpoints" / name, weights_only=True)
            b = torch.load(tracked / "checkpoints" / name, weights_only=True)
            assert a["step"] == b["step"] and str(a["optimizer"]) == str(b["optimizer"])


def test_default_is_tensorboard_when_installed_and_records_map_to_type_slash_key(tmp_path, monkeypatch):
    logged = []

    class FakeBoard(trackers.Tracker):
        def __init__(self, work_dir, config, config_file):
            logged.append(("start", config_file.name))

        def log(self, step, scalars):
            logged.append((step, scalars))

        def close(self):
            logged.append("closed")

    monkeypatch.setitem(trackers.TRACKERS, "tensorboard", FakeBoard)
    monkeypatch.setattr(trackers, "installed", lambda name: True)
    run = trackers.start_trackers(None, tmp_path, {}, tmp_path / "config.yaml")
    run.log_record({"type": "train", "step": 5, "loss": 1.5, "lr": 1e-3, "note": "text", "bad": float("nan")})
    run.close()
    assert logged == [("start", "config.yaml"), (5, {"train/loss": 1.5, "train/lr": 1e-3}), "closed"]
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    assert trackers.start_trackers(None, tmp_path, {}, tmp_path / "config.yaml").active == {}
    assert trackers.start_trackers([], tmp_path, {}, tmp_path / "config.yaml").active == {}


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda name: name != "wandb")
    trackers.check_installed(["tensorboard", "mlflow"])
    with pytest.raises(trackers.SegrankError, match=r"train.loggers: 'wandb' needs the wandb package: pip install "
                                                    r"'segrank\[wandb\]'"):
        trackers.check_installed(["mlflow", "wandb"])
