"""Experiment trackers (``train.loggers``): TensorBoard, MLflow and Weights & Biases receive what the work dir
holds: the numbers of every log.jsonl record, the resolved config, and the evaluation results. Only rank 0 tracks.

Each tracker is optional: a listed tracker whose package is missing is refused before the run starts, naming the
extra to install. A tracker that fails during the run is disabled with one warning line and training goes on:
log.jsonl and the checkpoints never depend on a tracker. Where each one writes follows its own conventions:
TensorBoard ``<work_dir>/tensorboard``, MLflow its tracking URI (``MLFLOW_TRACKING_URI``, experiment
``MLFLOW_EXPERIMENT_NAME`` or "segrank"), W&B ``WANDB_DIR`` or the work dir (project ``WANDB_PROJECT`` or "segrank",
``WANDB_MODE=offline`` for no network). Each start of a run (a resume too) is a new tracker run named after the work
dir."""

from __future__ import annotations

import abc
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from segrank.errors import SegrankError

DEFAULT = ("tensorboard",)  # train.loggers null: TensorBoard when its package is installed, nothing otherwise


class Tracker(abc.ABC):
    """One experiment tracker: ``start`` opens its run with the resolved config (a dict, and the file holding it),
    ``log`` takes a log.jsonl record's numbers at its step, ``log_eval`` the evaluation results file of a step."""

    package: ClassVar[str]  # the module that must be importable
    extra: ClassVar[str]  # pip install 'segrank[<extra>]' installs it

    @abc.abstractmethod
    def __init__(self, work_dir: Path, config: dict[str, Any], config_file: Path) -> None: ...

    @abc.abstractmethod
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_eval(self, step: int, scalars: dict[str, float], results_file: Path) -> None:
        self.log(step, scalars)

    @abc.abstractmethod
    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    package, extra = "tensorboard", "tensorboard"

    def __init__(self, work_dir: Path, config: dict[str, Any], config_file: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # here: importing it needs the optional tensorboard package

        self.writer = SummaryWriter(str(work_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + config_file.read_text() + "```")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    package, extra = "mlflow", "mlflow"

    def __init__(self, work_dir: Path, config: dict[str, Any], config_file: Path) -> None:
        import mlflow  # here: the optional mlflow package

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "segrank"))
        self.run = mlflow.start_run(run_name=work_dir.resolve().name)
        # MLflow refuses a parameter value over 6000 characters (a long class list): keep the start of it.
        mlflow.log_params({key: str(value)[:500] for key, value in flatten(config).items()})
        mlflow.log_artifact(str(config_file))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        # MLflow metric names: letters, digits, _ - . / and spaces only.
        self.mlflow.log_metrics({re.sub(r"[^\w\-./ ]", "_", key): v for key, v in scalars.items()}, step=step)

    def log_eval(self, step: int, scalars: dict[str, float], results_file: Path) -> None:
        self.log(step, scalars)
        self.mlflow.log_artifact(str(results_file), artifact_path="eval")

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker(Tracker):
    package, extra = "wandb", "wandb"

    def __init__(self, work_dir: Path, config: dict[str, Any], config_file: Path) -> None:
        import wandb  # here: the optional wandb package

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "segrank"), name=work_dir.resolve().name,
                              config=config, dir=os.environ.get("WANDB_DIR", str(work_dir)), reinit="create_new")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker,
                                      "wandb": WandbTracker}


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name].package) is not None


def check_installed(names: list[str] | None) -> None:
    """Refuse a listed tracker whose package is missing, naming the extra that installs it."""
    for name in names or []:
        if not installed(name):
            raise SegrankError(f"train.loggers: {name!r} needs the {TRACKERS[name].package} package: "
                               f"pip install 'segrank[{TRACKERS[name].extra}]'")


def start_trackers(names: list[str] | None, work_dir: Path, config: dict[str, Any], config_file: Path) -> Trackers:
    """Start the trackers ``names`` (None: TensorBoard when installed); one that fails to start is left out."""
    trackers = Trackers()
    for name in [n for n in DEFAULT if installed(n)] if names is None else names:
        try:
            trackers.active[name] = TRACKERS[name](work_dir, config, config_file)
        except Exception as err:  # noqa: BLE001  (any failure of a tracker only disables it)
            warn(name, err)
    return trackers


class Trackers:
    """The run's trackers (none on ranks other than 0); one that raises is disabled with a warning line."""

    def __init__(self) -> None:
        self.active: dict[str, Tracker] = {}

    def log_record(self, record: dict[str, Any]) -> None:
        """A log.jsonl record's numbers, as "<type>/<key>" (e.g. train/loss, eval/mIoU) at its step."""
        scalars = {f"{record['type']}/{k}": float(v) for k, v in record.items()
                   if k not in ("type", "step") and isinstance(v, (int, float)) and math.isfinite(v)}
        self.each(lambda tracker: tracker.log(record["step"], scalars))

    def log_eval(self, step: int, results: dict[str, Any], results_file: Path) -> None:
        scalars = {f"eval/{k}": v for k, v in flatten(results).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.each(lambda tracker: tracker.log_eval(step, scalars, results_file))

    def close(self) -> None:
        self.each(lambda tracker: tracker.close())
        self.active = {}

    def each(self, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.active.items()):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001  (a tracker never stops training)
                del self.active[name]
                warn(name, err)


def warn(name: str, err: Exception) -> None:
    first = (str(err).splitlines() or [""])[0][:200]
    print(f"segrank train: warning: tracker {name} failed ({type(err).__name__}: {first}); it is disabled, "
          "training continues", file=sys.stderr, flush=True)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of "a.b" keys; lists as "a.0", "a.1"... (a config's or results' numbers)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            out |= {f"{name}.{i}": v for i, v in enumerate(value)}
        else:
            out[name] = value
    return out
