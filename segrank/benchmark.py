"""Benchmarks that print one JSON object per measured case (``segrank benchmark ...`` or
``python -m segrank.benchmark ...``).

Timings: warm-up, then the median of ``--reps`` repetitions; compared variants run interleaved in one process so
their ratios hold on a noisy machine. Memory: on CPU the peak resident memory (VmHWM) of a freshly spawned process
that runs exactly the measured work, with the process's peak before the work alongside; on GPU the increase of
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from segrank.config import ModelConfig, from_dict
from segrank.errors import SegrankError
from segrank.models.segmentor import Segmentor


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # Linux only
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@contextmanager
def cuda_peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that holds ``peak_mb``, the peak of allocated GPU memory over the start, once the block ends."""
    result: dict[str, float] = {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize(device)
    result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20


def _vm_hwm_mb() -> float:
    """This process's peak resident memory (VmHWM). Unlike ``getrusage``'s ru_maxrss, it is not inherited from the
    parent across fork + exec, so a spawned child reports only its own peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a newly spawned interpreter, so that the peak memory it reads is its work's alone."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated increase"
    return "peak resident memory (VmHWM) of a fresh process: torch, model and data included"


def _run_and_read_peak(threads: int, setup: Callable[..., Callable[[], Any]], *args: Any) -> tuple:
    """Run in a fresh process: ``work = setup(*args)``, then ``work()``; the process's peak resident memory (MB)
    before and after the work, and the work's result."""
    torch.set_num_threads(threads)
    work = setup(*args)
    before = _vm_hwm_mb()
    result = work()
    return before, _vm_hwm_mb(), result


def measure_memory(device: torch.device, setup: Callable[..., Callable[[], Any]], *args: Any
                   ) -> tuple[float, float | None, Any]:
    """Peak memory (MB) of ``setup(*args)()``, the memory before it (CPU only, else None) and its result.

    CPU: both read in a freshly spawned process (``setup`` and ``args`` must pickle), so the peak is this work's
    alone; GPU: the increase of ``torch.cuda.max_memory_allocated`` over the work, after the setup."""
    if device.type == "cuda":
        work = setup(*args)
        with cuda_peak_memory(device) as mem:
            result = work()
        return mem["peak_mb"], None, result
    before, peak, result = in_fresh_process(_run_and_read_peak, torch.get_num_threads(), setup, *args)
    return peak, before, result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, after one warm-up each, alternating between them every repetition."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(device: torch.device, size: int = 2048, reps: int = 5) -> float:
    """This machine's fp32 matrix-multiply rate, the yardstick for achieved GFLOP/s."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = time_interleaved({"mm": lambda: torch.mm(a, b)}, reps, device)["mm"]
    return 2 * size**3 / seconds / 1e9


def model_config(backbone: str, head: str, num_classes: int, size: int) -> ModelConfig:
    """A model-zoo-like config: ViT preset, Segmenter (2 blocks) or RankSeg (k 50, pooled 8; k 100, no pooling
    for N > 255, as the ADE-Full and COCO+LVIS rows)."""
    big = num_classes > 255
    heads = {
        "segmenter": {"type": "segmenter", "n_layers": 2},
        "rankseg": {"type": "rankseg", "n_layers": 3, "topk": min(100 if big else 50, num_classes),
                    "downsample": None if big else 8},
    }
    grid = [size // 16, size // 16]
    return from_dict(ModelConfig, {"num_classes": num_classes, "backbone": {"preset": backbone, "pos_embed_grid": grid},
                                   "head": heads[head]})


def class_map_from_features(model: Segmentor, features, size: tuple[int, int]) -> torch.Tensor:
    """Decode head + full-resolution class map, given backbone features (the part RankSeg changes)."""
    return model.output_to_class_map(model.decode_head(features.feature_map, features.class_tokens), size)


def bench_forward(args: argparse.Namespace, device: torch.device) -> Iterator[dict[str, Any]]:
    """Latency of the decode head + full-resolution class map, and end to end, with FLOPs."""
    mm = matmul_gflops(device)
    for num_classes in args.classes:
        yield from _forward_case(args, device, num_classes, mm)


AMP_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _forward_case(args: argparse.Namespace, device: torch.device, num_classes: int, mm: float) -> list[dict]:
    models = {h: Segmentor(model_config(args.backbone, h, num_classes, args.size)).eval().to(device)
              for h in args.models}
    x = torch.randn(1, 3, args.size, args.size, device=device)
    size = (args.size, args.size)
    records = []
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[args.amp], enabled=args.amp != "none")
    with torch.inference_mode(), autocast:
        features = {h: m.backbone(x) for h, m in models.items()}
        head_fns = {h: (lambda m=m, f=features[h]: class_map_from_features(m, f, size)) for h, m in models.items()}
        e2e_fns = {h: (lambda m=m: m.class_map(x)) for h, m in models.items()}
        head_times = time_interleaved(head_fns, args.reps, device)
        e2e_times = time_interleaved(e2e_fns, args.reps, device)
        for h in models:
            flops = count_flops(e2e_fns[h])
            achieved = flops / e2e_times[h] / 1e9
            records.append({
                "benchmark": "forward", "backbone": args.backbone, "size": args.size, "classes": num_classes,
                "model": h, "amp": args.amp, "head_and_map_s": head_times[h], "end_to_end_s": e2e_times[h],
                "gflops": flops / 1e9, "achieved_gflops_per_s": achieved, "matmul_gflops_per_s": mm,
                "fraction_of_matmul": achieved / mm,
                "head_vs_segmenter": head_times[h] / head_times.get("segmenter", head_times[h]),
                "end_to_end_vs_segmenter": e2e_times[h] / e2e_times.get("segmenter", e2e_times[h]),
            })
    return records


def bench_train_step(args: argparse.Namespace, device: torch.device) -> Iterator[dict[str, Any]]:
    """Time and peak memory of one SGD step (forward, loss, backward, update) per batch size."""
    for batch in args.batch:
        yield from _train_case(args, device, args.classes[0], batch)


def _train_setup(backbone: str, head: str, num_classes: int, size: int, batch: int, device: torch.device
                 ) -> Callable[[], None]:
    """One SGD step (forward, loss, backward, momentum update) of a seeded model on a fixed batch."""
    torch.manual_seed(0)
    model = Segmentor(model_config(backbone, head, num_classes, size)).train().to(device)
    optim = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    # a few large regions per image, as in real labels
    coarse = torch.randint(0, num_classes, (batch, 1, 4, 4), generator=gen).float()
    labels = F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long().to(device)

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        model.loss(model(x), labels, ignore_index=-1)["loss"].backward()
        optim.step()

    return step


def _two_train_steps(backbone: str, head: str, num_classes: int, size: int, batch: int, device: torch.device
                     ) -> Callable[[], None]:
    """The memory benchmark's work: two steps, so that the optimiser state exists during the second."""
    step = _train_setup(backbone, head, num_classes, size, batch, device)

    def work() -> None:
        step()
        step()

    return work


def _train_case(args: argparse.Namespace, device: torch.device, num_classes: int, batch: int) -> list[dict]:
    steps = {h: _train_setup(args.backbone, h, num_classes, args.size, batch, device) for h in args.models}
    times = time_interleaved(steps, args.reps, device)
    records = []
    for h in steps:
        peak, before, _ = measure_memory(device, _two_train_steps, args.backbone, h, num_classes, args.size, batch,
                                         device)
        records.append({"benchmark": "train-step", "backbone": args.backbone, "size": args.size,
                        "classes": num_classes, "batch": batch, "model": h, "step_s": times[h], "peak_mb": peak,
                        "before_steps_mb": before, "memory_kind": _memory_kind(device)})
    return records


def bench_eval_memory(args: argparse.Namespace, device: torch.device) -> Iterator[dict[str, Any]]:
    """Peak memory and time of one image's sliding-window multi-scale + flip test: sparse vs dense RankSeg."""
    for num_classes in args.classes:
        yield from _eval_memory_case(args, device, num_classes)


def _eval_setup(backbone: str, num_classes: int, height: int, width: int, device: torch.device):
    """A seeded random RankSeg model, one normalised test image and the reference's ms+flip slide settings."""
    from segrank.config import EvalConfig

    torch.manual_seed(0)
    model = Segmentor(model_config(backbone, "rankseg", num_classes, 512)).eval().to(device)
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(1)).to(device)
    cfg = EvalConfig(mode="slide", crop_size=(512, 512), stride=(512, 512))
    return model, image, cfg


