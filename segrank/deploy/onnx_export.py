"""ONNX export of a segrank model, and a check of the exported graph against PyTorch with onnxruntime.

The graph takes ``image``: float32 (B, 3, H, W), normalised as the model expects, and returns, at the input size,
the outputs its decode head declares (``DecodeHead.output_names``):
- Segmenter / linear heads: ``logits`` (B, N, H, W);
- RankSeg: ``logits`` (B, k, H, W) rank-slot logits, ``class_index`` (B, k) int64 class of each slot (most
  confident first) and ``image_logits`` (B, N) multi-label scores;
- with ``labels=True``: only ``labels`` (B, H, W) int64 class ids (argmax and slot-to-class mapping in the graph).

The batch axis is always dynamic; ``dynamic=True`` also makes H and W dynamic. The models keep the padding, the
position-table resize and the multi-label pooling general under torch.export (see segrank/models/vit.py and
segrank/models/pooling.py); a model part that would still fix H or W makes torch.export, and so the export, fail
with one line instead of giving a graph that is only right at the example size. onnx and onnxscript (export) and
onnxruntime (check) are optional packages: ``pip install 'segrank[onnx]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from segrank import files
from segrank.errors import SegrankError
from segrank.models import Segmentor, SegOutput

DEFAULT_OPSET = 18  # torch's exporter writes 18 and converts to newer ones; older runtimes read 18
MAX_OPSET = 25  # 18..25 export and run exactly in onnxruntime 1.31 (23+ use its Attention and Gelu operators)
MAX_SIDE = 8192  # upper bound of the dynamic H/W symbols (torch.export needs a finite range to reason with)
EXPORT_PACKAGES = ("onnx", "onnxscript")


def require_packages(names: tuple[str, ...], purpose: str) -> None:
    """SegrankError naming the missing optional packages (the ``onnx`` extra) for ``purpose``."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        note = " (onnxruntime needs Python >= 3.11)" if "onnxruntime" in missing else ""
        raise SegrankError(f"{purpose} needs {', '.join(missing)}: pip install 'segrank[onnx]'{note}")


def output_names(model: Segmentor, labels: bool) -> list[str]:
    """The graph's outputs: ``labels``, or those the model's head declares (``DecodeHead.output_names``)."""
    return ["labels"] if labels else list(model.decode_head.output_names)


def graph_outputs(model: Segmentor, output: SegOutput, size: tuple[int, int], labels: bool) -> tuple[Tensor, ...]:
    """The graph's outputs from a forward ``output`` of an input of ``size`` (as ``Segmentor.class_map`` maps it)."""
    if labels:
        return (model.output_to_class_map(output, size),)
    tensors = {"logits": model.to_input_size(output.mask_logits, size), "class_index": output.class_index,
               "image_logits": output.image_logits}
    return tuple(tensors[name] for name in output_names(model, labels))


class ExportGraph(nn.Module):
    """What the ONNX graph computes."""

    def __init__(self, model: Segmentor, labels: bool) -> None:
        super().__init__()
        self.model = model
        self.labels = labels

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return graph_outputs(self.model, self.model(image), (image.shape[2], image.shape[3]), self.labels)


def graph_metadata(class_names: list[str], mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, str]:
    """The file's metadata properties (JSON values): class names by id, and the input normalisation."""
    return {"segrank.class_names": json.dumps(class_names), "segrank.mean": json.dumps(list(mean)),
            "segrank.std": json.dumps(list(std)),
            "segrank.input": "image: float32 (B, 3, H, W), RGB, (pixel on the 0-255 scale - mean) / std"}


