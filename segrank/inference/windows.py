"""Test-time inference: whole or sliding-window, multi-scale + flip, results at the label's original size (mmseg 0.x
``slide_inference``/``whole_inference`` and ``MultiScaleFlipAug``).

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

Either way, an image whose (C, H, W) tensors would be large is made a band of pixels at a time (tiles.py): each
augmentation's windows are merged at its input size (the test scale, bounded), and each band is resized, soft-maxed,
averaged and arg-maxed on its own, so that no (C, H, W) tensor exists unless the probabilities are asked for. The
bands compute what the whole image would (tiles.py says where PyTorch's kernels let the last bit differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segrank.config import EvalConfig
from segrank.config.inference import MAX_TEST_SIDE
from segrank.data.transforms import rescale_size
from segrank.errors import SegrankError
from segrank.inference.tiles import Band, bands, pixels_per_band, resize_rows, rows_of
from segrank.models.output import FILL_LOGIT, SegOutput
from segrank.models.segmentor import Segmentor

Box = tuple[int, int, int, int]  # y1, y2, x1, x2
Aug = tuple[float, bool]  # scale ratio, horizontal flip


@dataclass
class ImageProbabilities:
    """One image's inference as tensors at its original size: class probabilities, their argmax, the selection.

    label: (H, W) int64 class ids. probs: (C, H, W) mean probability over the augmentations of the classes
    ``classes`` (C,) (all N classes on the dense path, the union of selected classes on the sparse one); None
    unless asked for (``predict_image(probabilities=True)``).
    selected: the union of the classes RankSeg selected in any window/augmentation (None for dense heads).
    image_scores: (N,) mean sigmoid of the image-level logits over windows and augmentations (RankSeg), else None.
    """

    label: Tensor
    probs: Tensor | None
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
        return rescale_size(*ori_size, (int(img_scale[0] * ratio), int(img_scale[1] * ratio)))
    return int(size[0] * ratio + 0.5), int(size[1] * ratio + 0.5)


def check_input_size(size: tuple[int, int], ratio: float, ms_flip: bool) -> None:
    """Refuse a test input beyond ``MAX_TEST_SIDE`` a side (the scale ratios times img_scale), before the model runs."""
    if max(size) > MAX_TEST_SIDE:
        scales = "eval.ms_scales" if ms_flip else "eval.scales"
        raise SegrankError(f"{scales}: scale {ratio:g} makes a test input of {size[0]}x{size[1]} pixels, above the "
                           f"limit of {MAX_TEST_SIDE} a side (lower the scale or img_scale)")


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
        # A model run in bf16/fp16 (inference/precision.py) returns low-precision logits: merging, resizing,
        # softmax and the augmentations' mean are fp32 (.float() of an fp32 tensor is the tensor itself).
        logits, image_logits = out.mask_logits.float(), None if out.image_logits is None else out.image_logits.float()
        for b, box in enumerate(chunk):
            results.append((box, SegOutput(
                logits[b:b + 1], out.num_classes,
                None if out.class_index is None else out.class_index[b:b + 1],
                None if image_logits is None else image_logits[b:b + 1])))
    return results


# Channels merged at a time: the canvas of the largest scale then holds this many channels, not all of them. A multiple
# of 16, as on tiny grids PyTorch's bilinear kernel vectorises over groups of up to 16 channels and a chunk that
# split a group would round differently from the whole tensor.
CHANNEL_CHUNK = 32


def merge_windows(model: Segmentor, outputs: list[tuple[Box, SegOutput]], size: tuple[int, int],
                  classes: Tensor) -> Tensor:
    """Average the windows' logits of ``classes`` (C,) on a (1, C, H, W) canvas; a RankSeg window's unselected
    classes count as -100 exactly as in the reference's dense canvas."""
    num_classes = outputs[0][1].num_classes
    first = outputs[0][1].mask_logits
    canvas = first.new_zeros(1, len(classes), *size)
    count = first.new_zeros(1, 1, *size)
    slot_of = torch.full((num_classes,), -1, dtype=torch.long, device=first.device)
    slot_of[classes] = torch.arange(len(classes), device=first.device)
    for (y1, y2, x1, x2), out in outputs:
        if not out.is_sparse:
            grid = out.mask_logits[:, classes]
        else:
            index, logits = out.class_index[0], out.mask_logits[0]
            slot = slot_of[index.clamp(min=0)]
            keep = (index >= 0) & (slot >= 0)  # index -1: GT-oracle padding slot
            grid = logits.new_full((1, len(classes), *logits.shape[1:]), FILL_LOGIT)
            grid[0, slot[keep]] = logits[keep]
        canvas[..., y1:y2, x1:x2] += model.to_input_size(grid, (y2 - y1, x2 - x1))
        count[..., y1:y2, x1:x2] += 1
    return canvas.div_(count)


