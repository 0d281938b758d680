"""``datasets prepare --workers N`` writes the tree one process writes, byte for byte; a prepare SIGKILLed mid-run
leaves only complete files under their final names, and running it again gives the uninterrupted tree."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segrank import files
from segrank.cli import main
from segrank.data.convert import prepare
from tests.data.conftest import REPO
from tests.data.miniature import SOURCES

pytest.importorskip("scipy.io", reason="the .mat converters need the optional scipy extra")


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, images", [("coco_stuff10k", 9), ("pascal_context60", 10), ("ade20k_full", 12),
                                          ("coco_lvis", 12)])
def test_two_workers_write_the_one_worker_tree_byte_for_byte(name, images, tmp_path):
    src = SOURCES[name](tmp_path / "src", images, (24, 32))
    serial = prepare(name, src, tmp_path / "serial", workers=1, progress=False)
    parallel = prepare(name, src, tmp_path / "parallel", workers=2, progress=False)
    assert serial.images == parallel.images == serial.converted == parallel.converted
    assert tree(tmp_path / "serial") == tree(tmp_path / "parallel")
    assert len(tree(tmp_path / "serial")) >= images  # a label per image, and the images


def test_error_in_a_worker_is_one_line_and_exit_2(tmp_path, capsys):
    src = SOURCES["ade20k_full"](tmp_path, 6, (8, 8))
    missing = next(src.parent.rglob("ADE_val_00000002.jpg"))
    missing.unlink()
    assert main(["datasets", "prepare", "ade20k_full", str(src), str(tmp_path / "out"), "--workers", "2",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ADE_val_00000002.jpg: image listed in index_ade20k.pkl not found" in err


def test_a_rerun_deletes_only_the_temp_files_of_killed_writes(tmp_path):
    src = SOURCES["ade20k_full"](tmp_path / "src", 2, (8, 8))
    dst = tmp_path / "dst"
    stale = dst / "train" / "label" / ".ADE_train_00000001.k2j4_x9q.tmp.tif"  # as files.atomic_write names them
    kept = [dst / "train" / ".notes.txt", dst / "train" / "backup.tmp.tif"]
    for path in [stale, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert prepare("ade20k_full", src, dst, progress=False).converted == 2
    assert not stale.exists() and all(p.exists() for p in kept)


def labels(root: Path) -> int:
    """Label files under their final names (temp files start with a dot)."""
    return sum(1 for p in root.rglob("*.tif") if not p.name.startswith("."))


# Runs the CLI with every atomic write held open for a while between its complete temp file and the rename: a kill
# then most likely lands while temp files exist, as it would in the middle of writing large files.
SLOW_WRITES = """
import sys, time
import segrank.files as files
from segrank.cli import main

atomic_write = files.atomic_write

def slow_atomic_write(path, write):
    def write_and_wait(tmp):
        write(tmp)
        time.sleep(0.5)
    atomic_write(path, write_and_wait)

files.atomic_write = files.writing.atomic_write = slow_atomic_write  # the package's name and its own module's
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_prepare_run_again_gives_the_uninterrupted_tree(tmp_path):
    src = SOURCES["ade20k_full"](tmp_path / "src", 40, (24, 32))
    reference, dst = tmp_path / "reference", tmp_path / "dst"
    prepare("ade20k_full", src, reference, workers=1, progress=False)
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_WRITES)
    proc = subprocess.Popen([sys.executable, str(driver), "datasets", "prepare", "ade20k_full", str(src), str(dst),
                             "--workers", "2", "--no-progress"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while labels(dst) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"prepare ended before the kill: {proc.stderr.read()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its worker processes
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()

    done, expected = tree(dst), tree(reference)
    temps = [path for path in done if files.TEMP_FILE.fullmatch(Path(path).name)]
    finished = {path: digest for path, digest in done.items() if path not in temps}
    assert temps, "the kill should have caught writes between their temp file and the rename"
    assert 0 < len(finished) < len(expected)
    for path, digest in finished.items():  # nothing under a final name is partial
        assert expected[path] == digest, path

    rerun = subprocess.run([sys.executable, "-m", "segrank.cli", "datasets", "prepare", "ade20k_full", str(src),
                            str(dst), "--workers", "2", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    converted = int(re.search(r"\((\d+) converted", rerun.stdout).group(1))
    assert converted == 40 - sum(path.endswith(".tif") for path in finished)  # finished images are skipped
    assert tree(dst) == expected  # temp files gone, every output there, byte for byte
