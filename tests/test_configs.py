"""Every model-zoo config parses, builds its model (shrunk for speed) with its dataset's class count, runs a
forward and a loss, starts with its model-zoo row comment, and agrees with docs/model_zoo.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import segrank
from segrank.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "_base_" not in p.relative_to(REPO).parts)
CLASSES_DIR = Path(segrank.__file__).parent / "resources" / "classes"
MODEL_ZOO_DOC = REPO / "docs" / "model_zoo.md"
ROW_COMMENT = re.compile(
    r"# Model zoo: (?P<row>.+) \| mIoU (?P<ss>\d+\.\d) / (?P<ms>\d+\.\d|-) \(single-scale / ms\+flip\)$"
)
# Small widths and depths so that all 29 models build and run in seconds; class counts, head type, top-k,
# multi-label branch and OCE stay as configured.
TINY = ["model.backbone.depth=2", "model.backbone.embed_dim=64", "model.backbone.num_heads=2"]


def config_id(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


def row_comment(path: Path) -> re.Match[str]:
    first = path.read_text().splitlines()[0]
    match = ROW_COMMENT.match(first)
    assert match, f"{config_id(path)}: first line is not a model-zoo row comment: {first!r}"
    return match


def test_one_config_per_model_zoo_row() -> None:
    # 30 rows; the "1 TranEnc layer" ablation row is the COCO-Stuff ViT-B 40k RankSeg config.
    assert len(CONFIGS) == 29, [config_id(p) for p in CONFIGS]
    rows = [row_comment(p)["row"] for p in CONFIGS]
    assert len(set(rows)) == len(rows), "two configs claim the same model-zoo row"
    for path in CONFIGS:
        assert path.parent.parent == REPO / "configs", f"{config_id(path)}: expected configs/<dataset>/<name>.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_matches_its_dataset(path: Path) -> None:
    row_comment(path)
    cfg = load_config(path)
    assert path.parent.name == cfg.data.dataset
    classes = json.loads((CLASSES_DIR / f"{cfg.data.dataset}.json").read_text())
    assert cfg.model.num_classes == classes["num_classes"] == len(classes["classes"])
    assert cfg.train.batch_size == 8
    assert cfg.eval.mode == "slide"
    assert cfg.eval.crop_size == cfg.eval.stride == cfg.data.crop_size
    # The position table covers the reference's img_size: 512 for ViT-B, 640 for ViT-L.
    patch = cfg.model.backbone.patch_size
    grid = {768: 512 // patch, 1024: 640 // patch}[cfg.model.backbone.embed_dim]
    assert cfg.model.backbone.pos_embed_grid == (grid, grid)


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_builds_and_runs(path: Path) -> None:
    full = load_config(path)
    overrides = list(TINY)
    if full.model.backbone.oce_start_layer is not None:
        overrides.append("model.backbone.oce_start_layer=1")  # still before the last block
    cfg = load_config(path, overrides)
    n, head = cfg.model.num_classes, cfg.model.head
    assert (n, head.type, head.topk, head.multilabel_head, head.downsample, head.n_layers) == (
        full.model.num_classes, full.model.head.type, full.model.head.topk, full.model.head.multilabel_head,
        full.model.head.downsample, full.model.head.n_layers)

    torch.manual_seed(0)
    model = segrank.build_model(cfg.model)
    images = torch.randn(1, 3, 64, 64)
    ignore_index = 255 if n < 255 else -1  # as the datasets: 255 for 8-bit labels, -1 for 16-bit ones
    labels = torch.randint(0, n, (1, 64, 64))
    present = torch.zeros(1, n, dtype=torch.bool)
    present[0, labels[:, 8:].unique()] = True
    labels[:, :8] = ignore_index
    out = model(images, present if model.needs_present_classes else None)

    assert out.dense().shape == (1, n, 4, 4)
    if head.type == "segmenter":
        assert out.class_index is None and out.image_logits is None
        assert out.mask_logits.shape == (1, n, 4, 4)
    elif head.type == "rankseg":
        assert out.class_index.shape == (1, head.topk)
        assert out.class_index.unique().numel() == head.topk
        assert out.image_logits.shape == (1, n)
        assert out.mask_logits.shape == (1, head.topk, 4, 4)
    else:  # GT oracle: exactly the present classes, ascending
        selected = out.class_index[out.class_index >= 0]
        assert torch.equal(selected, present[0].nonzero().flatten())
    losses = model.loss(out, labels, ignore_index)
    assert torch.isfinite(losses["loss"])
    assert ("loss_img" in losses) == (head.type == "rankseg")


def test_model_zoo_doc_lists_every_config_with_its_numbers() -> None:
    rows: dict[str, list[list[str]]] = {}
    for line in MODEL_ZOO_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for link in re.findall(r"\]\(\.\./(configs/[^)]+\.yaml)\)", line):
            rows.setdefault(link, []).append(cells)
    for path in CONFIGS:
        key = str(path.relative_to(REPO))
        assert key in rows, f"docs/model_zoo.md has no row linking {key}"
        match = row_comment(path)
        # Table columns: row | config | mIoU single-scale | mIoU ms+flip | weights
        assert rows[key][0][2:4] == [match["ss"], match["ms"]], key
    assert set(rows) == {str(p.relative_to(REPO)) for p in CONFIGS}
    assert sum(len(v) for v in rows.values()) == 30  # the "1 TranEnc layer" row shares a config
