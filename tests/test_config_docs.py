"""docs/config.md is the rendering of the config declarations, and ``segrank config show`` prints a config that
loads again to the same values."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from segrank.config import Config, load_config
from segrank.config.docs import REGENERATE, render_config_docs
from tests.reliability.common import run_cli

REPO = Path(__file__).resolve().parents[1]
ZOO_CONFIG = REPO / "configs" / "coco_stuff10k" / "rankseg_query2label_vit-b16_512x512_40k.yaml"


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys += all_keys(hints[f.name], key + ".") if dataclasses.is_dataclass(hints[f.name]) else [key]
    return keys


def test_config_doc_is_current():
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == render_config_docs(), f"docs/config.md is stale: regenerate it with `{REGENERATE}`"


def test_config_doc_has_a_row_per_key():
    text = render_config_docs()
    for key in all_keys():
        section, name = key.rsplit(".", 1)
        part = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert f"\n| `{name}` |" in part, key
    assert "| `batch_size` | int | `8` | >= 1 | global batch per optimiser step" in text
    assert "| `ratio_range` | [float, float] | `[0.5, 2.0]` | > 0, first <= second |" in text


def test_config_show_prints_the_resolved_config(tmp_path, capsys):
    sets = ["train.max_iters=1000", "model.head.topk=20"]
    code, out, err = run_cli(["config", "show", ZOO_CONFIG, *[a for s in sets for a in ("--set", s)]], capsys)
    assert code == 0 and err == ""
    shown = yaml.safe_load(out)
    assert shown["train"]["max_iters"] == 1000 and shown["model"]["head"]["topk"] == 20
    assert shown["model"]["head"]["d_model"] == 768  # derived defaults are filled in
    assert shown["model"]["head"]["multilabel_head"] == "query2label"  # from the file, not a default
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(out)
    assert load_config(resolved) == load_config(ZOO_CONFIG, sets)
