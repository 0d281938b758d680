"""``segrank datasets check``: layout, pairing, sizes and label values of a dataset on disk, file by file, plus the
class histogram and the per-image class-count distribution (the statistic RankSeg relies on)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segrank.data.datasets import Sample, decode_label, list_samples, read_label_file
from segrank.data.huggingface import NAME as HF_NAME
from segrank.data.huggingface import HFRows, hf_options, split_names
from segrank.data.info import DatasetInfo, Layout, dataset_info, dataset_spec, folder_layout, huggingface_layout
from segrank.data.parallel import run_parallel
from segrank.errors import SegrankError


@dataclass
class SplitReport:
    split: str
    images: int = 0
    labels: int = 0
    pairs: int = 0


@dataclass
class CheckReport:
    info: DatasetInfo
    root: Path
    splits: list[SplitReport] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, what is wrong)
    class_pixels: np.ndarray | None = None  # (N,) pixels per class over all checked labels
    class_images: np.ndarray | None = None  # (N,) labels containing the class
    classes_per_image: Counter = field(default_factory=Counter)


def dataset_splits(layout: Layout, root: Path) -> list[str]:
    """Split names to check: one per distinct folder/list of the layout (folder datasets: their split lists)."""
    if not layout.splits:
        lists = sorted(p.stem for p in (root / "splits").glob("*.txt")) if layout.split_file else []
        return lists or ["all"]
    seen, out = set(), []
    for ours, theirs in layout.splits.items():
        if theirs not in seen:
            seen.add(theirs)
            out.append(ours)
    return out


def add_split_results(report: CheckReport, sr: SplitReport, samples: list[Sample],
                      results: Iterator[tuple[list[tuple[str, str]], np.ndarray | None, np.ndarray | None]]) -> None:
    """Count a split's samples into ``sr`` and the pairs' checks (``results``, one per complete pair in order) into
    ``report``, in file order whatever the number of workers."""
    for s in samples:
        sr.images += s.image is not None
        sr.labels += s.label is not None
        if s.image is None:
            report.problems.append((str(s.label or s.name), "label without image" if s.label else
                                    "listed in the split file, but neither image nor label exists"))
            continue
        if s.label is None:
            report.problems.append((str(s.image), "image without label"))
            continue
        sr.pairs += 1
        problems, classes, pixels = next(results)
        report.problems += problems
        if classes is not None:
            report.class_pixels[classes] += pixels
            report.class_images[classes] += 1
            report.classes_per_image[len(classes)] += 1


def check_dataset(name: str, root: str | Path, splits: list[str] | None = None, progress: bool = True,
                  workers: int = 1, options: dict[str, Any] | None = None) -> CheckReport:
    """Check every file of the dataset at ``root``; ``workers`` processes read the image/label pairs (the report is
    the same for any number). ``options``: the dataset's data.options (Hugging Face datasets)."""
    root = Path(root)
    spec = dataset_spec(name)
    if name == "synthetic":
        raise SegrankError("dataset 'synthetic' is generated on the fly; there is nothing on disk to check")
    if not root.is_dir():
        raise SegrankError(f"{root}: dataset root not found")
    if name == HF_NAME:
        return check_huggingface(root, options or {}, splits, progress, workers)
    if options:
        raise SegrankError(f"--option: dataset {name!r} takes no options, got {sorted(options)}")
    layout = folder_layout(root) if name == "folder" else spec.layout
    info = dataset_info(name, None, root)
    report = CheckReport(info, root, class_pixels=np.zeros(info.num_classes, np.int64),
                         class_images=np.zeros(info.num_classes, np.int64))
    check = partial(check_pair, layout, info.num_classes, info.ignore_index)
    for split in splits or dataset_splits(layout, root):
        try:
            samples, orphans = list_samples(layout, root, split)
        except SegrankError as err:
            report.problems.append((str(root), f"split {split}: {err}"))
            continue
        sr = SplitReport(split)
        report.splits.append(sr)
        if not samples:
            report.problems.append((str(root / layout.img_dir.format(split=layout.splits.get(split, split))),
                                    f"split {split}: no images"))
        for path in orphans:
            sr.labels += 1
            report.problems.append((str(path), "label without image"))
        pairs = [(s.image, s.label) for s in samples if s.image is not None and s.label is not None]
        results = run_parallel(check, pairs, workers, f"check {split}", progress, ordered=True)
        add_split_results(report, sr, samples, results)
    return report


def check_pair(layout: Layout, num_classes: int, ignore_index: int, pair: tuple[Path, Path]
               ) -> tuple[list[tuple[str, str]], np.ndarray | None, np.ndarray | None]:
    """(problems, classes present, their pixel counts) of one image/label pair; no classes when the label cannot be
    read."""
    image, label_path = pair
    try:
        with Image.open(image) as img:
            width, height = img.size
    except OSError as err:
        return [(str(image), f"unreadable image ({err})")], None, None
    try:
        raw = read_label_file(label_path)
    except SegrankError as err:
        return [(str(label_path), str(err).removeprefix(f"{label_path}: "))], None, None
    return label_report(raw, (height, width), str(label_path), layout, num_classes, ignore_index)


