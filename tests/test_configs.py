"""Every model-zoo config parses, builds its model (shrunk for speed) with its dataset's class count, runs a
forward and a loss, starts with its model-zoo row comment, and agrees with docs/model_zoo.md. Every config field
declares its meaning and, when numeric, its allowed values, and the loader refuses each value outside them."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml

import segrank
from segrank import files
from segrank.config import VIT_PRESETS, Config, ConfigError, ViTPreset, load_config, to_dict
from segrank.config.docs import render_config_docs
from segrank.config.fields import Bound, bound_of, doc_of
from segrank.training.optim import build_optimizer
from tests.reliability.common import run_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "_base_" not in p.relative_to(REPO).parts)
CLASSES_DIR = Path(segrank.__file__).parent / "resources" / "classes"
MODEL_ZOO_DOC = REPO / "docs" / "model_zoo.md"
ROW_COMMENT = re.compile(
    r"# Model zoo: (?P<row>.+) \| mIoU (?P<ss>\d+\.\d) / (?P<ms>\d+\.\d|-) \(single-scale / ms\+flip\)$"
)
# Small widths and depths so that all 29 models build and run in seconds; class counts, head type, top-k,
# multi-label branch and OCE stay as configured.
TINY = ["model.backbone.depth=2", "model.backbone.embed_dim=64", "model.backbone.num_heads=2"]


def config_id(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


def row_comment(path: Path) -> re.Match[str]:
    first = path.read_text().splitlines()[0]
    match = ROW_COMMENT.match(first)
    assert match, f"{config_id(path)}: first line is not a model-zoo row comment: {first!r}"
    return match


def test_one_config_per_model_zoo_row() -> None:
    # 30 rows; the "1 TranEnc layer" ablation row is the COCO-Stuff ViT-B 40k RankSeg config.
    assert len(CONFIGS) == 29, [config_id(p) for p in CONFIGS]
    rows = [row_comment(p)["row"] for p in CONFIGS]
    assert len(set(rows)) == len(rows), "two configs claim the same model-zoo row"
    for path in CONFIGS:
        assert path.parent.parent == REPO / "configs", f"{config_id(path)}: expected configs/<dataset>/<name>.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_matches_its_dataset(path: Path) -> None:
    row_comment(path)
    cfg = load_config(path)
    assert path.parent.name == cfg.data.dataset
    classes = json.loads((CLASSES_DIR / f"{cfg.data.dataset}.json").read_text())
    assert cfg.model.num_classes == classes["num_classes"] == len(classes["classes"])
    assert cfg.train.batch_size == 8
    assert cfg.eval.mode == "slide"
    assert cfg.eval.crop_size == cfg.eval.stride == cfg.data.crop_size
    # The position table covers the reference's img_size: 512 for ViT-B, 640 for ViT-L.
    patch = cfg.model.backbone.patch_size
    grid = {768: 512 // patch, 1024: 640 // patch}[cfg.model.backbone.embed_dim]
    assert cfg.model.backbone.pos_embed_grid == (grid, grid)


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_builds_and_runs(path: Path) -> None:
    full = load_config(path)
    overrides = list(TINY)
    if full.model.backbone.oce_start_layer is not None:
        overrides.append("model.backbone.oce_start_layer=1")  # still before the last block
    cfg = load_config(path, overrides)
    n, head = cfg.model.num_classes, cfg.model.head
    assert (n, head.type, head.topk, head.multilabel_head, head.downsample, head.n_layers) == (
        full.model.num_classes, full.model.head.type, full.model.head.topk, full.model.head.multilabel_head,
        full.model.head.downsample, full.model.head.n_layers)

    torch.manual_seed(0)
    model = segrank.build_model(cfg.model)
    build_optimizer(model, cfg.train)  # refuses a decay_mult / lr_mult key that names no parameter of the model
    images = torch.randn(1, 3, 64, 64)
    ignore_index = 255 if n < 255 else -1  # as the datasets: 255 for 8-bit labels, -1 for 16-bit ones
    labels = torch.randint(0, n, (1, 64, 64))
    present = torch.zeros(1, n, dtype=torch.bool)
    present[0, labels[:, 8:].unique()] = True
    labels[:, :8] = ignore_index
    out = model(images, present if model.needs_present_classes else None)

    assert out.dense().shape == (1, n, 4, 4)
    if head.type == "segmenter":
        assert out.class_index is None and out.image_logits is None
        assert out.mask_logits.shape == (1, n, 4, 4)
    elif head.type == "rankseg":
        assert out.class_index.shape == (1, head.topk)
        assert out.class_index.unique().numel() == head.topk
        assert out.image_logits.shape == (1, n)
        assert out.mask_logits.shape == (1, head.topk, 4, 4)
    else:  # GT oracle: exactly the present classes, ascending
        selected = out.class_index[out.class_index >= 0]
        assert torch.equal(selected, present[0].nonzero().flatten())
    losses = model.loss(out, labels, ignore_index)
    assert torch.isfinite(losses["loss"])
    assert ("loss_img" in losses) == (head.type == "rankseg")


def test_model_zoo_doc_lists_every_config_with_its_numbers() -> None:
    rows: dict[str, list[list[str]]] = {}
    for line in MODEL_ZOO_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for link in re.findall(r"\]\(\.\./(configs/[^)]+\.yaml)\)", line):
            rows.setdefault(link, []).append(cells)
    for path in CONFIGS:
        key = str(path.relative_to(REPO))
        assert key in rows, f"docs/model_zoo.md has no row linking {key}"
        match = row_comment(path)
        # Table columns: row | config | mIoU single-scale | mIoU ms+flip | weights
        assert rows[key][0][2:4] == [match["ss"], match["ms"]], key
    assert set(rows) == {str(p.relative_to(REPO)) for p in CONFIGS}
    assert sum(len(v) for v in rows.values()) == 30  # the "1 TranEnc layer" row shares a config


# ---------------------------------------------------------------------------------------------------------------
# The schema: declared meanings and bounds, enforced at load time


def schema_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, typing.Any]]:
    """(full key, field, type) of every leaf field of the config."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        out += schema_fields(tp, key + ".") if dataclasses.is_dataclass(tp) else [(key, f, tp)]
    return out


