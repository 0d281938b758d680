"""SIGKILL at 5 points of a training run (3 at random moments, 2 halfway through a checkpoint file write), resumed
with --resume each time: the final weights equal an uninterrupted run's bit for bit, and after every kill each
checkpoint file on disk loads."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import segrank.training.loop as engine
from segrank.config import Config, from_dict
from segrank.training import state
from tests.conftest import tiny_run_config
from tests.reliability.common import REPO, subprocess_env, write_config

# The child is the segrank CLI; with KILL_IN_WRITE="<name part>:<n>" it SIGKILLs itself halfway through its n-th
# write of a file whose name contains <name part>: the temp file holds half the bytes, as a kill mid-write leaves it.
DRIVER = """
import os, signal, sys
import segrank.files as files
from segrank.cli import main

if os.environ.get("KILL_IN_WRITE"):
    part, nth = os.environ["KILL_IN_WRITE"].split(":")
    seen, atomic_write = [0], files.atomic_write

    def killing_write(path, write):
        def write_half_and_die(tmp):
            write(tmp)
            if part in path.name:
                seen[0] += 1
                if seen[0] == int(nth):
                    os.truncate(tmp, os.path.getsize(tmp) // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
        atomic_write(path, write_half_and_die)

    files.atomic_write = files.writing.atomic_write = killing_write  # the package's name and its own module's
sys.exit(main(sys.argv[1:]))
"""
MAX_ITERS = 20


def saved_step(ckpt_dir: Path) -> int:
    name = state.latest_checkpoint(ckpt_dir)
    return int(name.split("_")[1]) if name else 0


def assert_every_checkpoint_loads(ckpt_dir: Path) -> None:
    names = [p.name for p in ckpt_dir.iterdir() if not p.name.startswith(".")]  # hidden: a killed write's temp file
    for name in names:
        if name.endswith(".safetensors"):
            load_file(ckpt_dir / name)  # raises on a truncated file
        elif name.endswith(".state.pt"):
            torch.load(ckpt_dir / name, weights_only=True)
    latest = state.latest_checkpoint(ckpt_dir)
    assert f"{latest}.safetensors" in names and f"{latest}.state.pt" in names
    assert torch.load(ckpt_dir / f"{latest}.state.pt", weights_only=True)["step"] == saved_step(ckpt_dir)


def test_sigkill_five_times_then_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_run_config(train={"max_iters": MAX_ITERS})
    config, work = write_config(tmp_path / "tiny.yaml", cfg), tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ckpt_dir = work / "checkpoints"
    rng = random.Random(6)
    # (kind, argument): "time" kills at a random moment after the run saved `argument` more steps; "write" kills
    # halfway through the n-th write of the named file (model weights, then optimizer state).
    kills = [("time", 2), ("write", "safetensors:2"), ("time", 2), ("write", "state.pt:1"), ("time", 2)]
    for i, (kind, arg) in enumerate(kills):
        start = saved_step(ckpt_dir)
        env = subprocess_env() | ({"KILL_IN_WRITE": arg} if kind == "write" else {})
        proc = subprocess.Popen([sys.executable, str(driver), "train", str(config), "--work-dir", str(work),
                                 "--no-progress", *(["--resume"] if i else [])], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kind == "time":
            deadline, seen, changes = time.monotonic() + 120, start, []
            while seen < start + arg and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
                if saved_step(ckpt_dir) != seen:
                    seen, changes = saved_step(ckpt_dir), changes + [time.monotonic()]
            # A step (compute, log, checkpoint write) lasts about the time between the last two checkpoints: the
            # kill lands at a random moment of the next step or so, whatever the machine's speed.
            step_time = changes[-1] - changes[-2] if len(changes) > 1 else 0.1
            time.sleep(rng.uniform(0.0, 1.5 * step_time))
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"kill {i} missed: the run ended with {proc.returncode}\n{err}"
        if kind == "write":
            assert list(ckpt_dir.glob(".*.tmp*")), "the kill should have left a half-written temp file"
        assert saved_step(ckpt_dir) < MAX_ITERS
        assert_every_checkpoint_loads(ckpt_dir)

    resumed = subprocess.run([sys.executable, str(driver), "train", str(config), "--work-dir", str(work),
                              "--no-progress", "--resume"], cwd=REPO, env=subprocess_env(), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(ckpt_dir.glob(".*.tmp*"))  # temp files of killed writes are cleaned up
    logged = [json.loads(line)["step"] for line in (work / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, MAX_ITERS + 1))

    full = engine.train(from_dict(Config, cfg), tmp_path / "full", progress=False)
    expected, got = load_file(full.checkpoint), load_file(ckpt_dir / f"iter_{MAX_ITERS:07d}.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