def label_report(raw: np.ndarray, size: tuple[int, int], where: str, layout: Layout, num_classes: int,
                 ignore_index: int) -> tuple[list[tuple[str, str]], np.ndarray | None, np.ndarray | None]:
    """(problems, classes present, their pixel counts) of label values ``raw`` of an image of ``size`` (H, W)."""
    height, width = size
    problems: list[tuple[str, str]] = []
    if raw.ndim != 2:
        return [(where, f"label has shape {raw.shape}, expected (H, W)")], None, None
    if raw.shape != (height, width):
        problems.append((where, f"label size {raw.shape[1]}x{raw.shape[0]} differs from image size "
                                f"{width}x{height}"))
    label = decode_label(raw, layout, ignore_index)
    valid = label != ignore_index
    outside = valid & ((label < 0) | (label >= num_classes))
    if outside.any():
        bad = np.unique(raw[outside])
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        problems.append((where, f"{int(outside.sum())} pixels with file values outside the {num_classes}-class "
                                f"vocabulary: {shown}"))
        valid &= ~outside
    classes, pixels = np.unique(label[valid], return_counts=True)
    return problems, classes, pixels


def check_huggingface(root: Path, options: dict[str, Any], splits: list[str] | None, progress: bool,
                      workers: int) -> CheckReport:
    """``check_dataset`` of a Hugging Face dataset: every row's image and label."""
    info = dataset_info(HF_NAME, options, root)
    layout = huggingface_layout(options, info.num_classes)
    report = CheckReport(info, root, class_pixels=np.zeros(info.num_classes, np.int64),
                         class_images=np.zeros(info.num_classes, np.int64))
    for split in splits or split_names(root):
        try:
            rows = HFRows(root, split, hf_options(options))
        except SegrankError as err:
            report.problems.append((str(root), f"split {split}: {err}"))
            continue
        sr = SplitReport(split, len(rows), len(rows), len(rows))
        report.splits.append(sr)
        check = partial(check_row, rows, layout, info.num_classes, info.ignore_index)
        for problems, classes, pixels in run_parallel(check, range(len(rows)), workers, f"check {split}", progress,
                                                      ordered=True):
            report.problems += problems
            if classes is not None:
                report.class_pixels[classes] += pixels
                report.class_images[classes] += 1
                report.classes_per_image[len(classes)] += 1
    return report


def check_row(rows: HFRows, layout: Layout, num_classes: int, ignore_index: int, index: int
              ) -> tuple[list[tuple[str, str]], np.ndarray | None, np.ndarray | None]:
    """``check_pair`` of row ``index`` of a Hugging Face dataset."""
    try:
        image, label, where = rows.encoded(index)
    except SegrankError as err:
        return [(f"{rows.root} row {index}", str(err))], None, None
    try:
        with Image.open(io.BytesIO(image)) as img:
            width, height = img.size
    except OSError as err:
        return [(f"{where} ({rows.columns[0]})", f"unreadable image ({err})")], None, None
    name = f"{where} ({rows.columns[1]})"
    try:
        raw = read_label_file(io.BytesIO(label), name)
    except SegrankError as err:
        return [(name, str(err).removeprefix(f"{name}: "))], None, None
    return label_report(raw, (height, width), name, layout, num_classes, ignore_index)


def format_report(report: CheckReport, top: int = 20) -> str:
    info = report.info
    lines = [f"dataset {info.name} at {report.root}: {info.num_classes} classes, ignore value {info.ignore_index}"]
    for sr in report.splits:
        lines.append(f"  split {sr.split}: {sr.images} images, {sr.labels} labels, {sr.pairs} pairs")
    total = int(report.class_pixels.sum())
    if total:
        present = int((report.class_pixels > 0).sum())
        shown = f"the {top} largest of {present} classes present" if present > top else \
            f"all {present} classes present"
        lines.append(f"class histogram ({shown}, largest first; class id, name, % of labelled pixels, images "
                     "containing it):")
        for k in np.argsort(-report.class_pixels, kind="stable")[:top]:
            if report.class_pixels[k]:
                lines.append(f"  {k:5d} {info.classes[k][:32]:32s} {100 * report.class_pixels[k] / total:6.2f} % "
                             f"{int(report.class_images[k]):7d}")
        counts = report.classes_per_image
        n = sum(counts.values())
        values = np.repeat(list(counts), list(counts.values()))
        lines.append(f"classes per image: mean {values.mean():.2f}, median {np.median(values):g}, max {values.max()} "
                     f"over {n} labels")
        for k in sorted(counts):
            lines.append(f"  {k:4d} classes: {counts[k]:7d} images ({100 * counts[k] / n:5.1f} %)")
    if report.problems:
        lines.append(f"problems ({len(report.problems)}):")
        lines += [f"  {path}: {what}" for path, what in report.problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)