def original_size_logits(model: Segmentor, outputs: list[tuple[Box, SegOutput]], size: tuple[int, int],
                         ori_size: tuple[int, int], classes: Tensor, flip: bool) -> Tensor:
    """(1, C, *ori_size) logits of one augmentation: windows merged at its input ``size``, resized to the original
    size, un-flipped. Done ``CHANNEL_CHUNK`` channels at a time (each channel's arithmetic is independent), so the
    largest tensor held is this result rather than a canvas of the largest scale."""
    logits = outputs[0][1].mask_logits.new_empty(1, len(classes), *ori_size)
    for start in range(0, len(classes), CHANNEL_CHUNK):
        part = merge_windows(model, outputs, size, classes[start:start + CHANNEL_CHUNK])
        if size != ori_size:
            part = F.interpolate(part, size=ori_size, mode="bilinear", align_corners=False)
        logits[:, start:start + CHANNEL_CHUNK] = part.flip(-1) if flip else part
    return logits


# exp(x) for x < -87 is subnormal in fp32, where the vectorised exp is ~13x slower; -100-filled channels land there.
# Raising such exponents to -87 changes only probabilities below 2e-38, too small to move any sum or argmax.
EXP_FLOOR = -87.0


def softmax_with_fill(logits: Tensor, num_missing: int) -> Tensor:
    """Softmax over dim 1 of ``logits`` plus ``num_missing`` further channels whose logit is -100 everywhere.
    Computed in place in ``logits`` (the sparse path's largest tensors), which it returns."""
    top = logits.amax(1, keepdim=True).clamp_(min=FILL_LOGIT)
    e = logits.sub_(top).clamp_(min=EXP_FLOOR).exp_()
    total = e.sum(1, keepdim=True)
    if num_missing:
        total += (FILL_LOGIT - top).clamp_(min=EXP_FLOOR).exp_() * num_missing
    return e.div_(total)


def class_softmax(logits: Tensor, num_classes: int) -> Tensor:
    """Softmax over dim 1 of (1, C, ...) ``logits`` of C of the ``num_classes`` classes (the others: -100)."""
    if logits.shape[1] == num_classes:
        return logits.softmax(1)
    return softmax_with_fill(logits, num_classes - logits.shape[1])


Run = tuple[bool, tuple[int, int], list[tuple[Box, SegOutput]]]  # flip, input size, window outputs


def whole_image_probs(model: Segmentor, runs: list[Run], ori_size: tuple[int, int], classes: Tensor,
                      num_classes: int) -> Tensor:
    """(C, H, W) mean probabilities of ``classes`` over the augmentations, every class at full size at once."""
    probs = None
    for flip, aug_size, outs in runs:
        p = class_softmax(original_size_logits(model, outs, aug_size, ori_size, classes, flip), num_classes)
        probs = p if probs is None else probs.add_(p)
    return probs[0].div_(len(runs))


def merged_canvas(model: Segmentor, outputs: list[tuple[Box, SegOutput]], size: tuple[int, int],
                  classes: Tensor) -> Tensor:
    """(1, C, *size) merged logits of one augmentation at its input size, made ``CHANNEL_CHUNK`` channels at a
    time as ``original_size_logits`` makes them."""
    canvas = outputs[0][1].mask_logits.new_empty(1, len(classes), *size)
    for start in range(0, len(classes), CHANNEL_CHUNK):
        chunk = slice(start, start + CHANNEL_CHUNK)
        canvas[:, chunk] = merge_windows(model, outputs, size, classes[chunk])
    return canvas


