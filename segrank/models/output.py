"""The typed result of a segmentation forward pass, and what a decode head declares about the result it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

FILL_LOGIT = -100.0  # logit the RankSeg reference gives to classes that were not selected


@dataclass
class SegOutput:
    """Patch-grid logits of a Segmenter (dense) or RankSeg (sparse) model.

    mask_logits: (B, C, h, w). Dense heads: C = num_classes and channel c is class c. RankSeg: C = k rank slots and
        channel r belongs to class ``class_index[b, r]``.
    class_index: (B, k) int64 class of each slot, most confident first (GT oracle: ascending ids); -1 marks a
        padding slot (GT oracle, images with fewer present classes). None for dense heads.
    image_logits: (B, num_classes) image-level multi-label logits (RankSeg), else None.
    """

    mask_logits: Tensor
    num_classes: int
    class_index: Tensor | None = None
    image_logits: Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        return self.class_index is not None

    def dense(self, fill: float = FILL_LOGIT) -> Tensor:
        """(B, num_classes, h, w) logits; unselected classes get ``fill`` (the reference's -100)."""
        if not self.is_sparse:
            return self.mask_logits
        return densify(self.mask_logits, self.class_index, self.num_classes, fill)


def densify(slot_logits: Tensor, class_index: Tensor, num_classes: int, fill: float = FILL_LOGIT) -> Tensor:
    """Scatter (B, k, ...) slot logits into (B, num_classes, ...) filled with ``fill``; slots with index -1 drop."""
    B, k = class_index.shape
    spatial = slot_logits.shape[2:]
    # Padding slots (-1) go to an extra channel that is cut off afterwards.
    index = torch.where(class_index < 0, num_classes, class_index)
    out = slot_logits.new_full((B, num_classes + 1, *spatial), fill)
    index = index.view(B, k, *([1] * len(spatial))).expand(B, k, *spatial)
    out.scatter_(1, index, slot_logits)
    return out[:, :num_classes]


class DecodeHead(nn.Module):
    """Base of the decode heads. ``forward(feature_map, class_tokens)`` takes the backbone's (B, D, h, w) patch
    features and its (B, N, D) class tokens (None without OCE) and returns a ``SegOutput``; the attributes below say
    what that output is, so that prediction and export read them instead of testing the head's type.

    needs_present_classes: ``forward`` takes a third argument, the (B, N) bool classes present in each image's label
        (GT oracle); such a model cannot segment unlabelled images nor be exported.
    topk: number of rank slots per image, when fixed (a top-k head: the classes kept per image), else None.
    output_names: the tensors an exported graph returns, in order, named after the ``SegOutput`` fields they come
        from: ``logits`` (``mask_logits`` at the input size), ``class_index``, ``image_logits``.
    """

    needs_present_classes: ClassVar[bool] = False
    output_names: ClassVar[tuple[str, ...]] = ("logits",)
    topk: int | None = None
