"""The CUDA paths: training in fp32 / bf16 / fp16 (+ GradScaler), bf16 logits against fp32, evaluation, prediction
and the sparse ms+flip test against the CPU, GPU checkpoints on the CPU, 2-process NCCL training against 1 process.

Run with ``pytest -m cuda tests/cuda`` (``scripts/gpu_check.sh`` does, on a GPU). Without CUDA they are skipped,
unless ``SEGRANK_TEST_DEVICE`` asks for a device: ``cuda`` then fails where CUDA is missing (the GPU check must not
pass by skipping), and ``cpu`` runs the same checks on the CPU (comparing the CPU with itself), to check the tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import segrank
import segrank.training.loop as engine
from segrank.benchmarks.measure import YARDSTICK_PRECISIONS, machine_info, matmul_yardstick
from segrank.config import EvalConfig
from segrank.evaluation.evaluate import confusion
from segrank.inference.windows import predict_image
from tests.inference.test_predictor import tiny as predictor_model
from tests.training import tiny_data
from tests.training.test_train import final_weights, tiny_config, two_process_run

REQUESTED = os.environ.get("SEGRANK_TEST_DEVICE")
DEVICE = torch.device(REQUESTED or "cuda")
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(REQUESTED is None and not torch.cuda.is_available(),
                       reason="no CUDA device (torch.cuda.is_available() is False); SEGRANK_TEST_DEVICE=cpu runs "
                              "these checks on the CPU"),
]

STEPS = 12  # training steps on one fixed batch of 4 images
LOSS_DROP = 0.8  # the last step's loss is below 0.8 x the first's (measured on the CPU: 0.61 to 0.62 x)
# bf16 keeps 8 significant bits (relative rounding 2^-9): the roundings through a tiny model stay within 3% of the
# fp32 logits in relative L2 norm (measured on the CPU: 0.8%; a GPU's bf16 attention kernels round more).
BF16_TOLERANCE = 3e-2
# Labels on the GPU may differ from the CPU's where two classes' scores tie to within float rounding (other
# summation orders): at most 0.5% of the pixels. The random tiny models have near ties, RankSeg's top-k selection
# too: perturbing all their weights by 1e-5 relative on the CPU moved no pixel, by 1e-4 up to 9% of the Predictor's
# (one window's selection flipped), and the patch embedding's alone by 5e-4 (about TF32's rounding) up to 0.15%.
# So the comparisons run without TF32 (10-bit mantissa), which torch uses for convolutions by default.
TIE_FRACTION = 5e-3
DDP_TOLERANCE = 1e-5  # max |weight difference| after 4 steps, 2 processes vs 1 (float rounding of the all-reduce)


def scene_image() -> np.ndarray:
    """A 70x100 RGB image of noisy colour blocks: regions for the model to tell apart."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (7, 10, 3)).repeat(10, 0).repeat(10, 1)
    return np.clip(blocks + rng.normal(0, 12, blocks.shape), 0, 255).astype(np.uint8)


def eval_model() -> segrank.Segmentor:
    """The training tests' 12-class RankSeg model, seeded."""
    torch.manual_seed(0)
    return segrank.build_model(tiny_config().model).eval()