def band_logits(canvas: Tensor, ori_size: tuple[int, int], band: Band, flip: bool) -> Tensor:
    """(1, C, pixels) logits of the pixels ``band`` (row-major) of ``original_size_logits``: the canvas resized to
    the original size, un-flipped; made from the rows that hold them, ``CHANNEL_CHUNK`` channels at a time."""
    rows = rows_of(band, ori_size[1])
    logits = canvas.new_empty(1, canvas.shape[1], len(range(*rows)), ori_size[1])
    for start in range(0, canvas.shape[1], CHANNEL_CHUNK):
        part = resize_rows(canvas[:, start:start + CHANNEL_CHUNK], ori_size, rows)
        logits[:, start:start + CHANNEL_CHUNK] = part.flip(-1) if flip else part
    first = rows[0] * ori_size[1]
    return logits.flatten(2)[..., band[0] - first:band[1] - first].contiguous()


def banded_prediction(model: Segmentor, runs: list[Run], ori_size: tuple[int, int], classes: Tensor,
                      num_classes: int, pixels: int, probabilities: bool) -> tuple[Tensor, Tensor | None]:
    """The label map (and, if asked, the (C, H, W) mean probabilities) made ``pixels`` pixels at a time: what
    ``whole_image_probs`` computes, from the augmentations' merged logits at their input sizes, with every (C, H, W)
    tensor but the asked-for probabilities replaced by (C, pixels) ones."""
    canvases = [(flip, merged_canvas(model, outs, aug_size, classes)) for flip, aug_size, outs in runs]
    label = torch.empty(ori_size, dtype=torch.long, device=classes.device)
    probs = canvases[0][1].new_empty(len(classes), *ori_size) if probabilities else None
    for band in bands(ori_size[0] * ori_size[1], pixels):
        mean = None
        for flip, canvas in canvases:
            p = class_softmax(band_logits(canvas, ori_size, band, flip), num_classes)
            mean = p if mean is None else mean.add_(p)
        mean = mean[0].div_(len(canvases))
        label.view(-1)[band[0]:band[1]] = classes[mean.argmax(0)]
        if probs is not None:
            probs.view(len(classes), -1)[:, band[0]:band[1]] = mean
    return label, probs


@torch.no_grad()
def predict_image(model: Segmentor, image: Tensor, ori_size: tuple[int, int], cfg: EvalConfig, *,
                  ms_flip: bool = False, present: Tensor | None = None, img_scale: tuple[int, int] | None = None,
                  dense: bool = False, probabilities: bool = False) -> ImageProbabilities:
    """Segment one normalised test-size image (3, H, W); the result is at ``ori_size``.

    present: (N,) bool classes of the label (GT oracle: every window receives them). dense: force the reference
    (1, N, H, W) computation even for RankSeg models. probabilities: also return the (C, H, W) mean probabilities
    (their memory grows with the image; without them a large image is segmented a band of pixels at a time, with
    identical labels, and its memory stays bounded by the test scale).
    """
    image = image[None] if image.dim() == 3 else image
    present = None if present is None else present.reshape(1, -1)
    size, ori_size = tuple(image.shape[-2:]), tuple(ori_size)
    runs: list[Run] = []
    for ratio, flip in augmentations(cfg, ms_flip):
        aug_size = scaled_size(size, ratio, ori_size, img_scale)
        check_input_size(aug_size, ratio, ms_flip)
        runs.append((flip, aug_size, run_windows(model, _augmented(image, aug_size, flip), cfg, present)))

    outputs = [out for _, _, outs in runs for _, out in outs]
    num_classes = outputs[0].num_classes
    sparse = outputs[0].is_sparse
    selected = image_scores = None
    if sparse:
        index = torch.cat([out.class_index.reshape(-1) for out in outputs])
        selected = torch.unique(index[index >= 0])
        if outputs[0].image_logits is not None:
            image_scores = torch.cat([out.image_logits for out in outputs]).sigmoid().mean(0)
    classes = selected if sparse and not dense else torch.arange(num_classes, device=image.device)

    pixels = pixels_per_band(ori_size, len(classes), sum(len(classes) * h * w for _, (h, w), _ in runs))
    if pixels is None:
        probs = whole_image_probs(model, runs, ori_size, classes, num_classes)
        label = classes[probs.argmax(0)]
    else:
        label, probs = banded_prediction(model, runs, ori_size, classes, num_classes, pixels, probabilities)
    return ImageProbabilities(label, probs if probabilities else None, classes, selected, image_scores)
