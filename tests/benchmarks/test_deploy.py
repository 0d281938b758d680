"""``segrank benchmark deploy`` at toy size: one record per runtime, timed ones with latency, matmul fractions and
label agreement; int8 reported or rejected by its agreement; a missing package is a skipped record, not a crash."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from segrank.benchmarks import deploy
from segrank.benchmarks.deploy import INT8_MIN_AGREEMENT, RUNTIMES, bench_deploy

TOY = ["--backbone", "vit_t16", "--size", "64", "--classes", "12", "--reps", "1", "--threads", "1"]
TIMED = {"latency_s", "first_call_s", "achieved_gflops_per_s", "fraction_of_fp32_matmul", "fraction_of_bf16_matmul",
         "label_agreement"}


@pytest.mark.slow  # the ONNX export and the runtimes' set-up: about a minute on the shared machine
def test_deploy_prints_a_record_per_runtime():
    runtimes = [r for r in RUNTIMES if "compiled" not in r]  # compiling is tested in tests/inference
    result = subprocess.run([sys.executable, "-m", "segrank.cli", "benchmark", "deploy", "--json", *TOY,
                             "--runtimes", *runtimes], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    records = {r["runtime"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert list(records) == runtimes
    reference = records["torch-fp32"]
    assert reference["status"] == "ok" and reference["label_agreement"] == 1.0 and set(reference) >= TIMED
    rates = reference["machine"]["matmul_gflops_per_s"]
    assert reference["fraction_of_bf16_matmul"] == pytest.approx(reference["achieved_gflops_per_s"] / rates["bf16"])
    for name in ("torch-bf16", "onnxruntime-fp32"):
        assert records[name]["status"] == "ok" and set(records[name]) >= TIMED
    assert records["onnxruntime-fp32"]["label_agreement"] >= 0.999  # the same fp32 arithmetic
    int8 = records["onnxruntime-int8"]
    if int8["status"] == "rejected":
        assert int8["label_agreement"] < INT8_MIN_AGREEMENT and "latency_s" not in int8
        assert "below 99 %" in int8["reason"]
    else:
        assert int8["status"] == "ok" and int8["label_agreement"] >= INT8_MIN_AGREEMENT
    installed = importlib.util.find_spec("openvino") is not None
    assert records["openvino-fp32"]["status"] == ("ok" if installed else "skipped")
    for record in records.values():
        assert record["status"] in ("ok", "skipped", "rejected")
        assert (record["status"] == "ok") == ("latency_s" in record)
        assert record["status"] == "ok" or record["reason"]


def test_a_missing_package_is_reported_as_skipped(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(deploy.importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else
                        real(name, *a))
    records = list(bench_deploy("vit_t16", 32, 5, "segmenter", ["openvino-fp32", "openvino-bf16"], reps=1))
    assert [r["runtime"] for r in records] == ["torch-fp32", "openvino-fp32", "openvino-bf16"]
    assert records[0]["status"] == "ok"
    for record in records[1:]:
        assert record["status"] == "skipped"
        assert record["reason"] == "openvino is not installed (pip install 'segrank[openvino]')"
