"""``segrank export onnx``: onnxruntime against PyTorch for every model family, fixed and dynamic sizes.

References are computed here from the model's public methods (forward, ``to_input_size``, ``class_map``), not
from the exporter's own comparison code. The models are tiny (patch 8, a 6x6 position table, one backbone block);
even so one export costs 4-10 CPU seconds (torch.export tracing and decomposition), so each graph is exported once
per module. Sizes are chosen off the patch grid and away from the export example.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'segrank[onnx]')")
pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'segrank[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install 'segrank[onnx]')")

from segrank import build_model  # noqa: E402
from segrank.checkpoints import save_model  # noqa: E402
from segrank.cli import main  # noqa: E402
from segrank.config import ModelConfig, from_dict  # noqa: E402
from segrank.config.inference import InferenceConfig  # noqa: E402
from segrank.deploy.onnx_export import check_onnx, export_onnx, require_packages  # noqa: E402
from segrank.errors import SegrankError  # noqa: E402
from tests.conftest import tiny_model as tiny  # noqa: E402

TOL = 1e-4
TIE = 2 * TOL  # a pixel whose two best PyTorch logits are closer than this may go either way in float32
PATCH = 8
EXPORT_SIZE = (48, 48)  # the position table's own grid: the example size that used to fix H and W in the graph
DYNAMIC_SIZES = [(37, 61), (75, 29), (100, 83)]  # no multiple of the patch size, none equal to the example
BACKBONE = {"embed_dim": 16, "depth": 1, "num_heads": 1, "patch_size": PATCH, "pos_embed_grid": [6, 6],
            "mlp_ratio": 2.0, "drop_path_rate": 0.0}
HEAD = {"n_layers": 2, "d_ff": 32, "n_heads": 1, "dropout": 0.0}
RANKSEG = {**HEAD, "type": "rankseg", "topk": 4}
FAMILIES = {
    "segmenter": {"head": {**HEAD, "type": "segmenter", "n_layers": 1}},
    # 8x8 pooled tokens as in the zoo; the patch grids here (5 to 13 cells a side) give overlapping bins (fewer
    # cells than bins), equal bins and uneven bins.
    "rankseg_pooled": {"head": {**RANKSEG, "downsample": 8}},
    "rankseg_unpooled": {"head": {**RANKSEG, "downsample": None}},
    "rankseg_oce": {"backbone": {**BACKBONE, "oce_start_layer": 0},
                    "head": {**RANKSEG, "downsample": 5, "cls_emb_from_backbone": True}},
    "query2label": {"head": {**RANKSEG, "n_layers": 1, "multilabel_head": "query2label", "downsample": 3,
                             "q2l_heads": 1, "q2l_d_ff": 16}},
    "global_pool": {"head": {**RANKSEG, "n_layers": 1, "multilabel_head": "global_pool", "downsample": 3}},
}


LINEAR = {"head": {"type": "linear"}}  # the cheapest graph to export, for the CLI's failure path


def tiny_model(family: str, seed: int = 0):
    family_cfg = LINEAR if family == "linear" else FAMILIES[family]
    return tiny(9, family_cfg["head"], family_cfg.get("backbone", BACKBONE), seed=seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, dynamic) -> (model, path of its ONNX graph), exported once per module."""
    cache: dict[tuple[str, bool], tuple[torch.nn.Module, str]] = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(family: str, dynamic: bool):
        if (family, dynamic) not in cache:
            model = tiny_model(family)
            path = folder / f"{family}_{'dynamic' if dynamic else 'fixed'}.onnx"
            export_onnx(model, path, EXPORT_SIZE, dynamic=dynamic)
            cache[family, dynamic] = (model, str(path))
        return cache[family, dynamic]

    return get


def pytorch_outputs(model, image: torch.Tensor) -> dict[str, np.ndarray]:
    """The graph's outputs as PyTorch computes them, its class map, and each pixel's top-two logit margin."""
    with torch.no_grad():
        output = model(image)
        logits = model.to_input_size(output.mask_logits, image.shape[2:])
        top2 = logits.topk(2, dim=1).values
        out = {"logits": logits.numpy(), "labels": model.class_map(image).numpy(),
               "margin": (top2[:, 0] - top2[:, 1]).numpy()}
    if output.class_index is not None:
        out["class_index"] = output.class_index.numpy()
        out["image_logits"] = output.image_logits.numpy()
    return out


def onnx_outputs(session, image: torch.Tensor) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": image.numpy()}), strict=True))


def onnx_labels(out: dict[str, np.ndarray]) -> np.ndarray:
    pred = out["logits"].argmax(1)
    if "class_index" not in out:
        return pred
    return np.take_along_axis(out["class_index"], pred.reshape(len(pred), -1), axis=1).reshape(pred.shape)