def validate_export(model: Segmentor, size: tuple[int, int], dynamic: bool, opset: int) -> None:
    """Refuse what cannot be exported exactly, before anything is traced or written."""
    if model.needs_present_classes:
        raise SegrankError(f"{model.cfg.head.type}: the GT-oracle head takes each image's ground-truth classes as a "
                           "second input and cannot be exported")
    low = min_dynamic_side(model) if dynamic else 1
    if min(size) < low or max(size) > MAX_SIDE:
        raise SegrankError(f"--size: {size[0]} {size[1]}: height and width must be in [{low}, {MAX_SIDE}]"
                           + (" for a dynamic export (the patch grid must be at least 2)" if dynamic else ""))
    if not DEFAULT_OPSET <= opset <= MAX_OPSET:
        raise SegrankError(f"--opset: {opset} is not supported (choose {DEFAULT_OPSET}..{MAX_OPSET})")


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per missing torchvision operator, and torch's own modules raise deprecation
    warnings about each other while tracing: keep the CLI's output to what the user can act on."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def min_dynamic_side(model: Segmentor) -> int:
    """Smallest H/W of a dynamic graph: torch.export assumes symbolic sizes (here the patch grid) are >= 2."""
    return model.patch_size + 1


def export_program(model: Segmentor, size: tuple[int, int], dynamic: bool, opset: int, labels: bool):
    """Trace ``ExportGraph`` with torch.export and translate it; returns the ``ONNXProgram`` (not yet written).

    torch.export runs directly (not through torch.onnx's fallbacks) so that a model part that would fix H or W
    raises instead of silently giving a graph that is only right at the example size.
    """
    graph = ExportGraph(model.eval(), labels).eval()
    # Batch 2: torch.export fixes axes whose example size is 0 or 1.
    example = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    axes = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic:
        axes[2] = torch.export.Dim("height", min=min_dynamic_side(model), max=MAX_SIDE)
        axes[3] = torch.export.Dim("width", min=min_dynamic_side(model), max=MAX_SIDE)
    with torch.no_grad(), quiet_exporter():
        try:
            exported = torch.export.export(graph, (example,), dynamic_shapes={"image": axes}, strict=False)
        except torch._dynamo.exc.UserError as err:
            first = str(err).strip().splitlines()[0].split(" For more information")[0]
            raise SegrankError(f"export: torch.export cannot keep the graph general in batch/height/width ({first})"
                               ) from None
        return torch.onnx.export(exported, (example,), dynamo=True, opset_version=opset, input_names=["image"],
                                 output_names=output_names(model, labels), verbose=False)


def export_onnx(
    model: Segmentor,
    out: str | Path,
    size: tuple[int, int],
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    labels: bool = False,
    check_tol: float | None = None,
    metadata: dict[str, str] | None = None,
) -> list[SizeCheck]:
    """Write ``model`` (put in eval mode) as an ONNX graph to ``out``, with ``metadata`` as the file's metadata
    properties (``graph_metadata``: what a runtime needs to feed and read the graph).

    With ``check_tol``, onnxruntime first runs the graph against PyTorch (at ``check_sizes``) and ``out`` is
    written only when every size passes; the per-size results are returned.
    """
    out = Path(out)
    validate_export(model, size, dynamic, opset)
    require_packages(EXPORT_PACKAGES, "ONNX export")
    if check_tol is not None:
        require_packages(("onnxruntime",), "--check")
    program = export_program(model, size, dynamic, opset, labels)
    program.model.metadata_props.update(metadata or {})
    results: list[SizeCheck] = []

    def write(tmp: Path) -> None:
        # One self-contained file: an external weights file would be named after the temp file.
        program.save(tmp, external_data=False)
        if check_tol is not None:
            results.extend(check_onnx(model, tmp, check_sizes(size, dynamic, model.patch_size), labels, check_tol))
            failed = [r for r in results if not r.passed(check_tol)]
            if failed:
                raise SegrankError(f"{out}: --check failed, not written: {failed[0].problem(check_tol)}")

    files.atomic_write(out, write)
    return results


# --------------------------------------------------------------------------------------------------------------
# Checking with onnxruntime