def _eval_once(model: Segmentor, image: torch.Tensor, cfg, dense: bool):
    """The reference's test: scales of img_scale = (4 * short side, short side), the image's own scale-1 size."""
    from segrank.engine.inference import predict_image

    size = tuple(image.shape[-2:])
    return predict_image(model, image, size, cfg, ms_flip=True, img_scale=(4 * min(size), min(size)), dense=dense)


def _eval_labels(backbone: str, num_classes: int, height: int, width: int, dense: bool, device: torch.device
                 ) -> Callable[[], Any]:
    """The memory benchmark's work: one evaluation of a fresh model, returning its label map as an array."""
    model, image, cfg = _eval_setup(backbone, num_classes, height, width, device)

    def work() -> Any:
        with torch.inference_mode():
            return _eval_once(model, image, cfg, dense).label.cpu().numpy()

    return work


def _eval_memory_case(args: argparse.Namespace, device: torch.device, num_classes: int) -> list[dict]:
    height, width = args.image_size
    model, image, cfg = _eval_setup(args.backbone, num_classes, height, width, device)
    paths = {"sparse": False, "dense": True}
    preds = {}

    def evaluate(path: str) -> None:
        preds[path] = _eval_once(model, image, cfg, paths[path])

    with torch.inference_mode():
        times = time_interleaved({p: (lambda p=p: evaluate(p)) for p in paths}, args.reps, device)
    labels = [pred.label.cpu() for pred in preds.values()]
    memory = {}
    for path, dense in paths.items():
        peak, before, label = measure_memory(device, _eval_labels, args.backbone, num_classes, height, width, dense,
                                             device)
        memory[path] = {"peak_mb": peak, "before_eval_mb": before}
        labels.append(torch.from_numpy(label))
    identical = all(torch.equal(labels[0], label) for label in labels[1:])
    return [{"benchmark": "eval-memory", "backbone": args.backbone, "image": [height, width], "classes": num_classes,
             "path": path, "scales": list(cfg.ms_scales), "flip": True, "crop": list(cfg.crop_size),
             "time_s": times[path], "vs_dense_time": times[path] / times["dense"],
             **memory[path], "memory_kind": _memory_kind(device),
             "identical_predictions": identical, "union_of_selected_classes": int(preds["sparse"].selected.numel())}
            for path in paths]


