"""Hugging Face ``datasets`` on disk, read with pyarrow (the optional extra ``segrank[hf]``); nothing is downloaded.

Layouts under the dataset's root, tried in this order:

- ``dataset_dict.json`` + one folder per split (``DatasetDict.save_to_disk``), each as below;
- ``state.json`` + ``data-*.arrow`` (``Dataset.save_to_disk``: Arrow IPC streams listed in state.json), one split
  that serves every split name;
- ``*.parquet`` files anywhere below the root, the split named by the file name (``split_of``), as the Hub stores
  datasets: ``data/train-00000-of-00002.parquet``, ``scene_parse_150-validation.parquet``, ``train/0000.parquet``.

Image and label cells are Hugging Face ``Image`` features (a struct of ``bytes`` and ``path``; a path alone is read
from the file, relative to the root when it is relative), or plain binary cells. Rows are read on demand: Arrow
streams are memory-mapped, Parquet files read one row group at a time (``datasets`` writes 100 images per group), and
every worker process opens the files itself.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segrank.config.build import from_dict
from segrank.errors import SegrankError

NAME = "huggingface"
SPLIT_ALIASES = {"val": "validation", "validation": "val"}  # segrank's split names, the Hub's
SHARD_NUMBERS = re.compile(r"-\d+-of-\d+.*$")  # "-00000-of-00002" and what follows it (a hash)
ROW_GROUPS_KEPT = 2  # Parquet row groups each process keeps decoded, per file


@dataclass
class HFOptions:
    """``data.options`` of a Hugging Face dataset."""

    image_column: str = "image"
    label_column: str = "annotation"
    classes: list[str] | str | None = None  # names, or a bundled list (ade20k, ...); null: class_feature's names
    class_feature: str | None = None  # a ClassLabel feature (or a list of them) whose names are the classes
    reduce_zero_label: bool = False  # label value 0 is "not labelled" and c means class c-1 (ADE20K, scene_parse_150)
    ignore_index: int | None = 255  # the label value meaning "not labelled"; null: none


def hf_options(options: dict[str, Any] | None) -> HFOptions:
    """The options, checked key by key (``data.options.<key>: ...``)."""
    return from_dict(HFOptions, options or {}, "data.options")


def pyarrow_modules() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or one line saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise SegrankError(f"dataset {NAME!r} reads Arrow and Parquet files with pyarrow, which is not installed: "
                           "pip install 'segrank[hf]'") from None
    return pyarrow, pyarrow.parquet


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; one line naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SegrankError(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise SegrankError(f"{path}: expected a JSON object")
    return data


def saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``Dataset.save_to_disk`` folder, in their order."""
    state = read_json(folder / "state.json")
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries):
        raise SegrankError(f"{folder / 'state.json'}: lists no _data_files")
    if state.get("_indices_data_files"):
        raise SegrankError(f"{folder / 'state.json'}: saved with an indices mapping (an old datasets version); "
                           "save it again with a recent one")
    return [folder / entry["filename"] for entry in entries]


