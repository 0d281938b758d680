"""torchrun faults on one machine (gloo, CPU, loopback addresses only): two nodes of one process each train to the
weights of the 1-process run, and a worker SIGKILLed under ``--max-restarts 1`` is restarted with its group, which
resumes from the last checkpoint by itself and ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import segrank.training.loop as engine
from segrank.config import Config, from_dict
from segrank.errors import SegrankError
from segrank.models import build_model
from segrank.runtime import distributed as runtime
from segrank.training import state
from tests.conftest import tiny_run_config
from tests.reliability.common import REPO, subprocess_env, write_config

# Each worker records its pid under the attempt (torchrun restart count) and rank it runs as, then runs the CLI.
DRIVER = """
import os, sys
from pathlib import Path
from segrank.cli import main

name = f"attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}-rank{os.environ['RANK']}"
Path(sys.argv[1], name).write_text(str(os.getpid()))
sys.exit(main(sys.argv[2:]))
"""
TIMEOUT = 150  # seconds for one torchrun launch on a busy 2-core machine (a launch takes ~10-30 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Starts ``torchrun`` processes on the test's driver and, at the end of the test, SIGKILLs whatever is still
    running: the torchrun agents (their process groups) and the workers they started (their pid files name them;
    torchrun gives each worker its own session, so killing the agent's group does not reach them)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.driver = tmp_path / "driver.py"
        self.driver.write_text(DRIVER)
        self.agents: list[subprocess.Popen] = []
        self.pid_dirs: list[Path] = []

    def start(self, name: str, torchrun_args: list[str], cli_args: list[str]) -> tuple[subprocess.Popen, Path]:
        """One torchrun agent; returns it and the folder where its workers write their pids."""
        pids = self.tmp_path / f"pids-{name}"
        pids.mkdir(exist_ok=True)
        self.pid_dirs.append(pids)
        env = subprocess_env() | {"GLOO_SOCKET_IFNAME": "lo"}  # gloo talks over the loopback interface only
        with open(self.tmp_path / f"{name}.out", "w") as out, open(self.tmp_path / f"{name}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(self.driver),
                                     str(pids), *map(str, cli_args)], cwd=REPO, env=env, stdout=out, stderr=err,
                                    start_new_session=True)
        self.agents.append(proc)
        return proc, pids

    def finish(self, proc: subprocess.Popen, name: str) -> str:
        """Wait for ``proc``; returns its stdout, fails the test with its stderr's tail when it did not exit 0."""
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: torchrun still running after {TIMEOUT} s\n"
                        f"{(self.tmp_path / f'{name}.err').read_text()[-3000:]}")
        err = (self.tmp_path / f"{name}.err").read_text()
        assert proc.returncode == 0, f"{name}: torchrun exited with {proc.returncode}\n{err[-3000:]}"
        return (self.tmp_path / f"{name}.out").read_text()

    def kill_all(self) -> None:
        for proc in self.agents:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for pids in self.pid_dirs:
            for path in pids.iterdir():
                pid = int(path.read_text())
                try:  # only a process that still runs this test's driver (the pid may have been reused)
                    alive = str(self.driver) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if alive:
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launcher(tmp_path):
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.kill_all()


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_nodes_of_one_process_equal_the_one_process_run(tmp_path, launcher):
    """Two torchrun agents (``--nnodes 2``, c10d rendezvous on 127.0.0.1) of one process each: every global batch
    of 4 is split between the nodes; the weights after 6 steps equal a single process's up to the float rounding of
    the gradient all-reduce. Dropout and drop path are off: their random numbers are drawn per rank."""
    cfg = tiny_run_config(train={"max_iters": 6, "batch_size": 4, "checkpoint_interval": 6})
    cfg["model"]["backbone"]["drop_path_rate"], cfg["model"]["head"]["dropout"] = 0.0, 0.0
    config, work = write_config(tmp_path / "tiny.yaml", cfg), tmp_path / "two_nodes"
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", f"segrank-test-{os.getpid()}",
                  "--rdzv-conf", "join_timeout=60", "--local-addr", "127.0.0.1"]
    nodes = [launcher.start(f"node{i}", rendezvous, ["train", config, "--work-dir", work, "--no-progress"])
             for i in range(2)]
    for i, (proc, _) in enumerate(nodes):
        launcher.finish(proc, f"node{i}")
    ranks = sorted(p.name for _, pids in nodes for p in pids.iterdir())
    assert ranks == ["attempt0-rank0", "attempt0-rank1"]  # one process per node, one group of two

    single = engine.train(from_dict(Config, cfg), tmp_path / "single", progress=False)
    reference = load_file(single.checkpoint)
    two_nodes = load_file(work / "checkpoints" / "iter_0000006.safetensors")
    torch.manual_seed(cfg["train"].get("seed", 0))
    initial = build_model(from_dict(Config, cfg).model).state_dict()
    assert max_delta(reference, {k: initial[k] for k in reference}) > 1e-3  # the runs did train
    delta = max_delta(two_nodes, reference)
    print(f"two nodes x 1 process vs 1 process: max |dw| = {delta:.3g}")
    assert delta <= 1e-6


