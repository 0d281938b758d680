"""``model.loss.pixel_terms`` in configs: class weights from lists and files, and one line naming the key for every
bad value, before anything runs."""

from __future__ import annotations

import pytest
import torch
import yaml

from segrank import build_model
from segrank.checkpoints import load_model, save_model
from segrank.config import Config, ConfigError, from_dict, load_config, to_dict
from tests.reliability.common import run_cli


def config_with(terms, num_classes: int = 3, **loss):
    return from_dict(Config, {"model": {"num_classes": num_classes, "loss": {"pixel_terms": terms, **loss}}})


def test_class_weight_files_are_read_into_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.json").write_text("[0.5, 2, 1e1]")
    (tmp_path / "w.txt").write_text("0.5\n\n2\n  10  \n")
    cfg = config_with([{"class_weight": "w.json"}, {"type": "dice", "class_weight": "w.txt"}])
    assert [t.class_weight for t in cfg.model.loss.pixel_terms] == [[0.5, 2.0, 10.0]] * 2
    # the resolved config carries the numbers, so it loads anywhere (and checkpoints hold them)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(to_dict(cfg)))
    (tmp_path / "w.json").unlink()
    assert load_config(resolved) == cfg


def test_defaults_leave_the_reference_loss():
    loss = Config().model.loss
    assert loss.pixel_terms is None and loss.seg_reduction == "all_pixels"
    term = config_with([{}]).model.loss.pixel_terms[0]
    assert (term.type, term.weight, term.class_weight, term.avg_non_ignore) == ("cross_entropy", 1.0, None, False)


@pytest.mark.parametrize(("terms", "loss", "message"), [
    ([{"type": "dise"}], {}, r"model\.loss\.pixel_terms\[0\]\.type: 'dise' is not one of .*did you mean 'dice'"),
    ([{}, {"class_weight": [1, 2]}], {}, r"model\.loss\.pixel_terms\[1\]\.class_weight: 2 weights for num_classes=3"),
    ([{"class_weight": [1, -2, 1]}], {}, r"model\.loss\.pixel_terms\[0\]\.class_weight: every value must be >= 0"),
    ([{"class_weight": [1, float("nan"), 1]}], {}, r"pixel_terms\[0\]\.class_weight: every value must be a finite"),
    ([{}, {"type": "dice", "weight": -0.5}], {}, r"model\.loss\.pixel_terms\[1\]\.weight: must be >= 0, got -0\.5"),
    ([{"type": "focal", "gamma": -1}], {}, r"model\.loss\.pixel_terms\[0\]\.gamma: must be >= 0"),
    ([{"type": "dice", "smooth": 0}], {}, r"model\.loss\.pixel_terms\[0\]\.smooth: must be > 0"),
    ([{"wieght": 1}], {}, r"model\.loss\.pixel_terms\[0\]\.wieght: unknown key \(did you mean 'weight'\?\)"),
    ([], {}, r"model\.loss\.pixel_terms: needs at least one term"),
    ([{}], {"seg_reduction": "valid_pixels"}, r"model\.loss\.seg_reduction: valid_pixels applies without pixel_terms"),
    ([{"class_weight": "w.csv"}], {}, r"pixel_terms\[0\]\.class_weight: w\.csv: expected a \.json or \.txt file"),
    ([{"class_weight": "missing.txt"}], {}, r"pixel_terms\[0\]\.class_weight: missing\.txt: cannot read \(No such"),
    ([{"class_weight": "bad.txt"}], {}, r"pixel_terms\[0\]\.class_weight: bad\.txt: line 3 is not a number: 'x'"),
    ([{"class_weight": "bad.json"}], {}, r"pixel_terms\[0\]\.class_weight: bad\.json: not valid JSON"),
    ([{"class_weight": "dict.json"}], {}, r"pixel_terms\[0\]\.class_weight: dict\.json: expected a JSON list"),
    ([{"class_weight": "text.json"}], {}, r"pixel_terms\[0\]\.class_weight: text\.json: entry 1 is not a number"),
    ([{"class_weight": "short.txt"}], {}, r"pixel_terms\[0\]\.class_weight: 2 weights for num_classes=3"),
])
def test_bad_values_name_the_key(tmp_path, monkeypatch, terms, loss, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.txt").write_text("1\n2\nx\n")
    (tmp_path / "short.txt").write_text("1\n2\n")
    (tmp_path / "bad.json").write_text("[1, 2,")
    (tmp_path / "dict.json").write_text('{"a": 1}')
    (tmp_path / "text.json").write_text('[1, "heavy", 2]')
    with pytest.raises(ConfigError, match=message):
        config_with(terms, **loss)


def test_the_cli_refuses_a_bad_term_in_one_line(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_classes": 4, "loss": {"pixel_terms": [{"type": "hinge"}]}}}))
    code, out, err = run_cli(["config", "show", path], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "model.loss.pixel_terms[0].type: 'hinge' is not one of" in err


def test_a_checkpointed_model_config_keeps_its_terms(tmp_path):
    cfg = {"num_classes": 3, "backbone": {"embed_dim": 32, "num_heads": 2, "depth": 1, "patch_size": 8,
                                          "pos_embed_grid": [2, 2]},
           "head": {"type": "linear"}, "loss": {"pixel_terms": [{"type": "focal", "class_weight": [1, 2, 3]}]}}
    model = build_model(cfg)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.cfg.loss == model.cfg.loss
    x = torch.randn(1, 3, 16, 16)
    labels = torch.randint(0, 3, (1, 16, 16))
    assert torch.equal(loaded.loss(loaded(x), labels, 255)["loss_seg"], model.loss(model(x), labels, 255)["loss_seg"])
