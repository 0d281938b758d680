"""Everything a training run writes to its work dir: the resolved config, ``log.jsonl`` (mirrored to the experiment
trackers of trackers.py), evaluation results, the training-state checkpoints that ``--resume`` needs to continue
exactly, the lock of the run that writes it (lock.py), and under torchrun the id of the job that created the run
(``torchrun_job``: that job's restarts continue the run).

A checkpoint of step ``s`` (the number of finished iterations) is two files in ``<work_dir>/checkpoints/``:
``iter_<s>.safetensors`` (the model, segrank's native format: usable by eval/predict/convert as is) and
``iter_<s>.state.pt`` (optimizer and grad-scaler state, the step, the seed), a dict of tensors and plain Python values
that ``torch.load(weights_only=True)`` reads without running code. Every file is written to a temp file and renamed;
the ``latest`` pointer is renamed into place only after both files are complete, so a kill at any moment leaves the
previous checkpoint usable. Random numbers need no saved state: the training loop reseeds from (seed, step, rank).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from segrank import files
from segrank.checkpoints import save_model
from segrank.checkpoints.detect import LATEST, read_latest
from segrank.config import Config, from_dict, to_dict
from segrank.errors import SegrankError
from segrank.models.segmentor import Segmentor
from segrank.training.lock import LOCK

LAUNCH = "torchrun_job"  # the torchrun job that created the run: its restarted attempts resume the run
_NAME = re.compile(r"iter_(\d+)\.(safetensors|state\.pt)")


class ResumeError(SegrankError):
    """A work directory whose checkpoint cannot be resumed."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def weights_path(folder: Path, step: int) -> Path:
    """The model weights of checkpoint ``step`` in ``folder``."""
    return folder / f"{checkpoint_name(step)}.safetensors"


def check_disk_space(folder: Path, model: Segmentor, optimizer: torch.optim.Optimizer) -> None:
    """Refuse to start a checkpoint that cannot fit: weights + optimizer state, with a 10 % margin."""
    need = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    need += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    require_free(folder, need, need)


def check_run_disk_space(folder: Path, model: Segmentor, state_tensors: int, checkpoints: int) -> None:
    """Refuse a run whose checkpoints cannot fit, before its first step (the optimiser holds no state yet, so it is
    estimated): ``checkpoints`` of the weights and ``state_tensors`` optimiser tensors per parameter, plus
    ~``TENSOR_OVERHEAD`` bytes of metadata per tensor; the space the checkpoints already in ``folder`` take counts as
    free (the run replaces them). ``folder`` may not exist yet: its nearest existing parent holds it."""
    weights = list(model.state_dict().values())
    params = [p for p in model.parameters() if p.requires_grad]
    one = sum(t.numel() * t.element_size() + TENSOR_OVERHEAD for t in weights)
    one += state_tensors * sum(p.numel() * p.element_size() + TENSOR_OVERHEAD for p in params)
    existing = sum(p.stat().st_size for p in folder.glob("iter_*")) if folder.is_dir() else 0
    need = max(one, checkpoints * one - existing)
    require_free(folder, need, one,
                 f" (with the optimiser state; {checkpoints} on disk at once: {need / 2**20:.1f} MiB)")


TENSOR_OVERHEAD = 512  # bytes of header/pickle per tensor in a checkpoint (a safetensors entry, a state-dict key)


def require_free(folder: Path, need: int, checkpoint: int, detail: str = "") -> None:
    """Refuse when ``folder`` (or its nearest existing parent) has less than ``need`` bytes free, with a 10 % margin;
    the message names the size of one ``checkpoint``."""
    folder = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if free < 1.1 * need:
        raise SegrankError(f"{folder}: {free / 2**20:.1f} MiB free, a checkpoint needs {checkpoint / 2**20:.1f} MiB"
                           f"{detail}")