@pytest.fixture
def full_fp32():
    """fp32 convolutions and matrix products on the GPU without TF32, for the label comparisons (TIE_FRACTION)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_same_labels(on_device: torch.Tensor | np.ndarray, on_cpu: torch.Tensor | np.ndarray) -> None:
    on_device, on_cpu = torch.as_tensor(on_device).cpu(), torch.as_tensor(on_cpu)
    assert on_device.shape == on_cpu.shape
    differ = (on_device != on_cpu).float().mean().item()
    assert differ <= TIE_FRACTION, f"{differ:.2%} of the pixels differ between {DEVICE} and the CPU"


def test_machine_info_and_matmul_yardstick():
    rates = {name: matmul_yardstick(DEVICE, name)[0] for name in YARDSTICK_PRECISIONS}
    assert set(rates) == {"fp32", "bf16"} and all(rate > 0 for rate in rates.values())
    info = machine_info(DEVICE)
    assert info["device"] == str(DEVICE)
    if DEVICE.type == "cuda":
        assert info["gpu"] == torch.cuda.get_device_name(DEVICE) and info["gpu_memory_gb"] > 0
        assert set(info["matmul_gflops_per_s"]) == {"fp32", "bf16"}
        assert info["matmul_gflops_per_s"]["bf16"] > info["matmul_gflops_per_s"]["fp32"]  # tensor cores


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_lowers_the_loss(tmp_path, monkeypatch, amp):
    """``segrank train``'s loop on one fixed batch (4 images, batch 4): the loss falls in every precision; fp16 on a
    GPU goes through the GradScaler, whose state the checkpoint keeps."""
    tiny_data.install(monkeypatch)
    cfg = tiny_config(max_iters=STEPS, batch_size=4, log_interval=1, checkpoint_interval=STEPS, amp=amp)
    cfg.data.options["num_images"] = 4
    result = engine.train(cfg, tmp_path / "run", device=DEVICE.type, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in log if record["type"] == "train"]
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    assert losses[-1] < LOSS_DROP * losses[0], losses
    scaler = torch.load(Path(result.checkpoint).with_suffix(".state.pt"), weights_only=True)["scaler"]
    assert bool(scaler) == (amp == "fp16" and DEVICE.type == "cuda")
    if DEVICE.type == "cuda":
        assert all(record["memory_mb"] > 0 for record in log if record["type"] == "train")


def test_bf16_logits_stay_close_to_fp32():
    model = predictor_model("segmenter").to(DEVICE)
    images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.inference_mode():
        fp32 = model(images).mask_logits
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            bf16 = model(images).mask_logits
    assert bf16.dtype == torch.bfloat16  # autocast did run the model in bf16
    error = ((bf16.float() - fp32).norm() / fp32.norm()).item()
    assert 0 < error <= BF16_TOLERANCE, error


def test_evaluation_matches_the_cpu(full_fp32):
    """The confusion matrices of 4 images agree to within the tie fraction: a pixel whose prediction moved changes
    two cells by one, so half the summed |difference| is a lower bound on the pixels that moved."""
    dataset = tiny_data.TinyScenes(num_images=4, size=32, train=False)
    cfg = EvalConfig(mode="slide", crop_size=(24, 24), stride=(16, 16))
    results = [confusion(eval_model(), dataset, cfg, num_classes=tiny_data.NUM_CLASSES, ignore_index=tiny_data.IGNORE,
                         ms_flip=True, device=device, progress=False) for device in (DEVICE, CPU)]
    (hist, recalls), (cpu_hist, cpu_recalls) = results
    assert hist.sum() == cpu_hist.sum() == 4 * (32 * 32 - 1)  # every labelled pixel counted once
    moved = (hist - cpu_hist).abs().sum().item() / 2
    assert moved <= TIE_FRACTION * cpu_hist.sum().item(), moved
    assert recalls.keys() == cpu_recalls.keys() == {"image_recall", "pixel_recall"}
    assert recalls["image_recall"] == pytest.approx(cpu_recalls["image_recall"], abs=0.05)


def test_predictor_labels_match_the_cpu(full_fp32):
    image = scene_image()
    on_device = segrank.Predictor(predictor_model(), device=DEVICE, warn=False)(image)
    on_cpu = segrank.Predictor(predictor_model(), device=CPU, warn=False)(image)
    assert_same_labels(on_device.label, on_cpu.label)
    assert [r["class"] for r in on_device.ranking][:3] == [r["class"] for r in on_cpu.ranking][:3]


def test_sparse_ms_flip_labels_match_the_cpu(full_fp32):
    image = torch.randn(3, 48, 64, generator=torch.Generator().manual_seed(0))
    labels = []
    for device in (DEVICE, CPU):
        model = predictor_model().to(device)
        with torch.inference_mode():
            prediction = predict_image(model, image.to(device), (60, 80), model.inference.eval, ms_flip=True)
        assert prediction.selected is not None  # RankSeg's sparse path: only the selected classes were resized
        labels.append(prediction.label)
    assert labels[0].device.type == DEVICE.type
    assert_same_labels(*labels)


def test_checkpoint_written_on_the_device_loads_on_the_cpu(tmp_path):
    model = predictor_model().to(DEVICE)
    loaded = segrank.load_model(segrank.save_model(model, tmp_path / "model.safetensors"))
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    expected, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value.cpu()), key
    assert loaded.inference.img_scale == model.inference.img_scale
    assert np.array_equal(segrank.Predictor(loaded, device=CPU, warn=False)(scene_image()).label,
                          segrank.Predictor(predictor_model(), device=CPU, warn=False)(scene_image()).label)


@pytest.mark.skipif(DEVICE.type == "cuda" and torch.cuda.device_count() < 2,
                    reason=f"needs 2 GPUs for a 2-process NCCL run, {torch.cuda.device_count()} found")
def test_two_processes_equal_one(tmp_path, monkeypatch):
    """``torchrun --nproc_per_node 2 segrank train`` (NCCL on GPUs, gloo on the CPU), batch 4 in 2 micro-batches,
    ends with the weights of the 1-process run to within the float rounding of the gradient all-reduce."""
    tiny_data.install(monkeypatch)
    cfg = tiny_config(max_iters=4, grad_accum=2)
    proc = two_process_run(cfg, tmp_path, DEVICE.type)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grad strides" not in proc.stderr.lower(), proc.stderr[-3000:]
    two = load_file(tmp_path / "ddp" / "checkpoints" / "iter_0000004.safetensors")
    one = final_weights(engine.train(cfg, tmp_path / "single", device=DEVICE.type, progress=False))
    assert two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= DDP_TOLERANCE
