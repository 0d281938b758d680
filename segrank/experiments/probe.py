"""``segrank benchmark learn --probe``: how well a *linear* multi-label classifier on the frozen stage-1 features
ranks each image's classes among N, to separate the features' quality from the optimisation of RankSeg's image-level
head. Features: the backbone's final patch map, average- and max-pooled over the image (a fixed operation, no
weights); classifier: one linear layer (2 x width -> N) trained with binary cross-entropy summed over classes, AdamW;
measured: recall@k on the validation scenes (the share of each image's classes among its k highest scores)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from segrank.checkpoints.vit_weights import load_backbone_weights
from segrank.config import Config
from segrank.data import build_dataset
from segrank.models.losses import presence_targets
from segrank.models.segmentor import Segmentor
from segrank.training.sampling import collate

PROBE_ITERS = 500
PROBE_BATCH = 64
PROBE_LR = 1e-2
PROBE_EVALS = 10


@torch.no_grad()
def pooled_features(model: Segmentor, cfg: Config, split: str, count: int) -> tuple[Tensor, Tensor]:
    """(count, 2D) mean- and max-pooled final patch features and (count, N) presence targets of ``split``."""
    dataset = build_dataset(cfg.data, split, train=False)
    feats, targets = [], []
    for start in range(0, min(count, len(dataset)), PROBE_BATCH):
        batch = collate([dataset[i] for i in range(start, min(start + PROBE_BATCH, count, len(dataset)))])
        fmap = model.backbone(batch["image"]).feature_map
        feats.append(torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], dim=1))
        targets.append(presence_targets(batch["label"], cfg.model.num_classes, dataset.info.ignore_index).float())
    return torch.cat(feats), torch.cat(targets)


def recall_at_k(logits: Tensor, targets: Tensor, k: int) -> float:
    """Mean over images of the share of their classes among the ``k`` highest scores."""
    top = torch.zeros_like(targets).scatter_(1, logits.topk(k, dim=1).indices, 1.0)
    return float(((top * targets).sum(1) / targets.sum(1).clamp(min=1)).mean())


def linear_probe(cfg: Config, train_images: int, val_images: int, topk: int, iters: int = PROBE_ITERS,
                 seed: int = 0) -> dict[str, Any]:
    """Fit the probe on ``train_images`` scenes of ``cfg``'s data with its ``train.pretrained`` backbone frozen;
    returns the recall@``topk`` curve on ``val_images`` validation scenes."""
    clock = time.perf_counter()
    torch.manual_seed(seed)
    model = Segmentor(cfg.model).eval()
    load_backbone_weights(model, cfg.train.pretrained)
    x_train, y_train = pooled_features(model, cfg, "train", train_images)
    x_val, y_val = pooled_features(model, cfg, cfg.data.val_split, val_images)
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)  # standardised: one lr fits every feature
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    probe = nn.Linear(x_train.shape[1], cfg.model.num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=PROBE_LR, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, iters + 1):
        rows = torch.randint(len(x_train), (PROBE_BATCH,), generator=generator)
        loss = nn.functional.binary_cross_entropy_with_logits(probe(x_train[rows]), y_train[rows],
                                                              reduction="sum") / PROBE_BATCH
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, iters // PROBE_EVALS) == 0 or step == iters:
            with torch.no_grad():
                curve.append({"step": step, "loss": float(loss), "image_recall": recall_at_k(probe(x_val), y_val,
                                                                                             topk)})
    return {"topk": topk, "iters": iters, "train_images": len(x_train), "val_images": len(x_val),
            "image_recall": curve[-1]["image_recall"], "chance": topk / cfg.model.num_classes, "curve": curve,
            "seconds": time.perf_counter() - clock}