def bench_data(args: argparse.Namespace, device: torch.device) -> Iterator[dict[str, Any]]:
    """Images/s of the reference train pipeline (512 crops), in process and through a DataLoader."""
    from segrank.data.benchmark import benchmark_data

    record = benchmark_data(crop=args.size, images=args.images, workers=args.workers)
    record.pop("machine", None)
    yield record


SUBCOMMANDS: dict[str, Callable[[argparse.Namespace, torch.device], Iterator[dict[str, Any]]]] = {
    "forward": bench_forward,
    "train-step": bench_train_step,
    "eval-memory": bench_eval_memory,
    "data": bench_data,
}


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SegrankError("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(device)
    for record in SUBCOMMANDS[args.bench](args, device):
        record["machine"] = info
        print(json.dumps(record) if args.json else " ".join(f"{k}={v}" for k, v in record.items() if k != "machine"))
        sys.stdout.flush()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("benchmark", help="speed and memory benchmarks (JSON records)")
    bench = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    defaults = {"forward": ("vit_b16", 512, "150,1284", "1"), "train-step": ("vit_t16", 512, "150", "1,2,8"),
                "eval-memory": ("vit_t16", 512, "150,847,1284", "1"), "data": ("vit_t16", 512, "150", "8")}
    for name in SUBCOMMANDS:
        backbone, size, classes, batch = defaults[name]
        sub = bench.add_parser(name, help=(SUBCOMMANDS[name].__doc__ or name).splitlines()[0])
        sub.add_argument("--backbone", default=backbone, choices=["vit_t16", "vit_s16", "vit_b16", "vit_l16"])
        sub.add_argument("--size", type=int, default=size, help="square input (forward, train-step) or crop size")
        sub.add_argument("--classes", type=_int_list, default=_int_list(classes), help="comma-separated N")
        sub.add_argument("--batch", type=_int_list, default=_int_list(batch), help="comma-separated batch sizes")
        sub.add_argument("--models", nargs="+", default=["segmenter", "rankseg"], choices=["segmenter", "rankseg"])
        sub.add_argument("--image-size", type=_int_list, default=[512, 683], help="eval-memory: test image H,W")
        sub.add_argument("--images", type=int, default=64, help="data: images to push through the pipeline")
        sub.add_argument("--workers", type=int, default=2, help="data: DataLoader workers")
        sub.add_argument("--reps", type=int, default=5)
        sub.add_argument("--device", default="cpu")
        sub.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        sub.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="forward: autocast dtype")
        sub.add_argument("--json", action="store_true", help="one JSON object per line")
        sub.set_defaults(func=_run)


if __name__ == "__main__":
    from segrank.cli import main

    sys.exit(main(["benchmark", *sys.argv[1:]]))
