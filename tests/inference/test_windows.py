"""Inference: sparse RankSeg evaluation equals the dense reference computation; slide and official fixtures."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from segrank import build_model
from segrank.config import EvalConfig, ModelConfig, from_dict
from segrank.inference.windows import augmentations, merge_windows, predict_image, run_windows, window_boxes
from tests.parity.common import folder as fixture_folder

NUM_CLASSES, TOPK = 40, 5


def aug_logits(model: torch.nn.Module, image: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """Dense (1, N, H, W) logits of one input (mmseg ``slide_inference``/``whole_inference`` without rescale)."""
    outputs = run_windows(model, image, cfg, None)
    classes = torch.arange(outputs[0][1].num_classes, device=image.device)
    return merge_windows(model, outputs, tuple(image.shape[-2:]), classes)


def random_model(head: str, seed: int) -> torch.nn.Module:
    cfg = from_dict(ModelConfig, {
        "num_classes": NUM_CLASSES, "padding": "stretch",
        "backbone": {"embed_dim": 32, "depth": 1, "num_heads": 2, "pos_embed_grid": [4, 4], "drop_path_rate": 0.0},
        "head": {"type": head, "topk": TOPK, "downsample": 2, "n_layers": 2, "dropout": 0.0}})
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # spread the weights so that windows and scales select different classes
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def region_image(seed: int, size: tuple[int, int]) -> torch.Tensor:
    """Blocks of different statistics, so windows see different content."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(1, 3, 3, 4, generator=g) * 2
    image = F.interpolate(blocks, size=size, mode="nearest") + torch.randn(1, 3, *size, generator=g) * 0.5
    return image[0]


@pytest.mark.parametrize(("head", "seed"), [("rankseg", 0), ("rankseg", 1), ("rankseg_gt", 2)])
def test_sparse_equals_dense(head, seed):
    model = random_model(head, seed)
    cfg = EvalConfig(mode="slide", crop_size=(32, 32), stride=(20, 20), batch_size=2,
                     ms_scales=[0.75, 1.0, 1.5])
    image = region_image(seed, (45, 70))
    present = None
    if head == "rankseg_gt":
        present = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        present[torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(seed))[:7]] = True
    ori = (51, 83)
    sparse = predict_image(model, image, ori, cfg, ms_flip=True, present=present, probabilities=True)
    dense = predict_image(model, image, ori, cfg, ms_flip=True, present=present, dense=True, probabilities=True)
    assert len(augmentations(cfg, True)) == 6
    assert dense.probs.shape == (NUM_CLASSES, *ori) and sparse.label.shape == ori
    assert len(sparse.classes) < NUM_CLASSES
    if head == "rankseg":
        assert len(sparse.selected) > TOPK  # windows and augmentations disagree: the union matters
    else:
        assert torch.equal(sparse.selected, present.nonzero()[:, 0])
    assert torch.equal(sparse.label, dense.label)
    torch.testing.assert_close(sparse.probs, dense.probs[sparse.classes], atol=1e-5, rtol=0)
    # Classes never selected keep (almost) no probability in the dense reference.
    outside = torch.ones(NUM_CLASSES, dtype=torch.bool)
    outside[sparse.classes] = False
    assert dense.probs[outside].max() < 1e-30


@pytest.mark.parametrize(("head", "dense"), [("rankseg_gt", False), ("rankseg", True)])
def test_channel_chunks_change_no_bit(monkeypatch, head, dense):
    """Merging a few channels at a time (to bound memory) gives bit-identical probabilities. (Chunks are multiples
    of 16: on tiny grids PyTorch's bilinear kernel vectorises over groups of channels, and a chunk that splits a
    group rounds differently.)"""
    from segrank.inference import windows as inference

    model = random_model(head, 1)
    cfg = EvalConfig(mode="slide", crop_size=(32, 32), stride=(20, 20), ms_scales=[0.75, 1.5])
    image = region_image(1, (45, 70))
    present = torch.arange(NUM_CLASSES) % 4 != 0  # GT oracle: 30 classes, so the sparse path has 2 chunks
    results = []
    for chunk in (16, 10_000):
        monkeypatch.setattr(inference, "CHANNEL_CHUNK", chunk)
        results.append(predict_image(model, image, (51, 83), cfg, ms_flip=True, dense=dense, probabilities=True,
                                     present=present if head == "rankseg_gt" else None))
    assert len(results[0].classes) > 16
    assert torch.equal(results[0].probs, results[1].probs)


def test_window_boxes_cover_and_shift_back():
    boxes = window_boxes((50, 100), (64, 64), (40, 40))
    assert boxes == [(0, 50, 0, 64), (0, 50, 36, 100)]
    boxes = window_boxes((130, 90), (64, 64), (48, 48))
    covered = torch.zeros(130, 90)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (64, 64)
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1 and len(boxes) == 3 * 2


