"""What commands write where, beyond the bad-input matrix (bad_destinations.py): a killed or failing convert leaves
its --out folder whole, predict keeps the images done before a full disk, input folders skip hidden and temp files,
and the temp files of killed writes are removed by the next write there, never those of a live writer."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segrank import build_model, files, load_model, save_model, save_pretrained
from segrank.config import ModelConfig, from_dict
from segrank.inference.images import collect_inputs
from segrank.inference.prediction import output_files
from tests.conftest import tiny_run_config
from tests.reliability.bad_input import eval_setup
from tests.reliability.common import REPO, run_cli, snapshot, subprocess_env

# The segrank CLI, SIGKILLed halfway through its first write of a file named KILL_IN_WRITE (as test_kill_resume.py).
DRIVER = """
import os, signal, sys
import segrank.files as files
from segrank.cli import main

atomic_write = files.atomic_write

def killing_write(path, write):
    def write_half_and_die(tmp):
        write(tmp)
        if path.name == os.environ["KILL_IN_WRITE"]:
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(path, write_half_and_die)

files.atomic_write = files.writing.atomic_write = killing_write  # the package's name and its own module's
sys.exit(main(sys.argv[1:]))
"""


def model_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_model(build_model(from_dict(ModelConfig, tiny_run_config()["model"])), path)


def age(path: Path, seconds: float = 2 * files.STALE_AFTER_S) -> Path:
    """Make ``path`` and everything under it look untouched for ``seconds``."""
    past = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (past, past), follow_symlinks=False)
    return path


@pytest.mark.parametrize("killed_in", ["config.json", "model.safetensors"])
def test_killed_convert_leaves_the_folder_whole_and_the_next_run_cleans_up(killed_in, tmp_path, capsys):
    old, new = model_file(tmp_path / "old.safetensors", 0), model_file(tmp_path / "new.safetensors", 1)
    hf = save_pretrained(load_model(old), tmp_path / "hf")
    before = snapshot(hf)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    child = subprocess.run([sys.executable, str(driver), "convert", str(new), "--out", str(hf), "--force"], cwd=REPO,
                           env={**subprocess_env(), "KILL_IN_WRITE": killed_in}, capture_output=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    assert snapshot(hf) == before  # the old checkpoint folder, file for file: no new weights beside an old config
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
    assert len(left) == 1 and files.TEMP_FILE.fullmatch(left[0].name)  # the staging folder, holding the half file
    code, out, err = run_cli(["convert", new, "--out", hf, "--force"], capsys)
    assert code == 0, err
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")] == left  # a minute old at most: kept
    age(left[0])
    code, out, err = run_cli(["convert", new, "--out", hf, "--force"], capsys)
    assert code == 0 and f"removed 1 temp files that killed runs left in {tmp_path}" in out, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    reloaded, expected = load_model(hf).state_dict(), load_model(new).state_dict()
    assert all(torch.equal(reloaded[k], expected[k]) for k in expected)


def test_failed_rename_puts_back_the_folder_set_aside(tmp_path, monkeypatch):
    """The complete new folder cannot be renamed into place after the old one was set aside: the old one goes back,
    and no temp folder is left."""
    hf = save_pretrained(load_model(model_file(tmp_path / "old.safetensors", 0)), tmp_path / "hf")
    before, real, onto_hf = snapshot(hf), os.replace, []

    def replace(src, dst):
        if Path(dst) == hf:
            onto_hf.append(Path(src))
            if len(onto_hf) == 1:  # the new folder; the second is the old one, put back
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        files.staged_write(hf, lambda tmp: save_pretrained(load_model(tmp_path / "old.safetensors"), tmp), folder=True)
    assert len(onto_hf) == 2 and snapshot(hf) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_predict_keeps_the_images_done_before_the_disk_fills_up(tmp_path, capsys, monkeypatch):
    _, ckpt, root = eval_setup(tmp_path)
    real = files.atomic_write

    def full_from_the_second_image(path, write):
        if path.name.startswith("img1"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, write)

    monkeypatch.setattr(files, "atomic_write", full_from_the_second_image)

    monkeypatch.setattr(files.writing, "atomic_write", full_from_the_second_image)  # behind write_json and write_text
    out = tmp_path / "pred"
    code, _, err = run_cli(["predict", ckpt, root / "images", "--out", out, "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.strip() == (f"segrank predict: error: {out / 'img1.png'}: cannot write (No space left on device); "
                           f"1 of 2 images done, their files are in {out}")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in output_files(out, "img0", ranking=True))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG])
def test_write_errors_name_the_file(code, tmp_path):
    with pytest.raises(files.WriteError) as caught, files.naming_write_errors(tmp_path / "a.png"):
        raise OSError(code, os.strerror(code))
    assert str(caught.value) == f"{tmp_path / 'a.png'}: cannot write ({os.strerror(code)})"
    with pytest.raises(OSError) as other, files.naming_write_errors(tmp_path / "a.png"):  # a bug stays a traceback
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    assert not isinstance(other.value, files.WriteError)


@pytest.mark.parametrize("head", ["rankseg", "segmenter"])
def test_predict_writes_exactly_the_names_it_checked(head, tmp_path, capsys):
    """The names checked before writing are those Prediction.save writes (output_files, one list for both)."""
    cfg = tiny_run_config()
    cfg["model"]["head"]["type"] = head
    torch.manual_seed(0)
    ckpt = save_model(build_model(from_dict(ModelConfig, cfg["model"])), tmp_path / "m.safetensors")
    _, _, root = eval_setup(tmp_path / "setup")
    out, args = tmp_path / "pred", ["predict", ckpt, root / "images", "--out", tmp_path / "pred", "--no-progress"]
    code, printed, err = run_cli(args, capsys)
    assert code == 0, err
    expected = {p.name for stem in ("img0", "img1") for p in output_files(out, stem, ranking=head == "rankseg")}
    assert {p.name for p in out.iterdir()} == expected and f"{len(expected)} files written" in printed
    assert run_cli(args, capsys)[0] == 2  # every one of them exists now
    assert run_cli([*args, "--force"], capsys)[0] == 0


def test_input_folders_skip_hidden_and_temp_files(tmp_path, capsys):
    _, ckpt, root = eval_setup(tmp_path)
    images = root / "images"
    (images / "._img0.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (images / ".img1.k2j4_x9q.tmp.jpg").write_bytes(b"half a jpeg, left by a killed write")
    (images / ".hidden.jpg").write_bytes((images / "img0.jpg").read_bytes())
    both = [images / "img0.jpg", images / "img1.jpg"]
    assert collect_inputs([images]) == both
    assert collect_inputs([f"{images}/*.jpg"]) == both
    assert collect_inputs([f"{images}/.*.jpg"]) == [images / "._img0.jpg", images / ".hidden.jpg"]  # asked for
    assert collect_inputs([images / ".hidden.jpg"]) == [images / ".hidden.jpg"]  # named: read
    code, _, err = run_cli(["predict", ckpt, images, "--out", tmp_path / "pred", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == [
        "img0.png", "img0_color.png", "img0_overlay.png", "img1.png", "img1_color.png", "img1_overlay.png"]


def test_predict_removes_only_the_temp_files_of_killed_runs(tmp_path, capsys):
    _, ckpt, root = eval_setup(tmp_path)
    out = tmp_path / "pred"
    out.mkdir()
    stale = out / ".img0.abcd_123.tmp.png"
    stale.write_bytes(b"a killed write")
    age(stale)
    kept = [out / ".img1.efgh_456.tmp.png", out / ".notes.txt", out / "backup.tmp.png"]  # recent; not segrank's
    for path in kept:
        path.write_bytes(b"keep")
    age(kept[1]), age(kept[2])
    code, printed, err = run_cli(["predict", ckpt, root / "images", "--out", out, "--no-progress"], capsys)
    assert code == 0 and f"removed 1 temp files that killed runs left in {out}" in printed, err
    assert not stale.exists() and all(p.exists() for p in kept)


def test_stale_temps_are_those_no_live_writer_holds(tmp_path):
    stale_file = tmp_path / ".a.abcdefgh.tmp.png"
    stale_folder = tmp_path / ".hf.abcdefgh.tmp"
    (stale_folder / "model.safetensors").parent.mkdir()
    (stale_folder / "model.safetensors").write_bytes(b"weights")
    live_folder = tmp_path / ".hf2.abcdefgh.tmp"
    live_folder.mkdir()
    fresh, held = tmp_path / ".b.abcdefgh.tmp.png", tmp_path / ".c.abcdefgh.tmp.safetensors"
    for path in (stale_file, fresh, held, live_folder / "model.safetensors"):
        path.write_bytes(b"data")
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"not a temp file")
    (tmp_path / ".d.abcdefgh.tmp.png").symlink_to(target)
    for path in (stale_file, stale_folder, held, live_folder, tmp_path / ".d.abcdefgh.tmp.png"):
        age(path)
    os.utime(live_folder / "model.safetensors")  # a writer still writes in that folder
    with open(held, "r+b") as writer:  # a live writer: slow, paused, or on another host of an NFS share
        fcntl.flock(writer, fcntl.LOCK_EX)
        assert files.remove_stale_temps(tmp_path) == 2
    assert not stale_file.exists() and not stale_folder.exists()
    assert fresh.exists() and held.exists() and live_folder.exists() and target.read_bytes() == b"not a temp file"
    assert files.remove_stale_temps(tmp_path) == 1 and not held.exists()  # its writer is gone


def test_atomic_write_holds_the_lock_of_its_temp_file(tmp_path):
    seen = []
    files.atomic_write(tmp_path / "a.txt", lambda tmp: (tmp.write_text("x"), seen.append(files.is_locked(tmp))))
    assert seen == [True] and not files.is_locked(tmp_path / "a.txt")