def test_killed_worker_restarts_the_group_which_resumes_to_the_uninterrupted_weights(tmp_path, launcher):
    """``torchrun --standalone --nproc-per-node 2 --max-restarts 1``: once a checkpoint exists, rank 0 (the process
    that writes the work dir) is SIGKILLed; torchrun stops rank 1 and starts both again, and the new attempt resumes
    the run from its latest checkpoint without --resume. The final weights equal an uninterrupted run's exactly."""
    max_iters, kill_after = 40, 8
    cfg = tiny_run_config(train={"max_iters": max_iters, "batch_size": 4, "checkpoint_interval": 4})
    config = write_config(tmp_path / "tiny.yaml", cfg)
    elastic = ["--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1",
               "--monitor-interval", "0.1"]

    # Both runs at once: on a shared machine that takes about the time of one.
    full, _ = launcher.start("uninterrupted", elastic, ["train", config, "--work-dir", tmp_path / "full",
                                                        "--no-progress"])
    work = tmp_path / "run"
    proc, pids = launcher.start("killed", elastic, ["train", config, "--work-dir", work, "--no-progress"])
    ckpt_dir, deadline, saved = work / "checkpoints", time.monotonic() + TIMEOUT, 0
    while saved < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        name = state.latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
        saved = int(name.split("_")[1]) if name else 0
    assert kill_after <= saved < max_iters, f"no checkpoint to kill after (saved {saved}, torchrun {proc.poll()})"
    os.kill(int((pids / "attempt0-rank0").read_text()), signal.SIGKILL)
    out = launcher.finish(proc, "killed")
    launcher.finish(full, "uninterrupted")

    assert sorted(p.name for p in pids.iterdir()) == ["attempt0-rank0", "attempt0-rank1", "attempt1-rank0",
                                                      "attempt1-rank1"]
    resumed = re.search(r"started again \(restart 1 of this node\): continuing \S+ from step (\d+)", out)
    assert resumed, out[-2000:]
    assert saved <= int(resumed.group(1)) < max_iters  # from the checkpoint seen before the kill, or a later one
    logged = [json.loads(line)["step"] for line in (work / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, max_iters + 1))  # records of the killed attempt after its checkpoint are dropped
    final = f"iter_{max_iters:07d}.safetensors"
    delta = max_delta(load_file(ckpt_dir / final), load_file(tmp_path / "full" / "checkpoints" / final))
    print(f"killed at step >= {saved}, resumed from step {resumed.group(1)}: max |dw| = {delta:.3g}")
    assert delta == 0.0


@pytest.mark.parametrize("job", ["slurm-1234", "none"])
def test_only_a_later_start_of_the_same_torchrun_job_continues_a_run(job, tmp_path, monkeypatch, capsys):
    """The torchrun job that created a work dir continues it when started again (a restart; with its own
    --rdzv-id also a requeue, restart count 0); another job's start is refused as before. torchrun's default id
    "none" is shared by all jobs that set none: there only a restart continues."""
    cfg = from_dict(Config, tiny_run_config(train={"max_iters": 2}))
    work = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert engine.train(cfg, work, progress=False).step == 2
    assert (work / state.LAUNCH).read_text() == f"{job}\n"
    for other, restart in (("another-job", "0"), ("another-job", "1")):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", other)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        with pytest.raises(SegrankError, match="work directory exists"):
            engine.train(cfg, work, progress=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    if job == "none":
        with pytest.raises(SegrankError, match="work directory exists"):
            engine.train(cfg, work, progress=False)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    capsys.readouterr()
    assert engine.train(cfg, work, progress=False).step == 2  # continued (here: already finished)
    assert f"torchrun job {job} started again" in capsys.readouterr().out


def test_under_torchrun_a_repeated_signal_does_not_abandon_the_checkpoint(monkeypatch):
    """SLURM signals every process of a job and torchrun passes the signal on: a worker gets SIGTERM twice within
    moments, and must still save its checkpoint (outside torchrun a second signal exits at once)."""
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "slurm-1234")
    with runtime.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and exits == []
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with runtime.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]
