"""``segrank benchmark deploy``: the deployment runtimes side by side on one model and one input, in one process.

The model is exported to ONNX once (``deploy.onnx_export``: logits at the input size, RankSeg's class indices and
image-level logits); every runtime computes those outputs for the same (1, 3, S, S) image, timed interleaved
(``measure.time_interleaved``), and its class map is compared with PyTorch fp32's:

- ``torch-fp32``, ``torch-bf16``: segrank eager (bf16: weights converted once, ``inference/precision.py``);
- ``torch-compiled-fp32``, ``torch-compiled-bf16``: ``torch.compile`` with freezing (``inference/compiled.py``);
- ``onnxruntime-fp32`` and ``onnxruntime-int8`` (``quantize_dynamic``: int8 weights of the matrix products, reported
  only when its labels agree with PyTorch fp32 on at least ``INT8_MIN_AGREEMENT`` of the pixels, else rejected);
- ``openvino-fp32``, ``openvino-bf16`` (``INFERENCE_PRECISION_HINT``; bf16 only where OpenVINO runs it on this CPU).

A runtime whose package (or compiler, or CPU support) is missing is reported as skipped with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segrank.benchmarks.measure import YARDSTICK_PRECISIONS, matmul_yardstick, model_config, time_interleaved
from segrank.data.info import HALF_MEAN, HALF_STD
from segrank.data.synthetic import synthetic_options, synthetic_scene
from segrank.data.transforms import normalize
from segrank.deploy.onnx_export import EXPORT_PACKAGES, ExportGraph, export_onnx, labels_from, output_names
from segrank.errors import SegrankError
from segrank.inference.compiled import compile_for_inference, compile_problem
from segrank.inference.flops import count_flops
from segrank.inference.precision import inference_copy, precision_autocast
from segrank.models.segmentor import Segmentor
from segrank.runtime.precision import choose_precision

INT8_MIN_AGREEMENT = 0.99
CPU = torch.device("cpu")
Outputs = dict[str, np.ndarray]
Run = Callable[[], Outputs]


class Skipped(Exception):
    """A runtime that cannot run here; the message says why."""


@dataclass
class Case:
    """What every runtime runs: the model, its input, the torch thread count and a folder for the ONNX files."""

    model: Segmentor
    image: torch.Tensor
    threads: int
    folder: Path
    exported: Path | str | None = None  # the ONNX file once exported, or why it could not be

    def onnx(self) -> Path:
        """The model as an ONNX file (static size, batch axis dynamic), exported at the first call only."""
        if self.exported is None:
            self.exported = export_once(self.model, tuple(self.image.shape[-2:]), self.folder / "model.onnx")
        if isinstance(self.exported, str):
            raise Skipped(self.exported)
        return self.exported


def torch_runner(case: Case, precision: str, compiled: bool) -> Run:
    """segrank's PyTorch model, eager or compiled, in ``precision``: the exported graph's outputs as arrays."""
    choice = choose_precision(precision, CPU)
    graph = ExportGraph(inference_copy(case.model, choice), labels=False).eval()
    if compiled:
        problem = compile_problem(CPU)
        if problem is not None:
            raise Skipped(problem)
        graph = compile_for_inference(graph, CPU)
    names = output_names(case.model, labels=False)

    def run() -> Outputs:
        with torch.inference_mode(), precision_autocast(choice, CPU):
            outputs = graph(case.image)
        return {n: (t.float() if t.is_floating_point() else t).numpy() for n, t in zip(names, outputs, strict=True)}

    return run


def optional_module(name: str, extra: str) -> Any:
    """The optional package ``name``, or Skipped saying how to install it."""
    if importlib.util.find_spec(name) is None:
        raise Skipped(f"{name} is not installed (pip install 'segrank[{extra}]')")
    return importlib.import_module(name)


def onnxruntime_runner(case: Case, path: Path) -> Run:
    ort = optional_module("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = case.threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = {"image": case.image.numpy()}
    return lambda: dict(zip(names, session.run(None, feed), strict=True))


def onnxruntime_int8_runner(case: Case) -> Run:
    """onnxruntime on the fp32 graph with its matrix-product weights quantised to int8 (dynamic activations)."""
    optional_module("onnxruntime", "onnx")
    quantization = importlib.import_module("onnxruntime.quantization")
    prepared, path = case.onnx().with_name("model_prepared.onnx"), case.onnx().with_name("model_int8.onnx")
    # onnxruntime's recommended pre-processing (shape inference, graph optimisation) before quantising.
    quantization.quant_pre_process(str(case.onnx()), str(prepared), skip_symbolic_shape=True)
    quantization.quantize_dynamic(str(prepared), str(path), weight_type=quantization.QuantType.QInt8)
    return onnxruntime_runner(case, path)


def openvino_runner(case: Case, precision: str) -> Run:
    """OpenVINO on the CPU with ``INFERENCE_PRECISION_HINT`` f32 or bf16 (skipped where it would not run bf16)."""
    ov = optional_module("openvino", "openvino")
    core = ov.Core()
    hint = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16}[precision]
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" and "BF16" not in capabilities:
        raise Skipped(f"OpenVINO does not run bf16 on this CPU (its capabilities: {', '.join(capabilities)})")
    compiled = core.compile_model(core.read_model(str(case.onnx())), "CPU",
                                  {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": case.threads})
    effective = compiled.get_property("INFERENCE_PRECISION_HINT")
    if effective != hint:
        raise Skipped(f"OpenVINO compiled the graph for {effective}, not {hint}")
    names = [o.get_any_name() for o in compiled.outputs]
    image = case.image.numpy()
    return lambda: {n: np.asarray(v) for n, v in zip(names, compiled(image).values(), strict=True)}


# Name -> (precision, setup). torch-fp32 is the reference the others' labels are compared with: it always runs.
RUNTIMES: dict[str, tuple[str, Callable[[Case], Run]]] = {
    "torch-fp32": ("fp32", lambda c: torch_runner(c, "fp32", compiled=False)),
    "torch-bf16": ("bf16", lambda c: torch_runner(c, "bf16", compiled=False)),
    "torch-compiled-fp32": ("fp32", lambda c: torch_runner(c, "fp32", compiled=True)),
    "torch-compiled-bf16": ("bf16", lambda c: torch_runner(c, "bf16", compiled=True)),
    "onnxruntime-fp32": ("fp32", lambda c: onnxruntime_runner(c, c.onnx())),
    "onnxruntime-int8": ("int8", onnxruntime_int8_runner),
    "openvino-fp32": ("fp32", lambda c: openvino_runner(c, "fp32")),
    "openvino-bf16": ("bf16", lambda c: openvino_runner(c, "bf16")),
}
REFERENCE = "torch-fp32"


def scene_image(size: int) -> torch.Tensor:
    """A (1, 3, size, size) normalised synthetic scene: regions and textures, as images have."""
    rgb, _ = synthetic_scene(0, "val", synthetic_options({"image_size": size}))
    return normalize(rgb, HALF_MEAN, HALF_STD)[None]


def export_once(model: Segmentor, size: tuple[int, int], path: Path) -> Path | str:
    """``model`` exported to ``path``, or why it cannot be."""
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"the ONNX export needs {', '.join(missing)} (pip install 'segrank[onnx]')"
    try:
        export_onnx(model, path, size)
    except SegrankError as err:
        return f"ONNX export failed: {err}"
    return path


def bench_deploy(backbone: str, size: int, num_classes: int, head: str, runtimes: list[str], reps: int,
                 model: Segmentor | None = None) -> Iterator[dict[str, Any]]:
    """One record per runtime of ``runtimes`` (torch-fp32, the reference, is always run): latency, the fraction of
    this machine's fp32 and bf16 matrix-multiply rates it achieves, its label agreement with PyTorch fp32. ``model``:
    a loaded checkpoint's model instead of a seeded random one of ``backbone``, ``num_classes`` and ``head``."""
    given = model is not None
    torch.manual_seed(0)
    model = model if given else Segmentor(model_config(backbone, head, num_classes, size))
    model = model.eval().to(CPU)
    rates = {name: matmul_yardstick(CPU, name)[0] for name in YARDSTICK_PRECISIONS}
    image = scene_image(size)
    with torch.inference_mode():
        flops = count_flops(lambda: model(image))
    names = [REFERENCE, *(r for r in runtimes if r != REFERENCE)]
    described = {"benchmark": "deploy", "backbone": model.cfg.backbone.preset if given else backbone, "size": size,
                 "classes": model.num_classes, "model": model.cfg.head.type, "gflops": flops / 1e9}
    with tempfile.TemporaryDirectory(prefix="segrank-deploy-") as folder:
        case = Case(model, image, torch.get_num_threads(), Path(folder))
        runs, first, skipped = {}, {}, {}
        for name in names:
            try:
                runs[name] = RUNTIMES[name][1](case)
                start = time.perf_counter()
                runs[name]()  # compiles where the runtime compiles at its first call
                first[name] = time.perf_counter() - start
            except Skipped as err:
                skipped[name] = str(err)
        times = time_interleaved(runs, reps, CPU)
        labels = {name: labels_from(run()) for name, run in runs.items()}
    for name in names:
        record = described | {"runtime": name, "precision": RUNTIMES[name][0]}
        if name in skipped:
            yield record | {"status": "skipped", "reason": skipped[name]}
            continue
        agreement = float((labels[name] == labels[REFERENCE]).mean())
        if name == "onnxruntime-int8" and agreement < INT8_MIN_AGREEMENT:
            yield record | {"status": "rejected", "label_agreement": agreement,
                            "reason": f"labels agree with torch-fp32 on {100 * agreement:.2f} % of the pixels, "
                                      f"below {100 * INT8_MIN_AGREEMENT:g} %"}
            continue
        achieved = flops / times[name] / 1e9
        yield record | {"status": "ok", "latency_s": times[name], "first_call_s": first[name],
                        "achieved_gflops_per_s": achieved,
                        **{f"fraction_of_{p}_matmul": achieved / rates[p] for p in YARDSTICK_PRECISIONS},
                        "label_agreement": agreement}