@dataclass
class SizeCheck:
    """PyTorch vs onnxruntime at one input size."""

    size: tuple[int, int]
    batch: int
    max_abs_diff: float | None  # max |Δ| over float outputs (None for a labels-only graph)
    label_agreement: float  # fraction of pixels with equal class ids
    unexplained_labels: int  # differing pixels whose PyTorch top-two margin exceeds 2 * tol
    class_index_equal: bool

    def passed(self, tol: float) -> bool:
        within = self.max_abs_diff is None or self.max_abs_diff <= tol
        return within and self.unexplained_labels == 0 and self.class_index_equal

    def problem(self, tol: float) -> str:
        """Why this size failed (the first reason)."""
        where = f"at {self.size[0]}x{self.size[1]}"
        if not self.class_index_equal:
            return f"class_index differs {where}"
        if self.max_abs_diff is not None and self.max_abs_diff > tol:
            return f"max |Δlogit| {self.max_abs_diff:.3g} > {tol:g} {where}"
        return f"{self.unexplained_labels} pixels get another class {where}"

    def line(self) -> str:
        diff = "n/a (labels graph)" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        return (f"{self.size[0]}x{self.size[1]} (batch {self.batch}): max |Δlogit| {diff}, "
                f"labels agree {100 * self.label_agreement:.4f} %")


def off_grid(n: int, patch: int) -> int:
    """``n`` moved off a multiple of the patch size (those are the sizes where padding matters)."""
    n = max(n, patch + 1)
    return n if n % patch else n + patch // 2 + 1


def check_sizes(size: tuple[int, int], dynamic: bool, patch: int) -> list[tuple[int, int]]:
    """The export size, and for dynamic graphs two more that are no multiple of the patch size."""
    if not dynamic:
        return [size]
    H, W = size
    return [size, (off_grid(3 * H // 4, patch), off_grid(5 * W // 4, patch)),
            (off_grid(5 * H // 4, patch), off_grid(3 * W // 4, patch))]


def top_two_margin(logits: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W) gap between the two largest logits (inf for one channel)."""
    if logits.shape[1] < 2:
        return torch.full_like(logits[:, 0], float("inf"))
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def labels_from(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Class-id map of a graph's outputs: its ``labels``, or argmax of ``logits`` mapped through ``class_index``."""
    if "labels" in outputs:
        return outputs["labels"]
    pred = outputs["logits"].argmax(1)
    if "class_index" not in outputs:
        return pred
    index = outputs["class_index"]
    return np.take_along_axis(index, pred.reshape(pred.shape[0], -1), axis=1).reshape(pred.shape)


def check_one(model: Segmentor, session, image: Tensor, labels: bool, tol: float) -> SizeCheck:
    """onnxruntime vs PyTorch on one batch: float outputs by max |Δ|, class ids against ``class_map``."""
    size = (image.shape[2], image.shape[3])
    names = output_names(model, labels)
    with torch.no_grad():
        output = model(image)
        ref = {n: t.numpy() for n, t in zip(names, graph_outputs(model, output, size, labels), strict=True)}
        ref_labels = model.output_to_class_map(output, size).numpy()
        margin = top_two_margin(model.to_input_size(output.mask_logits, size)).numpy()
    try:
        ours = dict(zip(names, session.run(None, {"image": image.numpy()}), strict=True))
    except Exception as err:  # onnxruntime's error classes derive from Exception only
        first = str(err).strip().splitlines()[0]
        raise SegrankError(f"--check: onnxruntime failed at {size[0]}x{size[1]}: {first}") from None
    floats = [n for n in names if ours[n].dtype.kind == "f"]
    diff = max((float(np.abs(ours[n] - ref[n]).max()) for n in floats), default=None)
    differ = labels_from(ours) != ref_labels
    index_equal = "class_index" not in ours or np.array_equal(ours["class_index"], ref["class_index"])
    unexplained = int((differ & (margin > 2 * tol)).sum())
    return SizeCheck(size, image.shape[0], diff, float(1 - differ.mean()), unexplained, index_equal)


def check_onnx(
    model: Segmentor,
    path: str | Path,
    sizes: list[tuple[int, int]],
    labels: bool,
    tol: float = 1e-4,
    seed: int = 0,
) -> list[SizeCheck]:
    """Run the graph at ``path`` in onnxruntime and PyTorch on the same random inputs at each size (batch 2 at
    the first size, 1 at the others: both batch sizes go through the dynamic batch axis)."""
    require_packages(("onnxruntime",), "--check")
    ort = importlib.import_module("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    results = []
    for i, size in enumerate(sizes):
        image = torch.randn(2 if i == 0 else 1, 3, *size, generator=generator)
        results.append(check_one(model, session, image, labels, tol))
    return results
