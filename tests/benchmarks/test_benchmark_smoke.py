"""Each benchmark sub-command runs at toy sizes and prints JSON records with the documented keys (no timings are
asserted: speed targets live in the benchmark output, docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from segrank.runtime.precision import CPU_FLAGS

MACHINE_KEYS = {"cpu", "cpu_flags", "threads", "torch", "device", "matmul_gflops_per_s", "matmul_size"}
FORWARD = ["--backbone", "vit_t16", "--size", "64", "--classes", "7,30", "--reps", "1"]
FORWARD_KEYS = {"model", "classes", "precision", "compile", "first_call_s", "head_and_map_s", "end_to_end_s", "gflops",
                "achieved_gflops_per_s", "matmul_gflops_per_s", "fraction_of_matmul", "fraction_of_fp32_matmul",
                "fraction_of_bf16_matmul", "head_vs_segmenter", "end_to_end_vs_segmenter"}
CASES = {
    "forward": (FORWARD, FORWARD_KEYS, 4),
    "forward --amp bf16": ([*FORWARD, "--amp", "bf16"], FORWARD_KEYS, 4),  # the deprecated alias of --precision
    "train-step": (["--size", "32", "--classes", "9", "--batch", "1,2", "--reps", "1"],
                   {"model", "batch", "step_s", "peak_mb", "before_steps_mb", "memory_kind"}, 4),
    # auto is bf16 or fp32 here, so two distinct precisions per model either way; with --json no announcement line
    "train-step --precision": (["--size", "32", "--classes", "9", "--batch", "2", "--reps", "1", "--precision",
                                "fp32", "bf16", "auto"],
                               {"model", "precision", "precision_reason", "step_s", "step_vs_fp32",
                                "matmul_fp32_gflops_per_s", "matmul_bf16_gflops_per_s"}, 4),
    "eval-memory": (["--classes", "12", "--image-size", "32,48", "--reps", "1"],
                    {"path", "classes", "time_s", "peak_mb", "before_eval_mb", "vs_dense_time", "identical_predictions",
                     "union_of_selected_classes"}, 2),
    "data": (["--size", "64", "--images", "4", "--workers", "1"], {"images_per_s", "dataloader_images_per_s"}, 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_prints_json_records(name):
    args, keys, count = CASES[name]
    name = name.split()[0]
    result = subprocess.run([sys.executable, "-m", "segrank.cli", "benchmark", name, "--json", "--threads", "1", *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == count
    for record in records:
        assert record["benchmark"] in (name, "data_pipeline")
        assert keys <= set(record), keys - set(record)
        machine = record["machine"]
        assert set(machine) >= MACHINE_KEYS
        assert set(machine["matmul_gflops_per_s"]) == {"fp32", "bf16"} and set(machine["cpu_flags"]) <= set(CPU_FLAGS)
    if name == "forward":  # judged against the matmul rate of the precision it ran in, measured in the same run
        for record in records:
            assert record["precision"] == ("bf16" if "--amp" in args else "fp32")
            rate = record["machine"]["matmul_gflops_per_s"][record["precision"]]
            assert record["matmul_gflops_per_s"] == rate
            assert record["fraction_of_matmul"] == pytest.approx(record["achieved_gflops_per_s"] / rate)
            assert record[f"fraction_of_{record['precision']}_matmul"] == record["fraction_of_matmul"]
    if "--precision" in args:  # each precision's step time against fp32's of the same model, in the same run
        fp32 = {r["model"]: r["step_s"] for r in records if r["precision"] == "fp32"}
        assert sorted((r["model"], r["precision"]) for r in records) == [
            (m, p) for m in ("rankseg", "segmenter") for p in ("bf16", "fp32")]
        for record in records:
            assert record["step_vs_fp32"] == pytest.approx(record["step_s"] / fp32[record["model"]])
    if name == "eval-memory":
        assert all(r["identical_predictions"] for r in records)


def test_fresh_process_peak_is_its_own():
    """The CPU memory probe reads the child's own peak, not one inherited from a parent that used more
    (``getrusage`` ru_maxrss carries the parent's peak across fork + exec)."""
    import torch

    from segrank.benchmarks.measure import in_fresh_process, vm_hwm_mb

    ballast = torch.ones(200 * 2**20)  # 800 MB resident in this process
    assert vm_hwm_mb() > 800
    assert in_fresh_process(vm_hwm_mb) < 700
    del ballast
