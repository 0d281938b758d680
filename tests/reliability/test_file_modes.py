"""Outputs honour the umask like any other tool: under umask 022 every file segrank writes is 0644, under 002 it is
0664 (colleagues sharing a group can read, and write, a run), whatever writes it: checkpoints and training state,
the resolved config, the log, plots, converted checkpoints, predictions and evaluation results."""

from __future__ import annotations

import os
import stat

import pytest

from tests.reliability.common import folder_config, folder_dataset, run_cli, write_config


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_every_output_gets_the_umask_mode(mask, umask, tmp_path, capsys):
    root = folder_dataset(tmp_path / "data")
    config = write_config(tmp_path / "cfg.yaml", folder_config(root, train={"max_iters": 2, "eval_interval": 2}))
    out = tmp_path / "out"
    umask(mask)
    run, weights = out / "run", out / "run" / "checkpoints" / "iter_0000002.safetensors"
    commands = [
        ["train", config, "--work-dir", run, "--no-progress"],
        ["eval", config, weights, "--out", out / "eval" / "results.json", "--no-progress"],
        ["predict", weights, root / "images", "--out", out / "pred", "--no-progress"],
        ["convert", weights, "--out", out / "converted.safetensors"],
        ["convert", weights, "--out", out / "pretrained"],  # save_pretrained layout: config.json + model.safetensors
    ]
    for args in commands:
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
    written = sorted(p for p in out.rglob("*") if p.is_file())
    kinds = {p.suffix for p in written} | {p.name for p in written if not p.suffix}
    # checkpoints, training state, config, log, plots, eval JSON/CSV/matrix, predictions, ranking, 'latest' pointer
    assert {".safetensors", ".pt", ".yaml", ".jsonl", ".png", ".json", ".csv", ".npy", "latest"} <= kinds
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes
    folders = {oct(stat.S_IMODE(p.stat().st_mode)) for p in [out, *out.rglob("*")] if p.is_dir()}
    assert folders == {oct(0o777 & ~mask)}