def test_slide_fixture():
    from segrank.checkpoints import load_model

    folder = fixture_folder("slide_inference")
    meta = json.loads((folder / "slide.json").read_text())
    tensors = load_file(str(folder / "slide.safetensors"))
    model = load_model(folder / "model.pth", format="mmseg")
    cases = {k: v for k, v in meta["cases"].items() if "windows_y1y2x1x2" in v}
    assert cases
    for name, case in cases.items():
        image = tensors[f"in.{name.split('.')[0]}"]
        cfg = EvalConfig(mode="slide", crop_size=tuple(case["crop"]), stride=tuple(case["stride"]))
        assert window_boxes(tuple(image.shape[-2:]), cfg.crop_size, cfg.stride) == [
            tuple(b) for b in case["windows_y1y2x1x2"]]
        with torch.no_grad():
            logits = aug_logits(model, image, cfg)
        torch.testing.assert_close(logits, tensors[f"out.{name}.logits"], atol=2e-5, rtol=1e-5, msg=name)
    for case in meta["cases"].values():
        if "ori_shape" not in case:
            continue
        cfg = EvalConfig(mode="slide", crop_size=tuple(case["crop"]), stride=tuple(case["stride"]))
        image, prefix = tensors[f"in.{case['image']}"][0], f"out.{case['image']}"
        expected = tensors[f"{prefix}.inference.probs"][0]
        for dense in (True, False):
            pred = predict_image(model, image, tuple(case["ori_shape"]), cfg, dense=dense, probabilities=True)
            torch.testing.assert_close(pred.probs, expected[pred.classes], atol=2e-5, rtol=1e-5)
            assert torch.equal(pred.label, tensors[f"{prefix}.simple_test.seg_pred"][0].long())


def test_official_segmenter_inference_fixture():
    from segrank.checkpoints import load_model

    folder = fixture_folder("official_segmenter") / "mask_transformer"
    call = json.loads((folder / "case.json").read_text())["inference_call"]
    tensors = load_file(str(folder / "io.safetensors"))
    model = load_model(folder, format="segmenter")
    image, window = tensors["in.inference.im"], call["window_size"]
    # The official test resize (the dataset's job here): short side up to the window size when smaller, bilinear.
    h, w = image.shape[-2:]
    if min(h, w) < window:
        long = int(max(h, w) / min(h, w) * window)
        image = F.interpolate(image, (window, long) if h < w else (long, window), mode="bilinear")
    cfg = EvalConfig(mode="slide", crop_size=(window, window), stride=(call["window_stride"],) * 2,
                     batch_size=call["batch_size"])
    pred = predict_image(model, image[0], tuple(call["ori_shape"]), cfg, probabilities=True)
    torch.testing.assert_close(pred.probs, tensors["out.inference.seg_map"], atol=2e-5, rtol=1e-5)


def largest_tensor(fn) -> int:
    """Elements of the largest tensor any operation inside ``fn`` produced."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            Largest.numel = max([Largest.numel, *sizes])
            return out

    with Largest():
        fn()
    return Largest.numel


def test_sparse_memory_grows_with_union_not_classes():
    """No tensor of the sparse path has N channels at image resolution; the dense path's do."""
    model = random_model("rankseg", 0)
    cfg = EvalConfig(mode="slide", crop_size=(32, 32), stride=(20, 20), ms_scales=[1.0, 1.5])
    image, ori = region_image(0, (45, 70)), (60, 90)
    union = len(predict_image(model, image, ori, cfg, ms_flip=True).selected)
    largest_area = max(ori[0] * ori[1], round(45 * 1.5) * round(70 * 1.5))
    sparse = largest_tensor(lambda: predict_image(model, image, ori, cfg, ms_flip=True))
    dense = largest_tensor(lambda: predict_image(model, image, ori, cfg, ms_flip=True, dense=True))
    assert union < NUM_CLASSES // 2
    assert sparse <= union * largest_area < NUM_CLASSES * ori[0] * ori[1] <= dense


