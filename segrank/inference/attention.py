"""Attention maps (``Predictor(attention=...)``, ``segrank predict --attention``): where the class tokens of the mask
transformer, of RankSeg's multi-label layer and the ViT's class token look, per head and averaged over heads.

How. After the usual prediction, a second pass runs the model over the image at the test scale, unflipped (whatever
``ms_flip``), with recorders on the layers asked for (``models.blocks.recording``); the prediction is not touched.
A recorded layer computes the softmax weights of the query tokens asked for, from the q and k its fused attention
kernel uses, so only (heads, classes shown, patches) numbers per layer and window are ever held. Layers:

- ``decoder.I`` (``decoder``: the last): layer I of the mask transformer, the weights of each shown class's token on
  the patch tokens. RankSeg's mask transformer holds the window's top-k classes only: a window that did not keep a
  class has no weights for it.
- ``multilabel``: RankSeg's multi-label layer (``multilabel_head: encoder_layer``), each shown class's token on the
  patch tokens it sees (with ``downsample`` s, s x s cells of pooled patches: a cell's weight is shared evenly among
  the window's patches it pools).
- ``backbone.I`` (``backbone``: the last): ViT block I, the weights of its class token on the patch tokens.

Weights on the query tokens themselves (and on OCE class tokens in the ViT) are left out: a window's map sums to at
most one. Maps lie on the image's patch grid: cells of ``patch_size`` pixels of the preprocessed input from its
top-left corner (the last row and column cut by the input's border). In whole mode that is the model's own grid; with
sliding windows each image cell is the mean of the window cells overlapping it, weighted by the pixels they share
(windows that did not keep a RankSeg class left out). A cell no window gave weights for is NaN.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segrank.config import EvalConfig
from segrank.errors import SegrankError
from segrank.inference.windows import Box, window_boxes
from segrank.models.blocks import Attention, AttentionRecorder, recording
from segrank.models.segmenter_head import MaskDecoderBase
from segrank.models.segmentor import Segmentor

MAX_CLASSES = 12


@dataclass
class AttentionOptions:
    """What ``Predictor(attention=...)`` computes (``attention=True``: these defaults).

    ``classes``: names or ids of the classes to show, in this order; default: the classes of the predicted label,
    largest area first, at most ``max_classes``. ``layers``: ``decoder`` / ``decoder.I``, ``multilabel``, ``backbone``
    / ``backbone.I`` (I from 0; the bare name is the last layer); default: the last mask-transformer layer, RankSeg's
    multi-label layer and the last ViT block, those the model has.
    """

    classes: Sequence[str | int] | None = None
    layers: Sequence[str] | None = None
    max_classes: int = MAX_CLASSES


@dataclass(frozen=True)
class Tap:
    """A layer to record. Its sequence is [ViT class token; patches; ...] when ``class_tokens`` is 0, else [keys;
    ``class_tokens`` class tokens]; ``slots``: those are RankSeg's top-k of the window, in rank order; ``pooled``: the
    keys are an s x s grid of pooled patches."""

    name: str
    attention: Attention
    class_tokens: int = 0
    slots: bool = False
    pooled: int | None = None

    def rows(self, length: int, ids: Tensor) -> Tensor | slice:
        """The query tokens to record in a sequence of ``length`` tokens, for the shown classes ``ids``."""
        if self.class_tokens == 0:
            return slice(0, 1)
        first = length - self.class_tokens
        return slice(first, length) if self.slots else first + ids

    def keys(self, length: int, n_patch: int) -> slice:
        return slice(1, 1 + n_patch) if self.class_tokens == 0 else slice(0, length - self.class_tokens)


@dataclass(frozen=True)
class AttentionPlan:
    """Options checked against a model: the layers to record and the requested class ids (None: from the label)."""

    taps: list[Tap]
    class_ids: list[int] | None
    class_names: list[str]
    max_classes: int


def available_taps(model: Segmentor) -> dict[str, Tap]:
    """Every layer of ``model`` that can be recorded, by name, backbone blocks last."""
    head = model.decode_head
    taps: dict[str, Tap] = {}
    if isinstance(head, MaskDecoderBase):
        slots = head.topk is not None
        for i, block in enumerate(head.seg_blocks):
            taps[f"decoder.{i}"] = Tap(f"decoder.{i}", block.attn, head.topk if slots else model.num_classes, slots)
        if head.multilabel_block is not None:
            taps["multilabel"] = Tap("multilabel", head.multilabel_block.attn, model.num_classes,
                                     pooled=getattr(head, "downsample", None))
    for i, block in enumerate(model.backbone.blocks):
        taps[f"backbone.{i}"] = Tap(f"backbone.{i}", block.attn)
    return taps


def plan_attention(options: AttentionOptions | bool | None, model: Segmentor,
                   class_names: list[str]) -> AttentionPlan | None:
    """The checked plan of ``options`` for ``model`` (None: no attention); bad names raise SegrankError."""
    if options is None or options is False:
        return None
    options = AttentionOptions() if options is True else options
    if not isinstance(options, AttentionOptions):
        raise SegrankError(f"attention: expected True or AttentionOptions, got {type(options).__name__}")
    if options.max_classes < 1:
        raise SegrankError(f"attention max_classes: {options.max_classes} is not a positive count")
    class_ids = None
    if options.classes is not None:
        class_ids = list(dict.fromkeys(class_id(c, class_names) for c in as_list(options.classes)))
        if not class_ids:
            raise SegrankError("attention classes: none given")
    return AttentionPlan(choose_taps(options.layers, model), class_ids, class_names, options.max_classes)


def as_list(values: Sequence[str | int] | str | int) -> list[str | int]:
    """A single name or id as a one-item list (a string is not taken as a list of letters)."""
    return [values] if isinstance(values, (str, int)) else list(values)


def choose_taps(layers: Sequence[str] | str | None, model: Segmentor) -> list[Tap]:
    """The taps ``layers`` names (``decoder``, ``backbone``: the last of them), in order, once each."""
    taps = available_taps(model)
    last = {name.split(".")[0]: tap for name, tap in taps.items()}  # in layer order, so the last of each wins
    names = [n for n in ("decoder", "multilabel", "backbone") if n in last] if layers is None else as_list(layers)
    chosen: list[Tap] = []
    for name in names:
        tap = taps.get(name) or last.get(name)
        if tap is None:
            raise SegrankError(f"attention layers: {name!r} is not a layer of this model (it has "
                               f"{describe_layers(list(taps))})")
        if tap not in chosen:
            chosen.append(tap)
    if not chosen:
        raise SegrankError("attention layers: none given")
    return chosen


def describe_layers(names: list[str]) -> str:
    """``decoder.0-decoder.1, multilabel, backbone.0-backbone.11``: a model's layers, ranges folded."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.split(".")[0], []).append(name)
    return ", ".join(g[0] if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups.values())


