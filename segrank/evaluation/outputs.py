"""What ``segrank eval`` writes: the results JSON and, beside it, the per-class table as CSV, the confusion matrix as
``.npy`` and a chart of the most confused class pairs.

A write that fails at the end (disk full, folder removed or made read-only meanwhile) never loses an evaluation: the
outputs are written to a fresh folder in the temp dir instead and the error says where.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from segrank import files
from segrank.errors import SegrankError
from segrank.evaluation.metrics import most_confused
from segrank.reporting.plots import confused_pairs_chart

CONFUSED_PAIRS = 20  # bars in the chart


def output_paths(out: Path) -> dict[str, Path]:
    """``results.json`` -> itself, ``results.per_class.csv``, ``results.confusion.npy``, ``results.confusion.png``."""
    out = Path(out)
    base = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return {"json": out, "csv": out.with_name(f"{base}.per_class.csv"),
            "npy": out.with_name(f"{base}.confusion.npy"), "png": out.with_name(f"{base}.confusion.png")}


def check_outputs(out: Path, inputs: list[Path | str | None], force: bool) -> None:
    """Refuse outputs that would replace an input (the checkpoint, the config, files of the dataset) or, without
    ``force``, an existing file (files.check_destinations)."""
    files.check_destinations([(path, "--out") for path in output_paths(out).values()], inputs, force)


def ensure_outputs_writable(out: Path) -> None:
    """Refuse, before the evaluation starts, an ``out`` where any of the outputs cannot be written."""
    for path in output_paths(out).values():
        files.ensure_writable(path)


def per_class_csv(results: dict[str, Any], hist: Tensor, class_names: Sequence[str]) -> str:
    """One row per class: id, name, IoU and Acc (fractions; empty where undefined), label and predicted pixels."""
    label_pixels, pred_pixels = hist.sum(1).tolist(), hist.sum(0).tolist()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class_id", "class", "iou", "acc", "label_pixels", "predicted_pixels"])
    for i, name in enumerate(class_names):
        iou, acc = results["IoU"][i], results["Acc"][i]
        writer.writerow([i, name, "" if math.isnan(iou) else f"{iou:.6f}", "" if math.isnan(acc) else f"{acc:.6f}",
                         label_pixels[i], pred_pixels[i]])
    return buffer.getvalue()


def write_eval_outputs(out: Path, results: dict[str, Any], hist: Tensor, class_names: Sequence[str]) -> list[Path]:
    """Write the four outputs (JSON first: the figures people need most); returns their paths."""
    try:
        return _write_all(output_paths(out), results, hist, class_names)
    except _WriteFailed as failed:
        kept = Path(tempfile.mkdtemp(prefix="segrank-eval-"))
        try:
            _write_all(output_paths(kept / Path(out).name), results, hist, class_names)
        except _WriteFailed:
            raise SegrankError(f"{failed.path}: cannot write ({failed.reason}), nor in {kept}; the summary above is "
                               "all that is left") from None
        raise SegrankError(f"{failed.path}: cannot write ({failed.reason}); the results are kept in {kept}") from None


class _WriteFailed(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _write_all(paths: dict[str, Path], results: dict[str, Any], hist: Tensor, class_names: Sequence[str]
               ) -> list[Path]:
    writers: dict[str, Callable[[Path], Any]] = {
        "json": lambda path: files.write_json(path, results, indent=1),
        "csv": lambda path: files.write_text(path, per_class_csv(results, hist, class_names)),
        "npy": lambda path: files.atomic_write(path, lambda tmp: np.save(tmp, hist.numpy())),
        "png": lambda path: confused_pairs_chart(most_confused(hist, CONFUSED_PAIRS), class_names, path),
    }
    for kind, write in writers.items():
        try:
            write(paths[kind])
        except OSError as err:
            raise _WriteFailed(paths[kind], err.strerror or str(err)) from None
    return list(paths.values())