def assert_same_labels(ours: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    """Identical class ids, except at pixels where PyTorch's two best logits tie within TIE (measured: at most one
    pixel per few thousand, with a margin of ~1e-7)."""
    differ = ours != ref["labels"]
    assert not (differ & (ref["margin"] > TIE)).any(), f"{int(differ.sum())} pixels differ, not all at a tie"
    assert differ.mean() < 1e-3


def assert_equal_outputs(session, model, image: torch.Tensor) -> float:
    """Logits within TOL, identical class ids (up to float ties); returns max |Δlogit|."""
    ref, ours = pytorch_outputs(model, image), onnx_outputs(session, image)
    assert ours["logits"].shape == ref["logits"].shape
    diff = float(np.abs(ours["logits"] - ref["logits"]).max())
    assert diff <= TOL, f"max |Δlogit| {diff}"
    if "class_index" in ref:
        np.testing.assert_array_equal(ours["class_index"], ref["class_index"])
        assert np.abs(ours["image_logits"] - ref["image_logits"]).max() <= TOL
    assert_same_labels(onnx_labels(ours), ref)
    return diff


def session_of(path: str):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fixed_size_export_equals_pytorch(family, exported):
    model, path = exported(family, False)
    session = session_of(path)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 2, 3):
        assert_equal_outputs(session, model, torch.randn(batch, 3, *EXPORT_SIZE, generator=g))
    with pytest.raises(Exception, match="dimensions"):  # the size is fixed: onnxruntime rejects another one
        session.run(None, {"image": np.zeros((1, 3, 40, 48), np.float32)})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dynamic_export_equals_pytorch_at_other_sizes(family, exported):
    model, path = exported(family, True)
    session = session_of(path)
    g = torch.Generator().manual_seed(2)
    for i, size in enumerate([EXPORT_SIZE, *DYNAMIC_SIZES]):
        assert_equal_outputs(session, model, torch.randn(1 + i % 2, 3, *size, generator=g))


def test_check_detects_a_graph_of_other_weights(exported):
    """The comparison behind --check fails when the graph does not compute the model (here: other weights)."""
    _, path = exported("rankseg_pooled", True)
    ok = check_onnx(tiny_model("rankseg_pooled"), path, [EXPORT_SIZE, DYNAMIC_SIZES[0]], labels=False, tol=TOL)
    assert all(r.passed(TOL) for r in ok)
    bad = check_onnx(tiny_model("rankseg_pooled", seed=1), path, [EXPORT_SIZE], labels=False, tol=TOL)
    assert not bad[0].passed(TOL)
    assert bad[0].label_agreement < 1.0


@pytest.fixture
def checkpoint(tmp_path):
    def write(family: str):
        path = tmp_path / f"{family}.safetensors"
        save_model(tiny_model(family), path)
        return path

    return write


def test_cli_dynamic_labels_graph_with_check(tmp_path, capsys):
    """Also: the checkpoint's class names and normalisation travel into the file's metadata."""
    model = tiny_model("rankseg_pooled")
    names = [f"class {i}" for i in range(model.num_classes)]
    model.cfg = dataclasses.replace(model.cfg, class_names=names)
    model.inference = InferenceConfig(mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0))
    ckpt, out = tmp_path / "m.safetensors", tmp_path / "labels.onnx"
    save_model(model, ckpt)
    code = main(["export", "onnx", str(ckpt), "--out", str(out), "--size", "50", "45", "--dynamic", "--labels",
                 "--check"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.count("check ") == 3 and printed.count("labels agree") == 3  # the export size and two more
    session = session_of(str(out))
    assert [o.name for o in session.get_outputs()] == ["labels"]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["segrank.class_names"]) == names
    assert json.loads(meta["segrank.mean"]) == [120, 110, 100] and json.loads(meta["segrank.std"]) == [60, 50, 40]
    g = torch.Generator().manual_seed(3)
    for size in [(50, 45), *DYNAMIC_SIZES]:
        image = torch.randn(2, 3, *size, generator=g)
        labels = session.run(None, {"image": image.numpy()})[0]
        assert labels.dtype == np.int64 and labels.shape == (2, *size)
        assert_same_labels(labels, pytorch_outputs(model, image))


def test_cli_check_mismatch_exits_2_and_writes_nothing(checkpoint, tmp_path, capsys):
    """A tolerance below float32 rounding: onnxruntime and PyTorch always differ by more, so --check must fail."""
    ckpt, out = checkpoint("linear"), tmp_path / "m.onnx"
    code = main(["export", "onnx", str(ckpt), "--out", str(out), "--size", "40", "40", "--check", "--tol", "1e-12"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("segrank export onnx: error: ") and "--check failed" in err and "|Δlogit|" in err
    assert not out.exists() and list(tmp_path.glob("*.onnx*")) == []


@pytest.mark.parametrize(("args", "message"), [
    (["missing.safetensors"], "file not found"),
    (["CKPT", "--size", "0", "64"], "--size"),
    (["CKPT", "--size", "64", "x"], "--size"),
    (["CKPT", "--size", "8", "64", "--dynamic"], "--size"),
    (["CKPT", "--opset", "9"], "--opset"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message, checkpoint, tmp_path, capsys):
    ckpt = checkpoint("segmenter")
    args = [str(ckpt) if a == "CKPT" else str(tmp_path / a) if a.endswith(".safetensors") else a for a in args]
    out = tmp_path / "m.onnx"
    assert main(["export", "onnx", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("segrank export onnx: error: ") and message in err
    assert not out.exists()


def test_gt_oracle_model_is_refused(tmp_path, capsys):
    cfg = {"num_classes": 9, "backbone": BACKBONE, "head": {**HEAD, "type": "rankseg_gt"}}
    path = tmp_path / "gt.safetensors"
    save_model(build_model(from_dict(ModelConfig, cfg)), path)
    assert main(["export", "onnx", str(path), "--out", str(tmp_path / "gt.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GT-oracle" in err
    assert not (tmp_path / "gt.onnx").exists()


def test_missing_optional_package_is_one_line_naming_the_extra():
    """Only the missing ones are named (here a made-up module beside two installed ones)."""
    with pytest.raises(SegrankError, match=r"^ONNX export needs no_such_module_xyz: pip install 'segrank\[onnx\]'$"):
        require_packages(("onnx", "no_such_module_xyz", "onnxscript"), "ONNX export")