def class_id(value: str | int, class_names: list[str]) -> int:
    """The id of a class given by name or id (an int or a string of digits)."""
    if isinstance(value, str) and value in class_names:
        return class_names.index(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.isdigit()):
        if 0 <= int(value) < len(class_names):
            return int(value)
        raise SegrankError(f"attention classes: {value} is not a class id of this model (0-{len(class_names) - 1})")
    close = difflib.get_close_matches(str(value), class_names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SegrankError(f"attention classes: {value!r} is not a class of this model{hint}")


def classes_to_show(plan: AttentionPlan, label: np.ndarray) -> list[int]:
    """The plan's classes, or those of ``label`` (H, W), largest area first, at most ``plan.max_classes``."""
    if plan.class_ids is not None:
        return plan.class_ids
    area = np.bincount(label.reshape(-1), minlength=len(plan.class_names))
    order = np.argsort(-area, kind="stable")
    return [int(c) for c in order[:plan.max_classes] if area[c]]


@dataclass(repr=False)
class AttentionMaps:
    """One image's attention maps. ``heads[layer]``: (heads, Q, gh, gw) float32 weights per head on the image's patch
    grid, whose Q rows are ``queries[layer]``: the shown classes (``classes`` ids, ``class_names``) for ``decoder.I``
    and ``multilabel``, ``["cls"]`` for ``backbone.I``. ``maps[layer]``: the mean over heads, (Q, gh, gw).
    ``upsampled(layer)``: that mean at the image's size. The grid covers the preprocessed input of ``input_size``
    in cells of ``patch_size`` pixels; the image is ``image_size``. NaN: no weights there (a RankSeg class that no
    window covering the cell kept)."""

    heads: dict[str, np.ndarray]
    queries: dict[str, list[str]]
    classes: np.ndarray
    class_names: list[str]
    patch_size: int
    input_size: tuple[int, int]
    image_size: tuple[int, int]

    @property
    def layers(self) -> list[str]:
        return list(self.heads)

    @property
    def maps(self) -> dict[str, np.ndarray]:
        return {layer: weights.mean(0) for layer, weights in self.heads.items()}

    def upsampled(self, layer: str) -> np.ndarray:
        """(Q, H, W) float32 mean over heads of ``layer`` at the image's size: each cell spread over its pixels of the
        input, then the input resized (bilinear) to the image."""
        if layer not in self.heads:
            raise KeyError(f"{layer!r}: the layers recorded are {', '.join(self.heads)}")
        grid = torch.from_numpy(self.maps[layer])[None]
        p = self.patch_size
        cells = F.interpolate(grid, scale_factor=(p, p), mode="nearest")[..., :self.input_size[0], :self.input_size[1]]
        return F.interpolate(cells, size=self.image_size, mode="bilinear", align_corners=False)[0].numpy()

    def extent(self) -> tuple[float, float]:
        """(width, height) in image pixels that the patch grid covers (a little beyond the image at the last cells)."""
        gh, gw = next(iter(self.heads.values())).shape[2:]
        (h, w), (H, W) = self.input_size, self.image_size
        return gw * self.patch_size * W / w, gh * self.patch_size * H / h

    def panels(self) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
        """The figure's rows: (layer, [(title, map)]): each class's mean map, or the class token's mean and heads."""
        rows = []
        for layer, weights in self.heads.items():
            mean, queries = weights.mean(0), self.queries[layer]
            if queries == ["cls"]:
                maps = [(f"cls, mean of {len(weights)} heads", mean[0])]
                maps += [(f"head {i}", w[0]) for i, w in enumerate(weights)]
            else:
                maps = [(name + (" (not kept)" if np.isnan(m).all() else ""), m) for name, m in zip(queries, mean,
                                                                                                  strict=True)]
            rows.append((layer, maps))
        return rows

    def __repr__(self) -> str:
        shapes = ", ".join(f"{layer}: {tuple(w.shape)}" for layer, w in self.heads.items())
        return f"AttentionMaps({len(self.classes)} classes; {shapes})"


def cell_overlap(start: int, stop: int, total: int, patch: int, device: torch.device) -> Tensor:
    """(G, g) pixels shared by cell I of the image's grid (cells of ``patch`` pixels from 0, cut at ``total``) and
    cell i of a window spanning [start, stop) (cells from ``start``, cut at ``stop``), along one axis."""
    image = torch.arange(0, total, patch, device=device)
    window = torch.arange(start, stop, patch, device=device)
    high = torch.minimum((image + patch).clamp(max=total)[:, None], (window + patch).clamp(max=stop)[None])
    return (high - torch.maximum(image[:, None], window[None])).clamp(min=0).float()


class Canvas:
    """The overlap-weighted mean of windows' maps on the image's patch grid, for one layer."""

    def __init__(self, size: tuple[int, int], patch: int) -> None:
        self.size, self.patch = size, patch
        self.total: Tensor | None = None
        self.weight: Tensor | None = None

    def add(self, box: Box, maps: Tensor, kept: Tensor | None) -> None:
        """Lay ``maps`` (heads, Q, gh, gw) of the window ``box`` on the grid; rows where ``kept`` (Q,) is False count
        for nothing."""
        y1, y2, x1, x2 = box
        ay = cell_overlap(y1, y2, self.size[0], self.patch, maps.device)
        ax = cell_overlap(x1, x2, self.size[1], self.patch, maps.device)
        rows = maps.new_ones(maps.shape[1]) if kept is None else kept.float()
        total = torch.einsum("Ii,hqij,Jj->hqIJ", ay, maps * rows[:, None, None], ax)
        weight = rows[:, None, None] * torch.outer(ay.sum(1), ax.sum(1))
        self.total = total if self.total is None else self.total + total
        self.weight = weight if self.weight is None else self.weight + weight

    def result(self) -> np.ndarray:
        return (self.total / self.weight).cpu().numpy()  # 0 / 0: NaN where no window gave weights


def record_window(model: Segmentor, crop: Tensor, taps: list[Tap], ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per tap: the (heads, Q, gh, gw) weights of one window ``crop`` (1, 3, h, w) on its patch grid, and (Q,) whether
    the window has each row (False: a RankSeg class it did not keep)."""
    p = model.patch_size
    grid = (-(-crop.shape[2] // p), -(-crop.shape[3] // p))
    stored: dict[str, Tensor] = {}
    with ExitStack() as stack:
        for tap in taps:
            recorder = AttentionRecorder(partial(tap.rows, ids=ids), partial(stored.__setitem__, tap.name))
            stack.enter_context(recording(tap.attention, recorder))
        output = model(crop)
    results = {}
    for tap in taps:
        weights = stored[tap.name][0]
        weights = weights[..., tap.keys(weights.shape[-1], grid[0] * grid[1])]
        kept = torch.ones(weights.shape[1], dtype=torch.bool, device=weights.device)
        if tap.slots:
            match = output.class_index[0][None, :] == ids[:, None]
            kept = match.any(1)
            weights = weights[:, match.float().argmax(1)]
        if tap.pooled is None:
            weights = weights.reshape(*weights.shape[:2], *grid)
        else:
            weights = spread_pooled(weights.reshape(*weights.shape[:2], tap.pooled, tap.pooled), grid)
        results[tap.name] = (weights, kept)
    return results


def spread_pooled(weights: Tensor, grid: tuple[int, int]) -> Tensor:
    """(..., s, s) weights on pooled cells -> (..., gh, gw) on the patches: patch i of gh takes pooled cell
    floor(i * s / gh) (the adaptive pooling bin it falls in), whose weight is shared evenly among its patches."""
    s = weights.shape[-1]
    iy = torch.arange(grid[0], device=weights.device) * s // grid[0]
    ix = torch.arange(grid[1], device=weights.device) * s // grid[1]
    share = torch.outer(torch.bincount(iy, minlength=s)[iy], torch.bincount(ix, minlength=s)[ix])
    return weights[..., iy, :][..., ix] / share


def attention_maps(model: Segmentor, image: Tensor, label: np.ndarray, cfg: EvalConfig,
                   plan: AttentionPlan) -> AttentionMaps:
    """The maps of ``plan`` for the preprocessed ``image`` (3, h, w) whose prediction is ``label`` (H, W), windows as
    ``cfg`` says, in the model's parameters' precision or under the caller's autocast (a model whose matrix layers
    ``prepare_for_precision`` converted needs it)."""
    class_ids = classes_to_show(plan, label)
    dtype = next(model.parameters()).dtype
    image = image[None].to(dtype)
    size = (image.shape[2], image.shape[3])
    boxes = [(0, size[0], 0, size[1])] if cfg.mode == "whole" else window_boxes(size, cfg.crop_size, cfg.stride)
    ids = torch.tensor(class_ids, dtype=torch.long, device=image.device)
    canvases = {tap.name: Canvas(size, model.patch_size) for tap in plan.taps}
    with torch.inference_mode():
        for y1, y2, x1, x2 in boxes:
            for name, (maps, kept) in record_window(model, image[..., y1:y2, x1:x2], plan.taps, ids).items():
                canvases[name].add((y1, y2, x1, x2), maps.float(), kept)
    names = [plan.class_names[c] for c in class_ids]
    return AttentionMaps(
        heads={name: canvas.result() for name, canvas in canvases.items()},
        queries={tap.name: ["cls"] if tap.class_tokens == 0 else names for tap in plan.taps},
        classes=np.array(class_ids, dtype=np.int64), class_names=names, patch_size=model.patch_size,
        input_size=size, image_size=(label.shape[0], label.shape[1]))
