"""The pixel loss of ``model.loss.pixel_terms``: a weighted sum of cross-entropy, soft Dice, softmax focal and
Lovász-softmax terms (docs/losses.md), or, without terms, the reference cross-entropy.

Every term sees the logits (B, C, H, W) and the target (B, H, W) of the channel each pixel belongs to, with the
ignore value where it is not labelled. Dense heads: channel c is class c. RankSeg: the C = k channels are the slots of
the classes each image selected (``class_index``), the target is ``rank_remap``'s (a pixel whose class was not
selected is ignored), a class weight applies to the slot of its class, and Dice and Lovász average over slots; the
GT oracle's padding slots (class -1) carry no class and weigh 0.

``class_weight`` follows mmseg: per-pixel terms multiply each pixel's loss by the weight of its class and divide the
sum by all pixels (or, with ``avg_non_ignore``, the labelled ones), not by the sum of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from segrank.config import LossConfig, PixelTermConfig
from segrank.models.losses import seg_cross_entropy


@dataclass
class PixelBatch:
    """What a term sees. class_index (B, C): RankSeg's class of each channel (-1: padding); None for dense heads."""

    logits: Tensor  # (B, C, H, W) float32
    target: Tensor  # (B, H, W) int64 channel ids; ignore_index where not labelled
    ignore_index: int
    class_index: Tensor | None = None

    @property
    def labelled(self) -> Tensor:
        """(B, H, W) bool: pixels that carry a channel."""
        return self.target != self.ignore_index

    def safe_target(self) -> Tensor:
        """The target with ignored pixels on channel 0 (mask them with ``labelled``)."""
        return torch.where(self.labelled, self.target, 0)

    def channel_weights(self, class_weight: list[float] | None) -> Tensor:
        """(B, C) weight of each channel's class: 1 without class weights, 0 for padding slots."""
        B, C = self.logits.shape[:2]
        weights = self.logits.new_tensor(class_weight) if class_weight is not None else None
        if self.class_index is None:
            return weights.expand(B, C) if weights is not None else self.logits.new_ones(B, C)
        padding = self.class_index < 0
        if weights is None:
            return (~padding).to(self.logits.dtype)
        return weights[self.class_index.clamp(min=0)].masked_fill(padding, 0.0)

    def pixel_weights(self, class_weight: list[float] | None) -> Tensor:
        """(B, H, W) weight of each pixel's class (ignored pixels: 0)."""
        weights = self.channel_weights(class_weight)
        per_pixel = weights.gather(1, self.safe_target().flatten(1)).view_as(self.target)
        return per_pixel * self.labelled

    def reduce(self, pixel_loss: Tensor, avg_non_ignore: bool) -> Tensor:
        """Sum of the pixel losses / all pixels (the reference), or / labelled pixels (``avg_non_ignore``)."""
        if avg_non_ignore:
            return pixel_loss.sum() / self.labelled.sum().clamp(min=1)
        return pixel_loss.sum() / self.target.numel()


def cross_entropy_term(batch: PixelBatch, term: PixelTermConfig) -> Tensor:
    """-log p(target), times the class weight (mmseg's CrossEntropyLoss with class_weight and avg_non_ignore)."""
    loss = F.cross_entropy(batch.logits, batch.target, ignore_index=batch.ignore_index, reduction="none")
    if term.class_weight is not None:
        loss = loss * batch.pixel_weights(term.class_weight)
    return batch.reduce(loss, term.avg_non_ignore)


def focal_term(batch: PixelBatch, term: PixelTermConfig) -> Tensor:
    """Softmax focal loss -(1 - p)^gamma log p of the target (Lin et al.), times the class weight."""
    log_p = F.log_softmax(batch.logits, 1).gather(1, batch.safe_target()[:, None])[:, 0]
    loss = -((1 - log_p.exp()).pow(term.gamma) * log_p) * batch.pixel_weights(term.class_weight)
    return batch.reduce(loss, term.avg_non_ignore)


def dice_term(batch: PixelBatch, term: PixelTermConfig) -> Tensor:
    """Soft Dice per image and channel, 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth) over the labelled
    pixels; the class-weighted sum over channels / the number of channels (mmseg), averaged over the images."""
    B, C = batch.logits.shape[:2]
    labelled = batch.labelled.flatten(1).to(batch.logits.dtype)
    prob = F.softmax(batch.logits, 1).flatten(2) * labelled[:, None]
    target = batch.safe_target().flatten(1)
    hits = prob.gather(1, target[:, None])[:, 0] * labelled  # p of each pixel's own channel
    intersection = prob.new_zeros(B, C).scatter_add(1, target, hits)
    target_sum = prob.new_zeros(B, C).scatter_add(1, target, labelled)
    dice = (2 * intersection + term.smooth) / (prob.sum(2) + target_sum + term.smooth)
    weights = batch.channel_weights(term.class_weight)
    channels = C if batch.class_index is None else (batch.class_index >= 0).sum(1).clamp(min=1)
    return (((1 - dice) * weights).sum(1) / channels).mean()


def lovasz_grad(fg_sorted: Tensor) -> Tensor:
    """(n, P) gradient of the Jaccard loss's Lovász extension for errors sorted in decreasing order (Berman et al.,
    Alg. 1), one row per class."""
    fg_total = fg_sorted.sum(1, keepdim=True)
    intersection = fg_total - fg_sorted.cumsum(1)
    union = fg_total + (1 - fg_sorted).cumsum(1)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)


def lovasz_term(batch: PixelBatch, term: PixelTermConfig) -> Tensor:
    """Lovász-softmax per image over the channels present in its labelled pixels (the reference's per_image with
    classes='present': RankSeg's slots stand for other classes in each image), each channel's loss times its class
    weight, averaged over those channels, then over the images (an image without labelled pixels adds 0)."""
    prob = F.softmax(batch.logits, 1).flatten(2)
    weights = batch.channel_weights(term.class_weight)
    losses = []
    for b in range(prob.shape[0]):
        labelled = batch.labelled[b].flatten()
        target, p = batch.target[b].flatten()[labelled], prob[b][:, labelled]
        present = torch.unique(target)
        if present.numel() == 0:
            losses.append(prob[b].sum() * 0.0)
            continue
        fg = (target[None] == present[:, None]).to(p.dtype)  # (n, P)
        errors, order = (fg - p[present]).abs().sort(1, descending=True)
        per_class = (errors * lovasz_grad(fg.gather(1, order))).sum(1)
        losses.append((per_class * weights[b, present]).mean())
    return torch.stack(losses).mean()


# The one table from a term's name (model.loss.pixel_terms[].type) to its function.
PIXEL_TERMS: dict[str, Callable[[PixelBatch, PixelTermConfig], Tensor]] = {
    "cross_entropy": cross_entropy_term,
    "dice": dice_term,
    "focal": focal_term,
    "lovasz": lovasz_term,
}


def pixel_loss(logits: Tensor, target: Tensor, ignore_index: int, cfg: LossConfig,
               class_index: Tensor | None = None) -> Tensor:
    """The pixel loss of ``cfg``: the weighted sum of its pixel terms, or the reference cross-entropy without them.

    logits (B, C, H, W) at the target's size; target (B, H, W) channel ids (RankSeg: rank slots, ``class_index``
    (B, C) the class of each slot)."""
    if cfg.pixel_terms is None:
        return seg_cross_entropy(logits, target, ignore_index, cfg.seg_reduction)
    batch = PixelBatch(logits.float(), target.long(), ignore_index, class_index)
    terms = [term.weight * PIXEL_TERMS[term.type](batch, term) for term in cfg.pixel_terms]
    return torch.stack(terms).sum()