def whole_and_banded(monkeypatch, model, image, ori, cfg, **options):
    """The same prediction made whole (the computation as it has always been) and in bands of a few rows."""
    from segrank.inference import tiles
    from segrank.inference import windows as inference

    monkeypatch.setattr(inference, "pixels_per_band", lambda size, channels, merged: None)
    whole = predict_image(model, image, ori, cfg, probabilities=True, **options)
    monkeypatch.undo()
    # about five bands, each a multiple of 64 pixels as tiles.pixels_per_band makes them, whatever the size
    pixels = max(tiles.BAND_ALIGN, ori[0] * ori[1] // 5 // tiles.BAND_ALIGN * tiles.BAND_ALIGN)
    monkeypatch.setattr(inference, "pixels_per_band", lambda *args: pixels)
    used = []
    monkeypatch.setattr(inference, "resize_rows", lambda *args: used.append(args[2]) or tiles.resize_rows(*args))
    banded = predict_image(model, image, ori, cfg, probabilities=True, **options)
    assert len(set(used)) > 2  # it went by bands (of rows cut in the middle)
    return whole, banded


@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize(("head", "dense"), [("segmenter", False), ("rankseg", False), ("rankseg", True),
                                             ("rankseg_gt", False)])
def test_bands_give_the_labels_of_the_whole_image(monkeypatch, mode, head, dense):
    """Bit-identical labels, dense and sparse, whole and slide, single-scale and ms+flip, resized or not."""
    model = random_model(head, 3)
    cfg = EvalConfig(mode=mode, crop_size=(32, 32), stride=(20, 20), batch_size=2, ms_scales=[0.75, 1.0, 1.5])
    image = region_image(3, (45, 70))
    present = torch.arange(NUM_CLASSES) % 3 == 0 if head == "rankseg_gt" else None
    for ori, ms_flip in [((45, 70), True), ((50, 97), False), ((61, 128), True), ((130, 193), False)]:
        whole, banded = whole_and_banded(monkeypatch, model, image, ori, cfg, ms_flip=ms_flip, present=present,
                                         dense=dense)
        assert torch.equal(banded.label, whole.label), (ori, ms_flip)
        assert torch.equal(banded.classes, whole.classes)
        # probabilities: equal, but for the last bit where PyTorch's bilinear kernel vectorises a narrow image
        # over channels (tiles.py)
        torch.testing.assert_close(banded.probs, whole.probs, atol=3e-7, rtol=0)
        monkeypatch.undo()


@pytest.mark.parametrize("threads", [1, 2])
def test_bands_of_a_wide_image_change_no_bit(monkeypatch, threads):
    """Bands as predict_image makes them (a budget of 1001 pixels: bands of 960, a multiple of 64) give the whole
    image's probabilities bit for bit on one thread. With more, torch's CPU kernels split the pixels among threads
    at points that depend on the tensor's size, and a vectorised exp and the scalar one at a split's edge differ in
    the last bit (seen with AVX-512: 7e-9 on 0.01 % of the values); the labels stay identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole, result, used = whole_and_960_pixel_bands(monkeypatch)
    finally:
        torch.set_num_threads(before)
    assert used == [960]
    assert torch.equal(result.label, whole.label)
    if threads == 1:
        assert torch.equal(result.probs, whole.probs)
    else:
        torch.testing.assert_close(result.probs, whole.probs, rtol=0, atol=1e-7)


def whole_and_960_pixel_bands(monkeypatch: pytest.MonkeyPatch) -> tuple:
    """A wide image's prediction with bands switched off, the one predict_image makes in bands under a budget of
    1001 pixels, and the band sizes it used."""
    from segrank.inference import tiles
    from segrank.inference import windows as inference

    model = random_model("segmenter", 4)
    cfg = EvalConfig(mode="slide", crop_size=(32, 32), stride=(20, 20), ms_scales=[0.5, 1.25])
    image, ori = region_image(4, (40, 64)), (150, 251)
    monkeypatch.setattr(inference, "pixels_per_band", lambda size, channels, merged: None)
    whole = predict_image(model, image, ori, cfg, ms_flip=True, probabilities=True)
    monkeypatch.undo()
    monkeypatch.setattr(tiles, "BAND_ELEMENTS", NUM_CLASSES * 1001)
    used, banded = [], inference.banded_prediction
    monkeypatch.setattr(inference, "banded_prediction", lambda *args: used.append(args[5]) or banded(*args))
    result = predict_image(model, image, ori, cfg, ms_flip=True, probabilities=True)
    return whole, result, used


@pytest.mark.parametrize(("channels", "size"), [(16, (97, 300)), (32, (40, 257)), (40, (120, 512)), (22, (5, 700)),
                                                (7, (130, 300))])
def test_resize_rows_is_interpolate(channels, size):
    """Any band of rows of a bilinear resize, without the rest, is those rows of F.interpolate's result."""
    from segrank.inference.tiles import bands, resize_rows

    x = torch.randn(1, channels, 37, 91, generator=torch.Generator().manual_seed(channels)) * 5
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    for rows in (1, 7, 64):
        got = torch.cat([resize_rows(x, size, band) for band in bands(size[0], rows)], dim=2)
        assert torch.equal(got, expected), rows


def test_banded_memory_stays_within_bands(monkeypatch):
    """Without probabilities, no tensor has as many elements as the (C, H, W) probabilities; with them, one does."""
    from segrank.inference import tiles

    monkeypatch.setattr(tiles, "BAND_ELEMENTS", 2**16)
    model = random_model("segmenter", 0)
    cfg = EvalConfig(mode="slide", crop_size=(32, 32), stride=(20, 20))
    image, ori = region_image(0, (45, 70)), (200, 256)
    full = NUM_CLASSES * ori[0] * ori[1]
    labels = largest_tensor(lambda: predict_image(model, image, ori, cfg))
    with_probs = largest_tensor(lambda: predict_image(model, image, ori, cfg, probabilities=True))
    assert labels <= max(2**16, NUM_CLASSES * 45 * 70) < full <= with_probs
