"""``model.loss.pixel_terms``: each term against an independent computation on small cases (hand-written per-pixel
loops, torch's weighted cross-entropy, IoU of hard predictions, the Choquet-integral form of the Lovász extension),
ignored pixels, and what a RankSeg model's terms see."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segrank import build_model
from segrank.config import LossConfig, PixelTermConfig
from segrank.models import losses as L
from segrank.models.pixel_losses import PIXEL_TERMS, pixel_loss

IGNORE = 255


def case(B: int = 2, C: int = 4, H: int = 3, W: int = 5, seed: int = 0, ignored: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g) * 2
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < ignored] = IGNORE
    return logits, target


def loss_of(logits, target, class_index=None, **term):
    cfg = LossConfig(pixel_terms=[PixelTermConfig(**term)])
    return pixel_loss(logits, target, IGNORE, cfg, class_index)


def softmax_at(logits, b, y, x):
    row = [float(v) for v in logits[b, :, y, x]]
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def pixels(target):
    B, H, W = target.shape
    return [(b, y, x, int(target[b, y, x])) for b in range(B) for y in range(H) for x in range(W)]


def test_the_table_holds_exactly_the_term_types_the_config_accepts():
    accepted = typing.get_args(typing.get_type_hints(PixelTermConfig)["type"])
    assert set(PIXEL_TERMS) == set(accepted)


def test_without_terms_the_pixel_loss_is_the_reference_bit_for_bit():
    logits, target = case()
    for reduction in ("all_pixels", "valid_pixels"):
        ref = L.seg_cross_entropy(logits, target, IGNORE, reduction)
        assert torch.equal(pixel_loss(logits, target, IGNORE, LossConfig(seg_reduction=reduction)), ref)
    # the plain cross_entropy term is the same computation
    assert torch.equal(loss_of(logits, target), L.seg_cross_entropy(logits, target, IGNORE, "all_pixels"))
    assert torch.equal(loss_of(logits, target, avg_non_ignore=True),
                       L.seg_cross_entropy(logits, target, IGNORE, "valid_pixels"))


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_weighted_cross_entropy_is_torchs_weighted_pixel_loss_over_the_pixel_count(avg_non_ignore):
    logits, target = case(C=4)
    weights = [0.5, 2.0, 1.0, 3.0]
    per_pixel = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=IGNORE, reduction="none")
    count = (target != IGNORE).sum() if avg_non_ignore else target.numel()
    got = loss_of(logits, target, class_weight=weights, avg_non_ignore=avg_non_ignore)
    torch.testing.assert_close(got, per_pixel.sum() / count)
    # and by hand: sum over labelled pixels of w[y] * -log p_y
    hand = sum(weights[c] * -math.log(softmax_at(logits, b, y, x)[c]) for b, y, x, c in pixels(target) if c != IGNORE)
    assert float(got) == pytest.approx(hand / int(count), rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_is_the_per_pixel_formula(gamma):
    logits, target = case(seed=1)
    weights = [1.0, 0.25, 4.0, 2.0]
    got = loss_of(logits, target, type="focal", gamma=gamma, class_weight=weights)
    hand = 0.0
    for b, y, x, c in pixels(target):
        if c != IGNORE:
            p = softmax_at(logits, b, y, x)[c]
            hand += weights[c] * -((1 - p) ** gamma) * math.log(p)
    assert float(got) == pytest.approx(hand / target.numel(), rel=1e-5)
    if gamma == 0:
        torch.testing.assert_close(got, loss_of(logits, target, class_weight=weights))


def hand_dice(logits, target, smooth, weights, slots_per_image=None):
    B, C = logits.shape[:2]
    total = 0.0
    for b in range(B):
        inter, psum, tsum = [0.0] * C, [0.0] * C, [0.0] * C
        for bb, y, x, c in pixels(target):
            if bb != b or c == IGNORE:
                continue
            p = softmax_at(logits, b, y, x)
            for k in range(C):
                psum[k] += p[k]
            inter[c] += p[c]
            tsum[c] += 1
        w = weights[b]
        losses = [w[k] * (1 - (2 * inter[k] + smooth) / (psum[k] + tsum[k] + smooth)) for k in range(C)]
        total += sum(losses) / (slots_per_image[b] if slots_per_image else C)
    return total / B


@pytest.mark.parametrize("smooth", [1.0, 0.1])
def test_dice_is_the_per_image_per_class_formula(smooth):
    logits, target = case(seed=2)
    weights = [1.0, 2.0, 0.5, 0.0]
    got = loss_of(logits, target, type="dice", smooth=smooth, class_weight=weights)
    assert float(got) == pytest.approx(hand_dice(logits, target, smooth, [weights] * 2), rel=1e-5)


def iou_loss_of_hard_predictions(pred, target):
    """Per image: mean over the classes present in the labels of 1 - IoU(prediction, label) on labelled pixels."""
    out = []
    for b in range(target.shape[0]):
        t, p = target[b].numpy(), pred[b].numpy()
        keep = t != IGNORE
        t, p = t[keep], p[keep]
        out.append(np.mean([1 - ((t == c) & (p == c)).sum() / ((t == c) | (p == c)).sum() for c in np.unique(t)])
                   if t.size else 0.0)
    return float(np.mean(out))


def test_lovasz_of_certain_predictions_is_the_jaccard_loss():
    """With probabilities exactly 0 or 1 the Lovász extension equals the set function: 1 - IoU per present class."""
    _, target = case(B=3, C=4, H=6, W=6, seed=3)
    pred = torch.randint(0, 4, target.shape, generator=torch.Generator().manual_seed(4))
    logits = F.one_hot(pred, 4).permute(0, 3, 1, 2).float() * 200 - 100  # softmax is exactly one-hot in float32
    got = loss_of(logits, target, type="lovasz")
    assert float(got) == pytest.approx(iou_loss_of_hard_predictions(pred, target), rel=1e-6)


def choquet_jaccard(errors, fg):
    """The Lovász extension of the Jaccard loss as the integral over thresholds t of the loss of the set of pixels
    whose error is >= t (a formula independent of the sorting algorithm)."""
    levels = sorted(set(errors.tolist()) | {0.0})
    total = 0.0
    for lo, hi in zip(levels[:-1], levels[1:], strict=True):
        wrong = errors >= hi
        intersection = (fg & ~wrong).sum()
        union = (fg | wrong).sum()
        total += (hi - lo) * (1 - intersection / union)
    return total


def test_lovasz_of_soft_predictions_is_the_choquet_integral_of_the_jaccard_loss():
    logits, target = case(B=2, C=3, H=4, W=4, seed=5)
    weights = [1.0, 3.0, 0.5]
    got = loss_of(logits, target, type="lovasz", class_weight=weights)
    prob = F.softmax(logits.double(), 1).numpy()
    per_image = []
    for b in range(2):
        t = target[b].numpy()
        keep = t != IGNORE
        classes = np.unique(t[keep])
        per_image.append(np.mean([weights[c] * choquet_jaccard(np.abs((t[keep] == c) - prob[b, c][keep]),
                                                                 t[keep] == c) for c in classes]))
    assert float(got) == pytest.approx(float(np.mean(per_image)), rel=1e-5)


@pytest.mark.parametrize("term", [{"type": "cross_entropy", "class_weight": [1, 2, 3, 4]},
                                  {"type": "focal", "avg_non_ignore": True}, {"type": "dice"}, {"type": "lovasz"}])
def test_ignored_pixels_neither_count_nor_receive_gradient(term):
    logits, target = case(seed=6)
    ignored = (target == IGNORE)[:, None].expand_as(logits)
    logits.requires_grad_(True)
    loss = loss_of(logits, target, **term)
    loss.backward()
    assert float(loss.detach()) > 0 and logits.grad[ignored].abs().max() == 0 and logits.grad[~ignored].abs().max() > 0
    changed = logits.detach().clone()
    changed[ignored] = torch.randn(int(ignored.sum())) * 10
    assert float(loss_of(changed, target, **term)) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_an_image_without_labelled_pixels_adds_nothing_but_counts():
    logits, target = case(B=2, seed=7, ignored=0.0)
    empty = target.clone()
    empty[1] = IGNORE
    for term in ({"type": "lovasz"}, {"type": "dice"}):
        one = loss_of(logits[:1], target[:1], **term)
        assert float(loss_of(logits, empty, **term)) == pytest.approx(float(one) / 2, rel=1e-6)


def test_terms_add_up_with_their_weights():
    logits, target = case(seed=8)
    terms = [{"type": "cross_entropy", "weight": 1.0}, {"type": "dice", "weight": 0.5},
             {"type": "lovasz", "weight": 0.25}, {"type": "focal", "weight": 2.0}]
    cfg = LossConfig(pixel_terms=[PixelTermConfig(**t) for t in terms])
    parts = [t["weight"] * loss_of(logits, target, type=t["type"]) for t in terms]
    torch.testing.assert_close(pixel_loss(logits, target, IGNORE, cfg), sum(parts))


# ---------------------------------------------------------------------------------------------------------------
# RankSeg: the k selected classes


def sparse_case(seed: int = 9):
    """Slot logits over k=3 slots whose classes are ``class_index`` out of 6, and rank-remapped labels."""
    g = torch.Generator().manual_seed(seed)
    class_index = torch.tensor([[4, 0, 2], [5, 1, -1]])  # image 2: the GT oracle's padding slot
    labels = torch.randint(0, 6, (2, 4, 5), generator=g)
    labels[0, 0] = IGNORE
    slot_logits = torch.randn(2, 3, 4, 5, generator=g) * 2
    slot_logits[1, 2] = -100.0  # padding slots get the fill logit
    target = L.rank_remap(labels, class_index, 6, IGNORE)
    return slot_logits, target, class_index, labels


def test_rankseg_terms_see_the_selected_classes_with_their_class_weights():
    slot_logits, target, class_index, labels = sparse_case()
    class_weight = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # pixels of unselected classes are ignored
    selected = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(2):
        for c in class_index[b][class_index[b] >= 0]:
            selected[b] |= labels[b] == c
    assert torch.equal(target != IGNORE, selected)
    # cross-entropy: per image, torch's weighted loss with the selected classes' weights over the slots
    got = loss_of(slot_logits, target, class_index, class_weight=class_weight)
    expected = sum(F.cross_entropy(slot_logits[b:b + 1], target[b:b + 1], ignore_index=IGNORE, reduction="none",
                                   weight=torch.tensor([class_weight[int(c)] if c >= 0 else 0.0
                                                        for c in class_index[b]])).sum() for b in range(2))
    torch.testing.assert_close(got, expected / target.numel())
    # dice: over the k slots, the padding slot neither weighs nor counts
    weights = [[class_weight[int(c)] if c >= 0 else 0.0 for c in class_index[b]] for b in range(2)]
    got = loss_of(slot_logits, target, class_index, type="dice", class_weight=class_weight)
    assert float(got) == pytest.approx(hand_dice(slot_logits, target, 1.0, weights, slots_per_image=[3, 2]),
                                       rel=1e-5)


def test_rankseg_lovasz_is_over_the_slots_present():
    slot_logits, target, class_index, _ = sparse_case(seed=10)
    got = loss_of(slot_logits, target, class_index, type="lovasz", class_weight=[1.0] * 6)
    assert torch.allclose(got, loss_of(slot_logits, target, None, type="lovasz"))  # unit weights: slots as classes
    hard = slot_logits.argmax(1)
    certain = F.one_hot(hard, 3).permute(0, 3, 1, 2).float() * 200 - 100
    assert float(loss_of(certain, target, class_index, type="lovasz")) == pytest.approx(
        iou_loss_of_hard_predictions(hard, target), rel=1e-6)


def tiny_model(head: str, terms: list[dict] | None):
    cfg = {"num_classes": 6, "backbone": {"embed_dim": 32, "num_heads": 2, "depth": 1, "patch_size": 8,
                                          "pos_embed_grid": [2, 2], "drop_path_rate": 0.0},
           "head": {"type": head, "n_layers": 2, "topk": 3, "downsample": None, "dropout": 0.0},
           "loss": {"pixel_terms": terms}}
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("head", ["segmenter", "rankseg", "rankseg_gt"])
def test_models_train_on_every_term(head):
    terms = [{"type": "cross_entropy", "class_weight": [1, 2, 3, 1, 1, 0.5], "avg_non_ignore": True},
             {"type": "dice", "weight": 0.5}, {"type": "focal", "weight": 0.5}, {"type": "lovasz", "weight": 0.5}]
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 6, (2, 16, 16), generator=torch.Generator().manual_seed(2))
    labels[:, :2] = IGNORE
    present = L.presence_targets(labels, 6, IGNORE).bool()
    reference, model = tiny_model(head, None), tiny_model(head, terms)
    out = model(images, present if head == "rankseg_gt" else None)
    losses = model.loss(out, labels, IGNORE)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    ref_out = reference(images, present if head == "rankseg_gt" else None)
    assert float(reference.loss(ref_out, labels, IGNORE)["loss_seg"]) != pytest.approx(float(losses["loss_seg"]))