def find_splits(root: Path) -> dict[str, list[Path]]:
    """Split name -> data files (Arrow or Parquet) of the dataset at ``root``; a single saved Dataset is split ``""``
    (every split name)."""
    if (root / "dataset_dict.json").is_file():
        splits = read_json(root / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not splits or not all(isinstance(split, str) for split in splits):
            raise SegrankError(f"{root / 'dataset_dict.json'}: lists no splits")
        return {split: saved_dataset_files(root / split) for split in splits}
    if (root / "state.json").is_file():
        return {"": saved_dataset_files(root)}
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.parquet")):
        if not path.name.startswith("."):
            found.setdefault(split_of(path), []).append(path)
    if not found:
        raise SegrankError(f"{root}: not a Hugging Face dataset (no dataset_dict.json, state.json or *.parquet "
                           "files)")
    return found


def split_of(path: Path) -> str:
    """The split of a Parquet file: the last ``-``-separated word of its name before the shard numbers
    (``train-00000-of-00002-<hash>.parquet``, ``<dataset>-train.parquet``: train), or its folder's name when that word
    is a number (``train/0000.parquet``)."""
    stem = SHARD_NUMBERS.sub("", path.name.removesuffix(".parquet"))
    word = stem.rsplit("-", 1)[-1]
    return path.parent.name if word.isdigit() else word


def split_names(root: Path) -> list[str]:
    """The splits ``segrank datasets check`` goes through (``all`` for a single saved Dataset)."""
    return [split or "all" for split in find_splits(root)]


def split_files(root: Path, split: str) -> list[Path]:
    splits = find_splits(root)
    if "" in splits:
        return splits[""]
    for name in (split, SPLIT_ALIASES.get(split)):
        if name in splits:
            return splits[name]
    raise SegrankError(f"dataset {NAME!r} at {root}: unknown split {split!r} (known: {', '.join(splits)})")


def features_of(root: Path) -> dict[str, Any]:
    """The ``features`` the dataset declares (dataset_info.json, else the Hugging Face metadata of its first file)."""
    infos = [info for info in (root / "dataset_info.json", *sorted(root.glob("*/dataset_info.json")))
             if info.is_file()]
    if infos:
        features = read_json(infos[0]).get("features")
    else:
        first = next(f for split in find_splits(root).values() for f in split)
        metadata = (open_schema(first).metadata or {}).get(b"huggingface")
        try:
            features = (json.loads(metadata).get("info") or {}).get("features") if metadata else None
        except (json.JSONDecodeError, AttributeError):
            raise SegrankError(f"{first}: unreadable Hugging Face metadata") from None
    return features if isinstance(features, dict) else {}


def class_label_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature, or of the ClassLabel inside a list/Sequence feature."""
    if isinstance(feature, list) and feature:
        return class_label_names(feature[0])
    if not isinstance(feature, dict):
        return None
    if feature.get("_type") == "ClassLabel":
        return [str(n) for n in feature.get("names") or []] or None
    return class_label_names(feature.get("feature"))


def feature_classes(root: Path, feature: str | None) -> list[str]:
    """Class names from the ClassLabel feature ``feature`` of the dataset at ``root``."""
    features = features_of(root)
    labelled = [name for name, f in features.items() if class_label_names(f)]
    if feature is None:
        found = f" (its ClassLabel features: {', '.join(labelled)})" if labelled else ""
        raise SegrankError(f"data.options.classes: dataset {NAME!r} at {root} needs class names: a list, a bundled "
                           f"list such as ade20k, or data.options.class_feature naming a ClassLabel feature{found}")
    if feature not in labelled:
        raise SegrankError(f"data.options.class_feature: {root} has no ClassLabel feature {feature!r} (ClassLabel "
                           f"features: {', '.join(labelled) or 'none'})")
    return class_label_names(features[feature])


def open_schema(path: Path) -> Any:
    """The Arrow schema of a data file (Parquet: its footer only)."""
    pa, pq = pyarrow_modules()
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path)
        return pa.ipc.open_stream(pa.memory_map(str(path))).schema
    except (OSError, pa.ArrowInvalid) as err:
        raise SegrankError(f"{path}: cannot read ({err})") from None


class ArrowFile:
    """An Arrow IPC stream, memory-mapped: its record batches are views of the file, read when touched."""

    def __init__(self, path: Path, columns: tuple[str, str]) -> None:
        pa, _ = pyarrow_modules()
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        self.batches = list(reader)
        self.starts = [0]
        for batch in self.batches:
            self.starts.append(self.starts[-1] + batch.num_rows)
        self.indices = [self.batches[0].schema.get_field_index(c) for c in columns] if self.batches else []

    def cells(self, row: int) -> tuple[Any, Any]:
        b = bisect.bisect_right(self.starts, row) - 1
        batch, offset = self.batches[b], row - self.starts[b]
        return tuple(batch.column(i)[offset].as_py() for i in self.indices)


class ParquetFile:
    """A Parquet file read one row group at a time (the last few kept)."""

    def __init__(self, path: Path, columns: tuple[str, str]) -> None:
        _, pq = pyarrow_modules()
        self.file, self.columns = pq.ParquetFile(path), list(columns)
        self.starts = [0]
        for i in range(self.file.metadata.num_row_groups):
            self.starts.append(self.starts[-1] + self.file.metadata.row_group(i).num_rows)
        self.groups: OrderedDict[int, Any] = OrderedDict()

    def cells(self, row: int) -> tuple[Any, Any]:
        g = bisect.bisect_right(self.starts, row) - 1
        if g not in self.groups:
            self.groups[g] = self.file.read_row_group(g, columns=self.columns)
            while len(self.groups) > ROW_GROUPS_KEPT:
                self.groups.popitem(last=False)
        table = self.groups[g]
        return tuple(table.column(c)[row - self.starts[g]].as_py() for c in self.columns)


def row_count(path: Path) -> int:
    """Rows of a data file, from its metadata (Parquet footer; Arrow batch headers)."""
    pa, pq = pyarrow_modules()
    try:
        if path.suffix == ".parquet":
            return pq.ParquetFile(path).metadata.num_rows
        return sum(batch.num_rows for batch in pa.ipc.open_stream(pa.memory_map(str(path))))
    except (OSError, pa.ArrowInvalid) as err:
        raise SegrankError(f"{path}: cannot read ({err})") from None


class HFRows:
    """The rows of one split across its data files. Picklable: every process opens the files on first use."""

    def __init__(self, root: Path, split: str, opts: HFOptions) -> None:
        self.root, self.files = root, split_files(root, split)
        self.columns = (opts.image_column, opts.label_column)
        for path in self.files:
            names = open_schema(path).names
            for key, column in zip(("image_column", "label_column"), self.columns, strict=True):
                if column not in names:
                    raise SegrankError(f"{path}: no column {column!r} (data.options.{key}; columns: "
                                       f"{', '.join(names)})")
        self.starts = [0]
        for path in self.files:
            self.starts.append(self.starts[-1] + row_count(path))
        self.opened: dict[int, ArrowFile | ParquetFile] = {}
        self.pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "opened": {}}

    def encoded(self, index: int) -> tuple[bytes, bytes, str]:
        """The encoded image and label of row ``index`` and where they are (``<file> row <n>``)."""
        if self.pid != os.getpid():  # a forked worker: open the files again in this process
            self.opened, self.pid = {}, os.getpid()
        f = bisect.bisect_right(self.starts, index) - 1
        path, row = self.files[f], index - self.starts[f]
        if f not in self.opened:
            self.opened[f] = open_data_file(path, self.columns)
        where = f"{path} row {row}"
        cells = self.opened[f].cells(row)
        image, label = (self.cell_bytes(cell, column, where) for cell, column in zip(cells, self.columns, strict=True))
        return image, label, where

    def cell_bytes(self, cell: Any, column: str, where: str) -> bytes:
        """The encoded image of an Image cell ({bytes, path}), a binary cell, or a path cell."""
        data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (
            (cell, None) if isinstance(cell, bytes) else (None, cell))
        if data:
            return data
        if isinstance(path, str) and path:
            file = Path(path) if Path(path).is_absolute() else self.root / path
            try:
                return file.read_bytes()
            except OSError as err:
                raise SegrankError(f"{where}: column {column!r} names {file}, which cannot be read "
                                   f"({err.strerror})") from None
        raise SegrankError(f"{where}: column {column!r} holds no image")


def open_data_file(path: Path, columns: tuple[str, str]) -> ArrowFile | ParquetFile:
    pa, _ = pyarrow_modules()
    try:
        return (ParquetFile if path.suffix == ".parquet" else ArrowFile)(path, columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise SegrankError(f"{path}: cannot read ({err})") from None
