"""Measuring tools shared by the benchmarks: machine facts, interleaved timing, FLOPs, peak memory.

Timings: warm-up, then the median of ``reps`` repetitions; compared variants run interleaved in one process so
their ratios hold on a noisy machine. Memory: on CPU the peak resident memory (VmHWM) of a freshly spawned process
that runs exactly the measured work, with the process's peak before the work alongside; on GPU the increase of
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from segrank.config import ModelConfig, from_dict
from segrank.runtime.devices import PRECISIONS
from segrank.runtime.precision import cpu_flags, matmul_rate

BACKBONES = ["vit_t16", "vit_s16", "vit_b16", "vit_l16"]


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model and its instruction-set flags (``runtime.precision.CPU_FLAGS`` it has), torch threads and version,
    device, and the device's fp32 and bf16 matrix-multiply rates (``matmul_yardstick``): recorded with every
    benchmark result. On a GPU also its name, memory, compute capability, CUDA version and whether fp32 matrix
    products and convolutions may use TF32."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # Linux only
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                 "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                 "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    yardsticks = {name: matmul_yardstick(device, name) for name in YARDSTICK_PRECISIONS}
    info["matmul_gflops_per_s"] = {name: rate for name, (rate, _) in yardsticks.items()}
    info["matmul_size"] = {name: size for name, (_, size) in yardsticks.items()}
    return info


# The precisions whose matrix-multiply rates every record carries: a bf16 result is judged against the bf16 rate.
YARDSTICK_PRECISIONS = ("fp32", "bf16")
# The yardstick's square size doubles from 256 until one product takes YARDSTICK_SECONDS, up to 2048 (8192 on a
# GPU): the largest where products are fast, smaller where a format has no hardware support (bf16 on AVX2 CPUs is
# ~100x slower), so that no benchmark waits minutes for its yardstick.
YARDSTICK_SECONDS = 0.2
YARDSTICK_SIZES = {"cpu": (256, 2048), "cuda": (1024, 8192)}  # a 2048 product is too short for a GPU


@functools.cache
def matmul_yardstick(device: torch.device, precision: str) -> tuple[float, int]:
    """(GFLOP/s, square size) of ``torch.mm`` in ``precision`` on ``device``: ``runtime.precision.matmul_rate``
    at the size ``YARDSTICK_SECONDS`` picks; measured once per process."""
    dtype = PRECISIONS[precision]
    size, high = YARDSTICK_SIZES.get(device.type, YARDSTICK_SIZES["cpu"])
    while size < high and 2 * size**3 / matmul_rate(device, dtype, size=size, reps=1) / 1e9 < YARDSTICK_SECONDS:
        size *= 2
    return matmul_rate(device, dtype, size=size), size


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


def vm_hwm_mb() -> float:
    """This process's peak resident memory (VmHWM). Unlike ``getrusage``'s ru_maxrss, it is not inherited from the
    parent across fork + exec, so a spawned child reports only its own peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a newly spawned interpreter, so that the peak memory it reads is its work's alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated increase"
    return "peak resident memory (VmHWM) of a fresh process: torch, model and data included"


def _run_and_read_peak(threads: int, setup: Callable[..., Callable[[], Any]], *args: Any) -> tuple:
    """Run in a fresh process: ``work = setup(*args)``, then ``work()``; the process's peak resident memory (MB)
    before and after the work, and the work's result."""
    torch.set_num_threads(threads)
    work = setup(*args)
    before = vm_hwm_mb()
    result = work()
    return before, vm_hwm_mb(), result


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