def holds(tp: typing.Any, kinds: tuple[type, ...] = (int, float)) -> bool:
    """Whether ``tp`` holds values of ``kinds``: itself, or a union, tuple, list or mapping (values) with them."""
    if tp in kinds:
        return True
    args = typing.get_args(tp)
    if typing.get_origin(tp) is dict:
        args = args[1:]
    return typing.get_origin(tp) in (typing.Union, types.UnionType, tuple, list, dict) and any(
        holds(a, kinds) for a in args)


SCHEMA = schema_fields()
BOUNDED = [(key, f, tp) for key, f, tp in SCHEMA if bound_of(f) is not None]


def test_every_field_has_a_meaning_and_every_numeric_field_a_bound():
    assert len(SCHEMA) > 60
    for key, f, tp in SCHEMA:
        assert doc_of(f), f"{key}: no doc (setting(default, doc, bound) in segrank/config/__init__.py)"
        if holds(tp):
            assert isinstance(bound_of(f), Bound), f"{key}: numeric field without a declared bound"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert bound_of(f).problem(default) is None, f"{key}: default {default!r} outside its own bound"
        else:
            assert bound_of(f) is None, f"{key}: bound on a field that holds no numbers"
    assert set(typing.get_args(ViTPreset)) == set(VIT_PRESETS)


def outside(bound: Bound, tp: typing.Any) -> float:
    """A number just outside ``bound``, of the field's number type."""
    step = 0.5 if holds(tp, (float,)) else 1
    if bound.lo is not None:
        return bound.lo if bound.lo_open else bound.lo - step
    return bound.hi if bound.hi_open else bound.hi + step


