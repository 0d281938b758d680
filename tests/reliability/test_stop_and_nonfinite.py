"""Graceful stop by SIGINT (SIGTERM and the in-process second-signal handler are covered in tests/engine): a
checkpoint at the current step, exit 0 and a resume command that works; a second SIGINT exits at once. Non-finite
losses through the CLI: exit 2 with the step and loss terms, the last good checkpoint kept; ``skip`` skips."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from segrank.training import state
from tests.conftest import tiny_run_config
from tests.reliability.common import REPO, run_cli, subprocess_env, write_config

# The segrank CLI, printing "STEP <n>" at the start of each training step and then sleeping STEP_SLEEP seconds, so
# the test knows the training loop runs and can signal in the middle of a step.
DRIVER = """
import os, sys, time
import segrank.training.loop as engine
from segrank.cli import main

set_lr = engine.optim.set_lr
step = iter(range(10**9))

def announce_and_sleep(optimizer, lr):
    print(f"STEP {next(step)}", flush=True)
    time.sleep(float(os.environ["STEP_SLEEP"]))
    set_lr(optimizer, lr)

engine.optim.set_lr = announce_and_sleep
sys.exit(main(sys.argv[1:]))
"""


def start_training(tmp_path: Path, step_sleep: float, **train) -> tuple[subprocess.Popen, Path, Path]:
    config = write_config(tmp_path / "tiny.yaml", tiny_run_config(train={"checkpoint_interval": 1000, **train}))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    work = tmp_path / "run"
    env = subprocess_env() | {"STEP_SLEEP": str(step_sleep), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(driver), "train", str(config), "--work-dir", str(work),
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, config, work


def read_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r}: {lines}\n{proc.stderr.read()}")


def test_sigint_checkpoints_current_step_exits_zero_and_prints_a_working_resume_command(tmp_path, capsys):
    proc, config, work = start_training(tmp_path, step_sleep=0.3, max_iters=12)
    read_until(proc, "STEP 2")  # step 3 (index 2) is running
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = re.search(r"stopped at step (\d+); resume with: (.*)$", out, re.MULTILINE)
    assert "SIGINT received" in out and stopped, out
    step = int(stopped.group(1))
    # The step running when the signal came (index 2, or a later one if this process was slow to send it) finished,
    # then the run stopped.
    later = re.findall(r"^STEP (\d+)$", out.split("SIGINT received")[0], re.MULTILINE)
    assert step == (int(later[-1]) if later else 2) + 1
    ckpt_dir = work / "checkpoints"
    assert state.latest_checkpoint(ckpt_dir) == state.checkpoint_name(step)
    assert torch.load(ckpt_dir / f"{state.checkpoint_name(step)}.state.pt", weights_only=True)["step"] == step
    load_file(ckpt_dir / f"{state.checkpoint_name(step)}.safetensors")

    command = shlex.split(stopped.group(2).replace("<config>", str(config)))
    assert command[:2] == ["segrank", "train"] and "--resume" in command
    code, out, err = run_cli([*command[1:], "--no-progress"], capsys)
    assert code == 0, err
    assert "finished 12 iterations" in out
    logged = [json.loads(line)["step"] for line in (work / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 13))


def test_second_sigint_exits_at_once_without_saving(tmp_path):
    proc, _, work = start_training(tmp_path, step_sleep=30, max_iters=4)
    read_until(proc, "STEP 0")  # the loop runs and sleeps in its first step
    proc.send_signal(signal.SIGINT)
    read_until(proc, "segrank train: SIGINT received")
    proc.send_signal(signal.SIGINT)  # the step still has ~30 s to sleep: only an immediate exit ends it now
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "stopped at step" not in out
    assert not (work / "checkpoints").exists()


def test_nonfinite_loss_stops_with_step_and_terms_keeping_the_last_good_checkpoint(tmp_path, capsys):
    """lr 1e4 makes the weights explode: the loss is finite for 2 steps, NaN at step 3."""
    config = write_config(tmp_path / "tiny.yaml", tiny_run_config(train={"lr": 1e4}))
    code, _, err = run_cli(["train", config, "--work-dir", tmp_path / "run", "--no-progress"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    match = re.fullmatch(r"segrank train: error: step (\d+): non-finite loss \((.*)\); last good checkpoint: (.*)",
                         lines[0])
    assert match, lines[0]
    step, terms, last = int(match.group(1)), match.group(2), Path(match.group(3))
    assert {"loss=nan", "loss_seg=nan", "loss_img=nan"} <= set(terms.split(", "))
    assert last.name == state.checkpoint_name(step - 1)
    assert state.latest_checkpoint(last.parent) == last.name
    weights = load_file(f"{last}.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not list(last.parent.glob(f"{state.checkpoint_name(step)}*"))  # nothing saved from the bad step


def test_nonfinite_skip_option_skips_the_steps(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml",
                          tiny_run_config(train={"lr": 1e4, "nonfinite": "skip", "max_iters": 6,
                                                 "keep_checkpoints": 6}))
    code, out, err = run_cli(["train", config, "--work-dir", tmp_path / "run", "--no-progress"], capsys)
    assert code == 0, err
    skipped = [int(s) for s in re.findall(r"step (\d+): non-finite loss \(.*\), step skipped", out)]
    assert skipped and skipped == list(range(skipped[0], 7))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    before = load_file(ckpt_dir / f"{state.checkpoint_name(skipped[0] - 1)}.safetensors")
    final = load_file(ckpt_dir / f"{state.checkpoint_name(6)}.safetensors")
    assert all(torch.equal(before[k], final[k]) for k in before)  # skipped steps change nothing
