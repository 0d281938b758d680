"""Test-time inference: whole or sliding-window, multi-scale + flip, results at the label's original size (spec §9).

The reference (mmseg ``EncoderDecoder.inference`` / ``aug_test``), per augmentation (scale r, flip f):
windows -> per-window logits over all N classes mapped onto the window (RankSeg: -100 for the classes the window did
not select) -> sum / per-pixel count -> bilinear resize to the original size -> softmax -> un-flip; the mean of the
augmentations' probabilities is the prediction, its argmax the label map.

Two ways to compute it, sharing the same model calls:
- dense: exactly the above with (1, N, H, W) tensors (dense Segmenter models, and the reference for tests);
- sparse (RankSeg): every tensor at image resolution has one channel per class of U, the union of the classes any
  window of any augmentation selected. Within U the arithmetic is the dense one channel by channel (a window's
  unselected classes of U still contribute -100 to the average); every class outside U has logit -100 at every
  pixel of every augmentation, so it enters the softmax only as ``(N - |U|) * exp(-100 - max)`` in the denominator.
  Probabilities of U equal the dense ones, the argmax is the same, and memory grows with |U|, not with N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segrank.config import EvalConfig
from segrank.models.output import FILL_LOGIT, SegOutput
from segrank.models.segmentor import Segmentor

Box = tuple[int, int, int, int]  # y1, y2, x1, x2
Aug = tuple[float, bool]  # scale ratio, horizontal flip


@dataclass
class Prediction:
    """One image's result at its original size.

    label: (H, W) int64 class ids. probs: (C, H, W) mean probability over the augmentations of the classes
    ``classes`` (C,) (all N classes on the dense path, the union of selected classes on the sparse one).
    selected: the union of the classes RankSeg selected in any window/augmentation (None for dense heads).
    image_scores: (N,) mean sigmoid of the image-level logits over windows and augmentations (RankSeg), else None.
    """

    label: Tensor
    probs: Tensor
    classes: Tensor
    selected: Tensor | None = None
    image_scores: Tensor | None = None


def window_boxes(size: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]) -> list[Box]:
    """mmseg ``slide_inference`` windows: a grid of stride steps, the last window of a row/column shifted back to end at
    the border; an image side smaller than the crop gives windows of that side's size (processed at native size)."""
    (H, W), (hc, wc), (hs, ws) = size, crop, stride
    boxes = []
    for i in range(max(H - hc + hs - 1, 0) // hs + 1):
        for j in range(max(W - wc + ws - 1, 0) // ws + 1):
            y2, x2 = min(i * hs + hc, H), min(j * ws + wc, W)
            boxes.append((max(y2 - hc, 0), y2, max(x2 - wc, 0), x2))
    return boxes


def augmentations(cfg: EvalConfig, ms_flip: bool = False) -> list[Aug]:
    """(ratio, flip) pairs in mmseg ``MultiScaleFlipAug`` order: scales outer, flips inner."""
    scales = cfg.ms_scales if ms_flip else cfg.scales
    flips = (False, True) if ms_flip or cfg.flip else (False,)
    return [(r, f) for r in scales for f in flips]


def scaled_size(size: tuple[int, int], ratio: float, ori_size: tuple[int, int],
                img_scale: tuple[int, int] | None = None) -> tuple[int, int]:
    """Input size of scale ``ratio``. With the dataset's ``img_scale`` it is the reference's: the original image
    keep-ratio rescaled into ``int(img_scale * ratio)``; without it, the test-size input scaled by ``ratio``."""
    if ratio == 1.0:
        return size
    if img_scale is not None:
        from segrank.data.transforms import rescale_size

        return rescale_size(*ori_size, (int(img_scale[0] * ratio), int(img_scale[1] * ratio)))
    return int(size[0] * ratio + 0.5), int(size[1] * ratio + 0.5)


def _augmented(image: Tensor, size: tuple[int, int], flip: bool) -> Tensor:
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return image.flip(-1) if flip else image


def run_windows(model: Segmentor, image: Tensor, cfg: EvalConfig, present: Tensor | None = None
                ) -> list[tuple[Box, SegOutput]]:
    """Model outputs (patch grid, batch 1 each) of every window of ``image`` (1, 3, H, W), ``cfg.batch_size`` windows
    per forward pass (all windows of an image share one size)."""
    H, W = image.shape[-2:]
    boxes = [(0, H, 0, W)] if cfg.mode == "whole" else window_boxes((H, W), cfg.crop_size, cfg.stride)
    results = []
    for start in range(0, len(boxes), cfg.batch_size):
        chunk = boxes[start:start + cfg.batch_size]
        crops = torch.cat([image[..., y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = model(crops, None if present is None else present.expand(len(chunk), -1))
        for b, box in enumerate(chunk):
            results.append((box, SegOutput(
                out.mask_logits[b:b + 1], out.num_classes,
                None if out.class_index is None else out.class_index[b:b + 1],
                None if out.image_logits is None else out.image_logits[b:b + 1])))
    return results


def merge_windows(model: Segmentor, outputs: list[tuple[Box, SegOutput]], size: tuple[int, int],
                  classes: Tensor | None = None) -> Tensor:
    """Average the windows' logits on a (1, C, H, W) canvas. ``classes`` None: all N classes (``out.dense()``);
    else only those classes, a window's unselected ones at -100 exactly as in the dense canvas."""
    num_classes = outputs[0][1].num_classes
    channels = num_classes if classes is None else len(classes)
    first = outputs[0][1].mask_logits
    canvas = first.new_zeros(1, channels, *size)
    count = first.new_zeros(1, 1, *size)
    if classes is not None:
        slot_of = torch.full((num_classes,), -1, dtype=torch.long, device=first.device)
        slot_of[classes] = torch.arange(len(classes), device=first.device)
    for (y1, y2, x1, x2), out in outputs:
        if classes is None:
            grid = out.dense()
        else:
            index, logits = out.class_index[0], out.mask_logits[0]
            keep = index >= 0  # -1: GT-oracle padding slot
            grid = logits.new_full((1, channels, *logits.shape[1:]), FILL_LOGIT)
            grid[0, slot_of[index[keep]]] = logits[keep]
        canvas[..., y1:y2, x1:x2] += model.to_input_size(grid, (y2 - y1, x2 - x1))
        count[..., y1:y2, x1:x2] += 1
    return canvas / count


def softmax_with_fill(logits: Tensor, num_missing: int) -> Tensor:
    """Softmax over dim 1 of ``logits`` plus ``num_missing`` further channels whose logit is -100 everywhere."""
    if num_missing == 0:
        return logits.softmax(1)
    top = logits.amax(1, keepdim=True).clamp(min=FILL_LOGIT)
    e = (logits - top).exp()
    return e / (e.sum(1, keepdim=True) + num_missing * (FILL_LOGIT - top).exp())


def aug_logits(model: Segmentor, image: Tensor, cfg: EvalConfig, present: Tensor | None = None) -> Tensor:
    """Dense (1, N, H, W) logits of one input (mmseg ``slide_inference``/``whole_inference`` without rescale)."""
    outputs = run_windows(model, image, cfg, present)
    return merge_windows(model, outputs, tuple(image.shape[-2:]))


@torch.no_grad()
def predict_image(model: Segmentor, image: Tensor, ori_size: tuple[int, int], cfg: EvalConfig, *,
                  ms_flip: bool = False, present: Tensor | None = None, img_scale: tuple[int, int] | None = None,
                  dense: bool = False) -> Prediction:
    """Segment one normalised test-size image (3, H, W); the result is at ``ori_size``.

    present: (N,) bool classes of the label (GT oracle: every window receives them). dense: force the reference
    (1, N, H, W) computation even for RankSeg models.
    """
    image = image[None] if image.dim() == 3 else image
    present = None if present is None else present.reshape(1, -1)
    size, ori_size = tuple(image.shape[-2:]), tuple(ori_size)
    runs = []
    for ratio, flip in augmentations(cfg, ms_flip):
        aug_size = scaled_size(size, ratio, ori_size, img_scale)
        runs.append((flip, aug_size, run_windows(model, _augmented(image, aug_size, flip), cfg, present)))

    outputs = [out for _, _, outs in runs for _, out in outs]
    num_classes = outputs[0].num_classes
    sparse = outputs[0].class_index is not None
    selected = image_scores = None
    if sparse:
        index = torch.cat([out.class_index.reshape(-1) for out in outputs])
        selected = torch.unique(index[index >= 0])
        if outputs[0].image_logits is not None:
            image_scores = torch.cat([out.image_logits for out in outputs]).sigmoid().mean(0)
    classes = selected if sparse and not dense else None

    probs = None
    for flip, aug_size, outs in runs:
        logits = merge_windows(model, outs, aug_size, classes)
        if aug_size != ori_size:
            logits = F.interpolate(logits, size=ori_size, mode="bilinear", align_corners=False)
        p = softmax_with_fill(logits, 0 if classes is None else num_classes - len(classes))
        p = p.flip(-1) if flip else p
        probs = p if probs is None else probs + p
    probs = probs[0] / len(runs)
    if classes is None:
        classes = torch.arange(num_classes, device=probs.device)
    return Prediction(classes[probs.argmax(0)], probs, classes, selected, image_scores)