def written(value: float, tp: typing.Any) -> str:
    """``value`` as a --set value of a field of type ``tp`` (a pair, a list, a mapping or a number)."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"[{value}, {value}]"
    if origin is list:
        return f"[{value}]"
    if origin is dict:
        return f"{{some_key: {value}}}"
    return str(value)


@pytest.mark.parametrize("key,f,tp", BOUNDED, ids=[key for key, _, _ in BOUNDED])
def test_every_bound_is_enforced_at_load(key, f, tp):
    bound = bound_of(f)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*must be {re.escape(bound.range_text())}, got "):
        load_config(None, [f"{key}={written(outside(bound, tp), tp)}"])
    if holds(tp, (float,)):
        for bad in (".nan", ".inf", "-.inf"):
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*must be a finite number, got "):
                load_config(None, [f"{key}={written(bad, tp)}"])
    if bound.ordered:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be \(low, high\) with low <= high"):
            load_config(None, [f"{key}=[2.0, 1.0]"])
    if bound.nonempty:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must have at least one value"):
            load_config(None, [f"{key}=[]"])


# (overrides breaking a rule, its message, one more override that mends it)
RULE_CASES = [
    (["train.batch_size=6", "train.grad_accum=4"], "train.batch_size: 6 is not divisible by grad_accum 4",
     "train.grad_accum=3"),
    (["train.lr=0.01", "train.min_lr=0.1"], "train.min_lr: 0.1 is above train.lr 0.01", "train.min_lr=0.01"),
    (["eval.stride=[512, 768]"], "eval.stride: [512, 768] is larger than eval.crop_size [512, 512]",
     "eval.mode=whole"),
    (["model.backbone.embed_dim=100"], "model.backbone.embed_dim: 100 is not divisible by num_heads 12",
     "model.backbone.num_heads=10"),
    (["model.backbone.oce_start_layer=12"], "model.backbone.oce_start_layer: 12 is outside [0, 12)",
     "model.backbone.depth=13"),
    (["model.head.type=rankseg", "model.head.multilabel_head=query2label", "model.head.q2l_heads=5"],
     "model.head.d_model: 768 is not divisible by 4 and by q2l_heads 5", "model.head.q2l_heads=6"),
    (["model.head.type=rankseg", "model.num_classes=10"], "model.head.topk: 50 must be in [1, num_classes=10]",
     "model.head.topk=10"),
]


@pytest.mark.parametrize("overrides,message,mend", RULE_CASES, ids=[m.split(":")[0] for _, m, _ in RULE_CASES])
def test_rules_between_keys_are_enforced_at_load(overrides, message, mend):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message)
    load_config(None, [*overrides, mend])  # the same values, made consistent, load


def test_empty_config_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n", "{}\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"empty\.yaml: empty config file"):
            load_config(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- train\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


# ---------------------------------------------------------------------------------------------------------------
# The files' structure: YAML 1.2 numbers, duplicate keys, _base_ chains, bytes


# (plain YAML text, the value YAML 1.2's core schema gives it)
YAML12_SCALARS = [
    ("1e-3", 0.001), ("1E5", 100000.0), ("-2e+4", -20000.0), (".5", 0.5), ("+1.0", 1.0), ("1.", 1.0),
    ("1e-06", 1e-06), ("1.0e-05", 1e-05), ("-.5E-2", -0.005), ("012", 12), ("-7", -7), ("+3", 3), ("0x1F", 31),
    ("0o17", 15), ("1_000", "1_000"), ("1:30", "1:30"), ("0b101", "0b101"), ("1e", "1e"), ("e3", "e3"),
    (".", "."), ("1.2.3", "1.2.3"), (".inf", math.inf), ("-.Inf", -math.inf), ("+.INF", math.inf),
]


@pytest.mark.parametrize("text,value", YAML12_SCALARS, ids=[t for t, _ in YAML12_SCALARS])
def test_yaml_reads_numbers_by_yaml_1_2(text, value):
    assert files.parse_yaml(f"x: {text}") == {"x": value}
    assert type(files.parse_yaml(text)) is type(value)
    # Written back by segrank's dumper, the value (a number, or a text that looks like one) reads back as it was.
    assert files.parse_yaml(files.dump_yaml({"x": value, "as_text": text})) == {"x": value, "as_text": text}


def test_yaml_nan_is_a_float_and_yaml_module_stays_yaml_1_1():
    assert math.isnan(files.parse_yaml(".nan"))
    assert yaml.safe_load("1e-3") == "1e-3"  # yaml's own loaders are untouched (a subclass holds the YAML 1.2 rules)
    assert yaml.safe_load("1_000") == 1000


def test_exponent_numbers_in_files_and_set(tmp_path):
    (tmp_path / "cfg.yaml").write_text("model:\n  backbone: {norm_eps: 1e-06}\ntrain: {lr: 2E-3, min_lr: .5e-5}\n")
    cfg = load_config(tmp_path / "cfg.yaml", ["train.weight_decay=1e-2", "model.head.norm_eps=+1e-5"])
    assert (cfg.model.backbone.norm_eps, cfg.train.lr, cfg.train.min_lr) == (1e-06, 0.002, 5e-06)
    assert (cfg.train.weight_decay, cfg.model.head.norm_eps) == (0.01, 1e-05)
    with pytest.raises(ConfigError, match=r"^train\.max_iters: expected an integer, got '1_000'$"):
        load_config(None, ["train.max_iters=1_000"])
    assert load_config(None, ["train.max_iters=012"]).train.max_iters == 12  # YAML 1.2: decimal, not octal 10


def documented_default(key: str) -> str:
    """The default of ``key`` as docs/config.md prints it (the text between backquotes in its row)."""
    section, name = key.rsplit(".", 1)
    part = render_config_docs().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in part.splitlines() if line.startswith(f"| `{name}` |"))
    return row.split(" | ")[2].strip("`")


@pytest.mark.parametrize("key,f,tp", SCHEMA, ids=[key for key, _, _ in SCHEMA])
def test_every_documented_default_loads_again(key, f, tp):
    text = documented_default(key)
    default = to_dict(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    assert files.parse_yaml(text) == default, f"{key}: docs/config.md prints {text!r}"
    section, name = key.rsplit(".", 1)
    loaded = load_config(None, [f"{key}={text}"])
    assert to_dict(loaded) == to_dict(Config()), key  # as a --set value it leaves the config at its defaults
    nested: dict = {name: files.parse_yaml(text)}
    for part in reversed(section.split(".")):
        nested = {part: nested}
    assert files.parse_yaml(files.dump_yaml(nested)) == nested


def test_config_show_output_loads_again_with_texts_that_look_like_numbers(tmp_path, capsys):
    # Texts that YAML 1.2 would read as numbers (1e5, 0o17) are quoted when shown; 1_000 is a text in YAML 1.2.
    (tmp_path / "cfg.yaml").write_text("data: {root: '1e5', train_split: '0o17', val_split: 1_000}\n")
    sets = ["train.min_lr=1e-6", "model.backbone.norm_eps=1E-5"]
    code, out, err = run_cli(["config", "show", tmp_path / "cfg.yaml", *[a for s in sets for a in ("--set", s)]],
                             capsys)
    assert code == 0, err
    (tmp_path / "shown.yaml").write_text(out)
    shown = load_config(tmp_path / "shown.yaml")
    assert shown == load_config(tmp_path / "cfg.yaml", sets)
    assert (shown.data.root, shown.data.train_split, shown.data.val_split) == ("1e5", "0o17", "1_000")
    assert (shown.train.min_lr, shown.model.backbone.norm_eps) == (1e-6, 1e-5)


def test_duplicate_keys_are_refused_at_any_depth_but_merge_keys_override(tmp_path):
    (tmp_path / "cfg.yaml").write_text("train:\n  lr: 0.1\neval:\n  mode: whole\ntrain:\n  max_iters: 5\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: not valid YAML \(duplicate key 'train' at line 5, first at "
                                          r"line 1\)$"):
        load_config(tmp_path / "cfg.yaml")
    (tmp_path / "deep.yaml").write_text("data:\n  options:\n    sizes: {a: 1, b: 2, a: 3}\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: not valid YAML \(duplicate key 'a' at line 3, first at "
                                          r"line 3\)$"):
        load_config(tmp_path / "deep.yaml")
    # "<<: *anchor" merges a mapping whose keys the mapping itself may then set: no duplicate.
    (tmp_path / "merge.yaml").write_text("eval: &base {batch_size: 3}\ntrain:\n  max_iters: 4\n  <<: [*base, "
                                         "{max_iters: 9, lr: 0.5}]\n  batch_size: 6\n")
    cfg = load_config(tmp_path / "merge.yaml")
    assert (cfg.train.max_iters, cfg.train.lr, cfg.train.batch_size, cfg.eval.batch_size) == (4, 0.5, 6, 3)


def test_base_files_may_share_a_base_without_a_cycle(tmp_path):
    (tmp_path / "common.yaml").write_text("train: {lr: 0.5, max_iters: 3}\n")
    (tmp_path / "model.yaml").write_text("_base_: common.yaml\nmodel: {num_classes: 5}\n")
    (tmp_path / "schedule.yaml").write_text("_base_: [./common.yaml]\ntrain: {max_iters: 7}\n")
    (tmp_path / "cfg.yaml").write_text("_base_: [model.yaml, schedule.yaml]\ntrain: {lr: 0.25}\n")
    cfg = load_config(tmp_path / "cfg.yaml")
    assert (cfg.model.num_classes, cfg.train.max_iters, cfg.train.lr) == (5, 7, 0.25)
    (tmp_path / "common.yaml").write_text("_base_: ../" + tmp_path.name + "/cfg.yaml\n")
    with pytest.raises(ConfigError, match=r"common\.yaml: _base_ cycle: .*/cfg\.yaml -> .*/model\.yaml -> "
                                          r".*/common\.yaml -> .*/cfg\.yaml$"):
        load_config(tmp_path / "cfg.yaml")


def test_files_too_large_for_settings_are_refused_unread(tmp_path):
    big = tmp_path / "weights.yaml"
    with open(big, "wb") as f:
        f.truncate(files.MAX_YAML_BYTES + 1)  # sparse: nothing to write, and nothing may be read
    with pytest.raises(ConfigError, match=r"weights\.yaml: 16\.0 MiB, too large for a text file of settings"):
        load_config(big)
