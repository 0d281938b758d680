"""Model behaviour beyond the fixtures: presets, batching, sparse output, padding semantics, configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from segrank import build_model
from segrank.config import VIT_PRESETS, ConfigError, ModelConfig, from_dict, load_config
from segrank.models.losses import class_histogram, presence_targets, rank_remap
from segrank.models.output import densify


def tiny(head: dict | None = None, **kw) -> ModelConfig:
    data = {"num_classes": 23, "backbone": {"preset": "vit_t16", "depth": 2, "pos_embed_grid": [4, 4]},
            "head": {"type": "rankseg", "topk": 5, "downsample": 2, "n_layers": 3, **(head or {})}}
    data.update(kw)
    return from_dict(ModelConfig, data)


# timm's published parameter counts of vit_{base,large}_patch16_384 minus their 1000-class classifier
# (768*1000 + 1000 and 1024*1000 + 1000): independent anchors for our layout at a 24x24 position grid.
TIMM_BACKBONE_PARAMS = {"vit_b16": 86_859_496 - 769_000, "vit_l16": 304_715_752 - 1_025_000}


@pytest.mark.parametrize("preset", sorted(VIT_PRESETS))
def test_presets_build_and_run(preset):
    cfg = from_dict(ModelConfig, {"num_classes": 10, "backbone": {"preset": preset, "depth": 1},
                                  "head": {"type": "segmenter", "n_layers": 1}})
    model = build_model(cfg).eval()
    assert model.backbone.embed_dim == VIT_PRESETS[preset]["embed_dim"]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).mask_logits.shape == (1, 10, 3, 3)


@pytest.mark.parametrize("preset", sorted(TIMM_BACKBONE_PARAMS))
def test_backbone_parameter_counts_match_timm(preset):
    cfg = from_dict(ModelConfig, {"num_classes": 1, "backbone": {"preset": preset, "pos_embed_grid": [24, 24]},
                                  "head": {"type": "linear"}})
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.backbone.parameters()) == TIMM_BACKBONE_PARAMS[preset]


def reference_head_params(n: int, d: int, k: int | None, n_layers: int) -> int:
    """Parameter count of the reference heads from the key shapes of the released checkpoints."""
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    common = n * d + (d * d + d) + n_layers * block + 2 * d + 2 * d * d
    if k is None:
        return common + 2 * n
    return common + 2 * d + 2 * k + n * d + n  # decoder_norm2, mask_norm(k), ml_fc W and b


@pytest.mark.parametrize(("preset", "d"), [("vit_b16", 768), ("vit_l16", 1024)])
@pytest.mark.parametrize("head", ["segmenter", "rankseg"])
def test_head_parameter_counts_match_reference(preset, d, head):
    n, k = 150, 50
    cfg = from_dict(ModelConfig, {"num_classes": n, "backbone": {"preset": preset},
                                  "head": {"type": head, "n_layers": 2 if head == "segmenter" else 3, "topk": k}})
    with torch.device("meta"):
        model = build_model(cfg)
    expected = reference_head_params(n, d, None if head == "segmenter" else k, cfg.head.n_layers)
    assert sum(p.numel() for p in model.decode_head.parameters()) == expected


@pytest.mark.parametrize("multilabel_head", ["encoder_layer", "query2label", "global_pool"])
def test_rankseg_batch_equals_per_image(multilabel_head):
    """The reference gathers selected classes correctly only for B = 1; ours is batched."""
    torch.manual_seed(0)
    extra = {"multilabel_head": multilabel_head}
    if multilabel_head != "encoder_layer":
        extra.update(n_layers=2, downsample=2, q2l_d_ff=64, q2l_heads=2)
    model = build_model(tiny(extra)).eval()
    x = torch.randn(3, 3, 64, 48)
    with torch.no_grad():
        batched = model(x)
        for b in range(3):
            single = model(x[b : b + 1])
            assert torch.equal(batched.class_index[b], single.class_index[0])
            torch.testing.assert_close(batched.mask_logits[b], single.mask_logits[0], atol=1e-5, rtol=1e-5)


def test_sparse_output_densifies_with_fill():
    model = build_model(tiny()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    dense = out.dense()
    assert out.mask_logits.shape == (2, 5, 4, 4) and dense.shape == (2, 23, 4, 4)
    for b in range(2):
        chosen = set(out.class_index[b].tolist())
        for c in range(23):
            if c in chosen:
                r = out.class_index[b].tolist().index(c)
                assert torch.equal(dense[b, c], out.mask_logits[b, r])
            else:
                assert (dense[b, c] == -100).all()


def test_densify_drops_padding_slots():
    logits = torch.arange(6.0).view(1, 3, 1, 2)
    dense = densify(logits, torch.tensor([[2, 0, -1]]), num_classes=4)
    assert dense[0, :, 0].tolist() == [[2, 3], [-100, -100], [0, 1], [-100, -100]]


@pytest.mark.parametrize("padding", ["stretch", "crop"])
def test_padding_semantics(padding):
    model = build_model(tiny(padding=padding)).eval()
    x = torch.randn(1, 3, 50, 70)  # padded to 64x80
    with torch.no_grad():
        grid = model.dense_logits(x)
        full = model.dense_logits(x, (50, 70))
    up = torch.nn.functional.interpolate
    if padding == "stretch":
        expected = up(grid, size=(50, 70), mode="bilinear", align_corners=False)
    else:
        expected = up(grid, size=(64, 80), mode="bilinear", align_corners=False)[:, :, :50, :70]
    torch.testing.assert_close(full, expected)


def test_gt_oracle_uses_given_classes():
    model = build_model(tiny({"type": "rankseg_gt", "n_layers": 2})).eval()
    present = torch.zeros(2, 23, dtype=torch.bool)
    present[0, [3, 9, 1]] = True  # image 1 has none -> class 0, as the reference
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), present)
    assert out.class_index.tolist() == [[1, 3, 9], [0, -1, -1]]
    assert (out.mask_logits[1, 0] == model.decode_head.mask_norm.beta[0]).all()


def test_label_helpers_handle_any_ignore_and_large_vocabularies():
    n = 1284
    labels = torch.tensor([[[0, 255, 1283, -1], [255, 255, 7, 7]]])
    hist = class_histogram(labels, n, ignore_index=-1)
    assert hist[0, 255] == 3 and hist[0, 1283] == 1 and hist[0, 7] == 2 and hist.sum() == 7
    assert presence_targets(labels, n, -1)[0].nonzero().flatten().tolist() == [0, 7, 255, 1283]
    slots = rank_remap(labels, torch.tensor([[255, 7, 900]]), n, ignore_index=-1)
    assert slots.tolist() == [[[-1, 0, -1, -1], [0, 0, 1, 1]]]


def test_gradients_reach_every_trainable_parameter():
    model = build_model(tiny()).train()
    out = model(torch.randn(2, 3, 64, 64))
    labels = out.class_index[:, :2].repeat_interleave(32, 1)[:, None, :].expand(2, 64, 64).clone()
    model.loss(out, labels, 255)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_unknown_and_mistyped_keys_are_clear_errors():
    with pytest.raises(ConfigError, match=r"model\.head\.topkk: unknown key \(did you mean 'topk'\?\)"):
        load_config(None, ["model.head.topkk=3"])
    with pytest.raises(ConfigError, match=r"model\.backbone\.depth: expected an integer"):
        load_config(None, ["model.backbone.depth=deep"])
    with pytest.raises(ConfigError, match=r"model\.head\.topk: 200 must be in \[1, num_classes=150\]"):
        load_config(None, ["model.head.type=rankseg", "model.head.topk=200"])


def test_import_does_not_pull_timm_torchvision_or_mmcv():
    code = "import sys, segrank, segrank.cli; print({'timm', 'torchvision', 'mmcv', 'mmengine'} & set(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "set()"


@pytest.mark.parametrize("head", [{}, {"type": "segmenter", "n_layers": 2}])
def test_class_map_equals_dense_argmax(head):
    torch.manual_seed(1)
    model = build_model(tiny(head)).eval()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        dense = model.dense_logits(x, (61, 83)).argmax(1)
        assert torch.equal(model.class_map(x, (61, 83)), dense)
