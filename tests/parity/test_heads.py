"""Decode heads (baseline, RankSeg, GT oracle, ablation heads) against the reference golden outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from segrank.checkpoints.mmseg import from_mmseg_name
from segrank.models.losses import presence_targets
from segrank.models.segmentor import Segmentor

from .common import FIXTURES, LOSS_TOL, assert_close, assert_equal, read_json, reference_term, tensors
from .common import folder as fixture_folder
from .reference import load_part, model_config

HEAD_TYPES = ("MaskTransformerHead", "MaskTransformerRankSegHead", "MaskTransformerRankSegGTHead",
              "MaskTransformerRankSegDecoderHead")


def _variants(kwargs: dict) -> dict[str, dict]:
    """Constructor kwargs are either one head or a mapping variant name -> head (loss variants)."""
    return {"": kwargs} if "type" in kwargs else kwargs


def head_cases(with_gradients: bool = False) -> list:
    cases = []
    for index_path in sorted(FIXTURES.glob("*/index.json")):
        index = read_json(index_path)
        for case in index.get("cases", {}):
            meta_path = index_path.parent / f"{case}.json"
            if not meta_path.is_file():
                continue
            kwargs = read_json(meta_path).get("constructor_kwargs", {})
            if with_gradients and not any(k.startswith("grad.") for k in _tensor_names(index_path.parent, case)):
                continue
            if any(v.get("type") in HEAD_TYPES for v in _variants(kwargs).values() if isinstance(v, dict)):
                cases.append(pytest.param(index_path.parent, case, id=f"{index_path.parent.name}/{case}"))
    return cases


def _tensor_names(folder, case: str) -> list[str]:
    with safe_open(str(folder / f"{case}.safetensors"), framework="pt") as f:
        return list(f.keys())


def build_head(folder, meta: dict, kwargs: dict):
    model = Segmentor(model_config(None, kwargs))
    index = read_json(folder / "index.json")
    weights_file = meta.get("weights_file") or index["weights"]["file"]
    load_part(model, "decode_head", tensors(folder / weights_file), exclude=meta.get("weights_exclude", []))
    return model.train()  # every dropout rate is 0: training-mode forwards are deterministic


def run_head(model, t: dict, ignore_index: int):
    x = t["in.x"]
    labels = t["in.seg_label"].long()[:, 0]
    if model.needs_present_classes:
        present = presence_targets(labels, model.num_classes, ignore_index).bool()
        return model.decode_head(x, t.get("in.cls_emb"), present), labels
    return model.decode_head(x, t.get("in.cls_emb")), labels


@pytest.mark.parametrize(("folder", "case"), head_cases())
def test_head_forward_and_losses(folder, case):
    meta = read_json(folder / f"{case}.json")
    t = tensors(folder / f"{case}.safetensors")
    variants = _variants(meta["constructor_kwargs"])
    name = f"{folder.name}/{case}"
    for variant, kwargs in variants.items():
        ignore = kwargs.get("ignore_index", 255)
        model = build_head(folder, meta, kwargs)
        out, labels = run_head(model, t, ignore)
        if "out.train.img_pred" in t:
            assert_close(f"{name} img_pred", out.image_logits, t["out.train.img_pred"])
        for key in ("out.train.topk_index", "out.train.gt_index"):
            if key in t:
                assert_equal(f"{name} selected classes", out.class_index, t[key])
        if "out.train.masks" in t:
            assert_close(f"{name} masks", out.mask_logits, t["out.train.masks"])
        for key in ("out.eval_logits", "out.logits"):
            if key in t:
                assert_close(f"{name} eval logits", out.dense(), t[key])

        prefix = f"loss.{variant}." if variant else "loss."
        losses = model.loss(out, labels, ignore)
        B, H, W = labels.shape
        margin_pixels = meta.get("valid_pixels_with_argmax_margin_below_1e-4", 0)
        for key in (k for k in t if k.startswith(prefix)):
            term = key[len(prefix):]
            if term == "acc_seg":  # counts argmax hits: a near-tie pixel may flip (README §3)
                tol = {"atol": margin_pixels * 100.0 / (B * H * W) + 1e-5, "rtol": 0.0}
                assert_close(f"{name} {term}", reference_term(losses, term), t[key], tol)
            else:
                assert_close(f"{name} {term}", reference_term(losses, term), t[key], LOSS_TOL)

        grad_key = f"grad_img_pred.{variant}"
        if grad_key in t:
            out, labels = run_head(model, t, ignore)
            image_logits = out.image_logits
            image_logits.retain_grad()
            model.loss(out, labels, ignore)["loss_img"].backward()
            assert_close(f"{name} d loss_img / d img_pred", image_logits.grad, t[grad_key], LOSS_TOL)


@pytest.mark.parametrize(("folder", "case"), head_cases(with_gradients=True))
def test_head_parameter_gradients(folder, case):
    """grad.<param>: gradient of the summed loss w.r.t. every head parameter (cases that store them)."""
    meta = read_json(folder / f"{case}.json")
    t = tensors(folder / f"{case}.safetensors")
    grads = {k[len("grad."):]: v for k, v in t.items() if k.startswith("grad.") and k != "grad.total_loss"}
    total = meta["scalars"].get("grad.total_loss")
    matched = False
    for kwargs in _variants(meta["constructor_kwargs"]).values():
        ignore = kwargs.get("ignore_index", 255)
        model = build_head(folder, meta, kwargs)
        out, labels = run_head(model, t, ignore)
        loss = model.loss(out, labels, ignore)["loss"]
        if total is not None and abs(loss.item() - total) > 1e-5 * max(1.0, abs(total)):
            continue  # the gradients were taken with another loss variant
        matched = True
        loss.backward()
        params = dict(model.named_parameters())
        for ref_name, expected in grads.items():
            param = params[from_mmseg_name(f"decode_head.{ref_name}")]
            assert param.grad is not None, f"{ref_name}: no gradient"
            assert_close(f"{folder.name}/{case} grad", param.grad, expected, LOSS_TOL)
        break
    assert matched, "no loss variant reproduces grad.total_loss"


def test_gt_oracle_batches_images_with_different_class_counts():
    """B > 1 with a different number of present classes per image equals per-image runs (the reference: B = 1)."""
    folder = fixture_folder("gt_head")
    index = read_json(folder / "index.json")
    by_grid: dict[tuple, list] = {}
    for case in index["cases"]:
        t = tensors(folder / f"{case}.safetensors")
        by_grid.setdefault(tuple(t["in.x"].shape[1:]) + tuple(t["in.seg_label"].shape[1:]), []).append((case, t))
    group = max(by_grid.values(), key=len)
    counts = {int(t["out.train.masks"].shape[1]) for _, t in group}
    if len(group) < 2 or len(counts) < 2:
        pytest.fail("the gt_head fixtures hold no two same-size cases with different class counts")
    meta = read_json(folder / f"{group[0][0]}.json")
    model = build_head(folder, meta, meta["constructor_kwargs"])
    batch = {"in.x": torch.cat([t["in.x"] for _, t in group]),
             "in.seg_label": torch.cat([t["in.seg_label"] for _, t in group])}
    out, _ = run_head(model, batch, 255)
    for b, (case, t) in enumerate(group):
        g = t["out.train.masks"].shape[1]
        assert_equal(f"gt_head/{case} batched classes", out.class_index[b, :g], t["out.train.gt_index"][0])
        assert (out.class_index[b, g:] == -1).all()
        assert_close(f"gt_head/{case} batched masks", out.mask_logits[b : b + 1, :g], t["out.train.masks"])
        assert_close(f"gt_head/{case} batched eval logits", out.dense()[b : b + 1], t["out.eval_logits"])
