"""The table of checkpoint formats: one record per layout. ``load_model`` asks the records in table order which one
holds a path, or looks one up by name, and loads through it; ``export_checkpoint`` writes through one.

A new format is a module with its ``detect`` and ``load`` functions (and ``export`` where segrank can write the layout)
and one record here, placed before any format whose ``detect`` would also claim its files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segrank.checkpoints.detect import CheckpointContent, unclaimed_error
from segrank.checkpoints.mmseg import export_mmseg, is_mmseg, load_mmseg
from segrank.checkpoints.native import is_native, load_native
from segrank.checkpoints.pretrained import from_pretrained, is_pretrained
from segrank.checkpoints.segmenter import export_segmenter, is_segmenter, load_segmenter
from segrank.checkpoints.vit_weights import export_npz, export_timm, is_npz, is_timm, load_npz, load_timm
from segrank.config import ModelConfig
from segrank.errors import CheckpointError
from segrank.models.segmentor import Segmentor


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint layout.

    ``detect(content)``: whether a resolved path holds this layout, judged by content (``CheckpointContent``); it may
    raise a CheckpointError for a file that is clearly of this layout but unusable. ``load(path, cfg)``: the model,
    with ``model.inference`` set from whatever test settings the layout records; ``cfg`` (a ModelConfig or None)
    gives the architecture, overriding a stored one. ``export(model, path)``: write ``model`` in this layout; None
    where segrank does not write it.
    """

    name: str
    detect: Callable[[CheckpointContent], bool]
    load: Callable[[Path, ModelConfig | None], Segmentor]
    export: Callable[[Segmentor, Path], None] | None = None


# Detection asks the formats in this order: timm (any mapping of ViT-named tensors) after the layouts whose files
# also hold such tensors (native, official Segmenter).
CHECKPOINT_FORMATS: tuple[CheckpointFormat, ...] = (
    CheckpointFormat("native", is_native, load_native),
    CheckpointFormat("mmseg", is_mmseg, load_mmseg, export_mmseg),
    CheckpointFormat("segmenter", is_segmenter, load_segmenter, export_segmenter),
    CheckpointFormat("npz", is_npz, load_npz, export_npz),
    CheckpointFormat("timm", is_timm, load_timm, export_timm),
    CheckpointFormat("pretrained", is_pretrained, from_pretrained),
)
FORMATS = tuple(fmt.name for fmt in CHECKPOINT_FORMATS)  # the names the command line offers (--format, --from)


def checkpoint_format(name: str) -> CheckpointFormat:
    """The record called ``name``."""
    for fmt in CHECKPOINT_FORMATS:
        if fmt.name == name:
            return fmt
    names = ", ".join(fmt.name for fmt in CHECKPOINT_FORMATS)
    raise CheckpointError(f"unknown checkpoint format {name!r} (choose from {names})")


def exporter(name: str) -> Callable[[Segmentor, Path], None]:
    """The ``export`` of the record called ``name``."""
    for fmt in CHECKPOINT_FORMATS:
        if fmt.name == name and fmt.export is not None:
            return fmt.export
    raise CheckpointError(f"cannot export to format {name!r}")


def format_of(path: Path) -> CheckpointFormat:
    """The record of the first format that claims a resolved checkpoint path; an error saying what the path holds
    when none does."""
    content = CheckpointContent(path)
    for fmt in CHECKPOINT_FORMATS:
        if fmt.detect(content):
            return fmt
    raise unclaimed_error(content)


def detect_format(path: Path) -> str:
    """The name of the layout of a resolved checkpoint path (see ``resolve_checkpoint``)."""
    return format_of(path).name
