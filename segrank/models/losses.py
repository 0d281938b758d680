"""Losses and training metrics of Segmenter and RankSeg.

Class histograms use ``bincount`` over valid pixels with an explicit ignore value (the reference's float
``histc`` only works because its ignore values happen to fall outside [0, n-1]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SEG_REDUCTIONS = ("all_pixels", "valid_pixels")


def class_histogram(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(B, H, W) integer labels -> (B, num_classes) int64 pixel counts; ignore and out-of-range values drop."""
    B = labels.shape[0]
    labels = labels.reshape(B, -1).long()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    offsets = torch.arange(B, device=labels.device)[:, None] * num_classes
    flat = (labels + offsets)[valid]
    return torch.bincount(flat, minlength=B * num_classes).view(B, num_classes)


def presence_targets(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(B, num_classes) float 0/1: which classes occur in each label map."""
    return (class_histogram(labels, num_classes, ignore_index) > 0).float()


def slot_lookup(class_index: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(B, num_classes + 1) table mapping class id -> rank slot, ignore for unselected classes.

    The extra last entry serves ignored/out-of-range pixels.
    """
    B, k = class_index.shape
    lut = torch.full((B, num_classes + 1), ignore_index, dtype=torch.long, device=class_index.device)
    slots = torch.arange(k, device=class_index.device).expand(B, k)
    index = torch.where(class_index < 0, num_classes, class_index)
    lut.scatter_(1, index, slots)
    lut[:, num_classes] = ignore_index
    return lut


def rank_remap(labels: Tensor, class_index: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Class labels (B, H, W) -> rank-slot labels; classes outside the selection and ignored pixels -> ignore."""
    B = labels.shape[0]
    lut = slot_lookup(class_index, num_classes, ignore_index)
    flat = labels.reshape(B, -1).long()
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    flat = torch.where(valid, flat, num_classes)
    return lut.gather(1, flat).view_as(labels)


def seg_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, reduction: str = "all_pixels") -> Tensor:
    """Pixel cross-entropy. ``all_pixels``: sum over valid pixels / all pixels (mmseg 0.17, the reference);
    ``valid_pixels``: mean over valid pixels."""
    if reduction not in SEG_REDUCTIONS:
        raise ValueError(f"seg reduction {reduction!r} is not one of {SEG_REDUCTIONS}")
    loss = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    if reduction == "all_pixels":
        return loss.sum() / target.numel()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)


def pixel_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of all pixels whose argmax equals the target (ignored pixels count in the denominator, as in
    mmseg's ``acc_seg``, which is 100 times this)."""
    hits = (logits.argmax(1) == target).sum()
    return (hits / target.numel()).float().reshape(1)


IMAGE_REDUCTIONS = ("mean", "sum_classes")


def reduce_image_loss(loss: Tensor, reduction: str) -> Tensor:
    """(B, n) per-class image losses -> scalar. ``mean``: sum / (B * n), the reference; ``sum_classes``: sum over the
    classes, mean over the images, as in the ASL paper, so the loss of one class does not shrink as 1/n when the
    vocabulary grows."""
    if reduction not in IMAGE_REDUCTIONS:
        raise ValueError(f"image loss reduction {reduction!r} is not one of {IMAGE_REDUCTIONS}")
    return loss.sum() / loss.shape[0] / (loss.shape[1] if reduction == "mean" else 1)


def bce_image_loss(image_logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    if reduction == "mean":  # the reference's call, bit for bit
        return F.binary_cross_entropy_with_logits(image_logits.float(), targets)
    loss = F.binary_cross_entropy_with_logits(image_logits.float(), targets, reduction="none")
    return reduce_image_loss(loss, reduction)


def asymmetric_loss(
    image_logits: Tensor,
    targets: Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> Tensor:
    """Asymmetric loss (Ridnik et al.) as in the RankSeg reference: the negative clip is always applied, and
    (``mean``) the sum is divided by B * n."""
    p = torch.sigmoid(image_logits.float())
    p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(p_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        pt = p * targets + p_neg * (1 - targets)
        gamma = gamma_pos * targets + gamma_neg * (1 - targets)
        loss = loss * torch.pow(1 - pt, gamma)
    return reduce_image_loss(-loss, reduction)


def _hits(hist: Tensor, class_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: labelled pixels of selected classes, selected classes present, number of valid slots."""
    valid = class_index >= 0
    idx = class_index.clamp(min=0)
    sel_pixels = (hist.gather(1, idx) * valid).sum(1).double()
    sel_present = ((hist.gather(1, idx) > 0) & valid).sum(1).double()
    return sel_pixels, sel_present, valid.sum(1).double()


def _nan_mean_or_one(values: Tensor) -> Tensor:
    finite = values[torch.isfinite(values)]
    return finite.mean().float() if finite.numel() else values.new_tensor(1.0).float()


def image_recall(hist: Tensor, class_index: Tensor) -> Tensor:
    """Mean over images of |present ∩ selected| / |present| (images without labels are skipped; reference
    ``acc_img``)."""
    _, sel_present, _ = _hits(hist, class_index)
    return _nan_mean_or_one(sel_present / (hist > 0).sum(1).double())


def image_precision(hist: Tensor, class_index: Tensor) -> Tensor:
    """Mean over images of |present ∩ selected| / k: the precision of the selection (the reference logs it as
    ``acc_img_accuracy``)."""
    _, sel_present, k = _hits(hist, class_index)
    return (sel_present / k.clamp(min=1)).mean().float()


def pixel_recall(hist: Tensor, class_index: Tensor) -> Tensor:
    """Mean over images of the fraction of labelled pixels whose class was selected (reference ``acc_pix``)."""
    sel_pixels, _, _ = _hits(hist, class_index)
    return _nan_mean_or_one(sel_pixels / hist.sum(1).double())
