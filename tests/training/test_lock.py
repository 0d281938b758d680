"""The work-dir lock (a second run or a --resume while the first runs is refused; a killed run's lock is taken
over), the disk-space check before the first step (optimiser state and kept checkpoints counted), and the removal of
a killed run's temp files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from segrank.config import Config, from_dict
from segrank.models.segmentor import Segmentor
from segrank.training import optim, state
from segrank.training.lock import LOCK
from segrank.training.run import checkpoints_on_disk
from tests.conftest import tiny_run_config
from tests.reliability.common import REPO, run_cli, segrank_process, snapshot, subprocess_env, write_config

HOLDER = """
import sys
from pathlib import Path
from segrank.training.lock import hold_work_dir

with hold_work_dir(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def hold_lock(work: Path) -> subprocess.Popen:
    """Another process holding the lock of ``work`` until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], cwd=REPO, env=subprocess_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_run_and_resume_refused_while_another_process_holds_the_work_dir(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_run_config(train={"max_iters": 2}))
    work = tmp_path / "run"
    holder = hold_lock(work)
    try:
        before = snapshot(tmp_path)
        for extra in ([], ["--resume"]):
            code, _, err = run_cli(["train", config, "--work-dir", work, "--no-progress", *extra], capsys)
            assert code == 2
            lines = err.strip().splitlines()
            assert len(lines) == 1 and f"work dir {work} is in use by pid {holder.pid} on host " in lines[0], err
            assert " since " in lines[0]
        assert snapshot(tmp_path) == before  # nothing written, the holder's lock file untouched
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (work / LOCK).exists()  # released: removed
    code, _, err = run_cli(["train", config, "--work-dir", work, "--no-progress"], capsys)
    assert code == 0, err
    assert not (work / LOCK).exists()


def test_lock_of_a_killed_run_is_taken_over_and_its_temp_files_removed(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_run_config(train={"max_iters": 120, "checkpoint_interval": 2}))
    work = tmp_path / "run"
    proc = segrank_process(["train", config, "--work-dir", work, "--no-progress"])
    deadline = time.monotonic() + 300
    while state.latest_checkpoint(work / "checkpoints") is None:  # the run holds the lock and has a checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    assert f"pid {proc.pid} " in (work / LOCK).read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (work / LOCK).exists()  # left behind by the killed run, but nobody holds it

    # The resumed run takes the lock over; a finished run resumed again takes no step, yet removes the temp files a
    # killed write left (only segrank's temp-name pattern: other hidden files stay).
    code, _, err = run_cli(["train", config, "--work-dir", work, "--no-progress", "--resume"], capsys)
    assert code == 0, err
    temp = work / "checkpoints" / ".iter_0000004.a1b2c3d4.tmp.safetensors"
    temp.write_bytes(b"half a file")
    other = work / "checkpoints" / ".notes.tmp"
    other.write_text("not segrank's\n")
    code, _, err = run_cli(["train", config, "--work-dir", work, "--no-progress", "--resume"], capsys)
    assert code == 0, err
    assert not temp.exists() and other.exists()
    assert not (work / LOCK).exists()


def test_first_disk_check_counts_the_optimiser_state_and_the_kept_checkpoints(tmp_path, capsys, monkeypatch):
    """AdamW keeps two tensors per parameter: its checkpoints take ~3x the weights. With room for the kept SGD
    checkpoints but not the AdamW ones, the AdamW run is refused before anything is written."""
    raw = tiny_run_config(train={"max_iters": 4, "checkpoint_interval": 1, "keep_checkpoints": 2, "optimizer": "adamw"})
    cfg = from_dict(Config, raw)
    assert checkpoints_on_disk(cfg.train) == 3  # 2 kept + 1 being written
    model = Segmentor(cfg.model)
    overhead = state.TENSOR_OVERHEAD
    weights = sum(t.numel() * t.element_size() + overhead for t in model.state_dict().values())
    moment = sum(p.numel() * p.element_size() + overhead for p in model.parameters())
    # 3 SGD checkpoints (weights + momentum) fit with the 10 % margin, 3 AdamW ones (weights + 2 moments) do not.
    free = 3 * 1.1 * (weights + 1.5 * moment)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=int(free)))
    state.check_run_disk_space(tmp_path / "sgd", model, optim.state_tensors_per_parameter(
        from_dict(Config, tiny_run_config(train={"keep_checkpoints": 2})).train), 3)
    config, work = write_config(tmp_path / "tiny.yaml", raw), tmp_path / "run"
    before = snapshot(tmp_path)
    code, _, err = run_cli(["train", config, "--work-dir", work, "--no-progress"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "MiB free, a checkpoint needs" in err
    assert "3 on disk at once" in err, err
    assert snapshot(tmp_path) == before and not work.exists()


def test_lock_file_names_pid_host_and_start(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        words = (tmp_path / "run" / LOCK).read_text().split()
        assert words[:2] == ["pid", str(holder.pid)] and words[2] == "host" and words[4] == "since"
        assert os.uname().nodename == words[3]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (tmp_path / "run").exists()  # created by the lock alone: removed with it
