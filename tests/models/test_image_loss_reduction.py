"""``loss.image_reduction``: the reference's mean over B * n, or a sum over classes averaged over images."""

from __future__ import annotations

import pytest
import torch

from segrank import build_model
from segrank.models import losses as L


@pytest.mark.parametrize("loss", ["asl", "bce"])
def test_sum_classes_is_mean_times_num_classes(loss):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g) * 3
    targets = (torch.rand(3, 7, generator=g) < 0.3).float()
    fn = {"asl": lambda r: L.asymmetric_loss(logits, targets, 2.0, 0.0, 0.05, reduction=r),
          "bce": lambda r: L.bce_image_loss(logits, targets, reduction=r)}[loss]
    assert fn("sum_classes") == pytest.approx(float(fn("mean")) * 7, rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        fn("sum")


def test_model_loss_uses_the_configured_reduction():
    cfg = {"num_classes": 12, "backbone": {"embed_dim": 32, "num_heads": 2, "depth": 1, "patch_size": 8,
                                           "pos_embed_grid": [2, 2], "drop_path_rate": 0.0},
           "head": {"type": "rankseg", "n_layers": 2, "topk": 4, "downsample": None, "dropout": 0.0},
           "loss": {"image_loss": "asl", "image_loss_weight": 2.0}}
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 12, (2, 16, 16), generator=torch.Generator().manual_seed(2))
    losses = {}
    for reduction in ("mean", "sum_classes"):
        torch.manual_seed(0)
        model = build_model(cfg | {"loss": cfg["loss"] | {"image_reduction": reduction}})
        losses[reduction] = {k: float(v) for k, v in model.loss(model(images), labels, 255).items()}
    assert losses["sum_classes"]["loss_img"] == pytest.approx(losses["mean"]["loss_img"] * 12, rel=1e-5)
    assert losses["sum_classes"]["loss_seg"] == losses["mean"]["loss_seg"]