def save_training_state(
    folder: Path, step: int, model: Segmentor, optimizer: torch.optim.Optimizer, scaler_state: dict[str, Any],
    seed: int, keep: int,
) -> Path:
    """Write checkpoint ``step``, point ``latest`` at it, then delete all but the newest ``keep``; returns the
    weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    check_disk_space(folder, model, optimizer)
    name = checkpoint_name(step)
    weights = save_model(model, weights_path(folder, step))
    state = {"step": step, "seed": seed, "optimizer": optimizer.state_dict(), "scaler": scaler_state}
    files.atomic_write(folder / f"{name}.state.pt", lambda tmp: torch.save(state, tmp))
    files.atomic_write(folder / LATEST, lambda tmp: tmp.write_text(name + "\n"))
    prune(folder, keep)
    return weights


def prune(folder: Path, keep: int) -> None:
    """Delete checkpoints older than the newest ``keep`` (never the one ``latest`` names) and stale temp files."""
    files.remove_temps(folder)  # left by a write that was killed
    steps = sorted({int(m.group(1)) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))})
    latest = latest_checkpoint(folder)
    for step in steps[:-keep] if keep > 0 else []:
        if checkpoint_name(step) == latest:
            continue
        for suffix in (".state.pt", ".safetensors"):
            (folder / f"{checkpoint_name(step)}{suffix}").unlink(missing_ok=True)


def latest_checkpoint(folder: Path) -> str | None:
    """The name (``iter_<step>``) the ``latest`` pointer holds, or None when there is no checkpoint yet."""
    return read_latest(folder)


def load_training_state(
    folder: Path, model: Segmentor, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load the ``latest`` checkpoint into ``model`` and ``optimizer``; returns the state dict (``step``, ``seed``,
    ``scaler``)."""
    name = latest_checkpoint(folder)
    if name is None:
        raise ResumeError(f"{folder}: no checkpoint to resume from (no '{LATEST}' file)")
    weights, state_path = folder / f"{name}.safetensors", folder / f"{name}.state.pt"
    try:
        sd = load_file(str(weights))
    except (OSError, SafetensorError, ValueError) as err:
        raise ResumeError(f"{weights}: checkpoint unreadable ({str(err).splitlines()[0][:200]})") from None
    state = files.read_torch(state_path)  # weights_only: refuses, with a clear message, a file that would run code
    if not isinstance(state, dict) or not {"step", "seed", "optimizer", "scaler"} <= state.keys():
        raise ResumeError(f"{state_path}: not a segrank training state")
    files.load_state_dict_strict(model, sd, str(weights))
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise ResumeError(f"{state_path}: optimizer state does not fit this model ({err})") from None
    return state


# --------------------------------------------------------------------------------------------------------------
# Work directory and logs


def prepare_work_dir(work_dir: Path, cfg: Config, resume: bool, launch: str | None = None) -> None:
    """Create the run folder with its resolved config (and ``launch``, the torchrun job id, when given); on resume,
    check the config is the stored one."""
    resolved = to_dict(cfg)
    config_path = work_dir / "config.yaml"
    if resume:
        if not config_path.is_file():
            raise ResumeError(f"{work_dir}: nothing to resume (no config.yaml)")
        stored = from_dict(Config, files.read_yaml(config_path, ResumeError))
        if to_dict(stored) != resolved:
            key = first_difference(to_dict(stored), resolved)
            raise ResumeError(f"{config_path}: differs from the given config at {key}; resume with the same "
                                    "config and --set options")
        return
    if work_dir.exists() and (not work_dir.is_dir() or any(p.name != LOCK for p in work_dir.iterdir())):
        raise SegrankError(f"{work_dir}: work directory exists and is not empty (pass --resume to continue it, or "
                           "choose another --work-dir)")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(config_path, files.dump_yaml(resolved))
        if launch is not None:
            files.write_text(work_dir / LAUNCH, launch + "\n")
    except OSError as err:
        raise SegrankError(f"{work_dir}: cannot write the work directory ({err.strerror})") from None


def launched_by(work_dir: Path) -> str | None:
    """The torchrun job id that created ``work_dir`` (None: not created under torchrun, or no run there)."""
    path = work_dir / LAUNCH
    return path.read_text().strip() if path.is_file() and (work_dir / "config.yaml").is_file() else None


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """The dotted key where two nested dicts first differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return f"{path} ({a!r} -> {b!r})"


def append_log(path: Path, record: dict[str, Any]) -> None:
    """Append a record to log.jsonl (the loop hands it to the run's trackers too)."""
    files.append_line(path, json.dumps(record))


def truncate_log(path: Path, step: int) -> None:
    """Drop records a killed run wrote after the checkpoint it resumes from."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        files.write_text(path, "".join(line + "\n" for line in kept))


def write_eval_results(work_dir: Path, step: int, results: dict[str, Any]) -> Path:
    """``eval/iter_<step>.json`` (standard JSON: the NaN IoU of an absent class becomes null) and a log record;
    returns the JSON file."""
    path = work_dir / "eval" / f"{checkpoint_name(step)}.json"
    files.write_json(path, results | {"step": step})
    summary = {k: results[k] for k in ("mIoU", "aAcc", "mAcc", "image_recall", "pixel_recall") if k in results}
    append_log(work_dir / "log.jsonl", {"type": "eval", "step": step} | summary)
    return path
