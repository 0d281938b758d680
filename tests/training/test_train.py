"""Training engine: optimisation rules, data order, exact resume, graceful stop, non-finite losses, DDP parity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import segrank.training.loop as engine
from segrank import build_model
from segrank.checkpoints.mmseg import to_mmseg_name
from segrank.cli import main
from segrank.config import Config, ConfigError, TrainConfig, from_dict, to_dict
from segrank.errors import SegrankError
from segrank.models.segmentor import Segmentor
from segrank.runtime import distributed as runtime
from segrank.training import sampling, state
from segrank.training.optim import decay_multiplier, param_groups, poly_lr
from segrank.training.step import NonFiniteLossError
from tests.training import tiny_data

REPO = Path(__file__).resolve().parents[2]


def tiny_config(head: str = "rankseg", **train) -> Config:
    """12 classes, 32x32 images, a 1-block 48-d ViT: a step takes milliseconds. No dropout/drop path, so DDP and
    single-process runs can be compared exactly."""
    head_cfg = {"type": head, "n_layers": 2, "dropout": 0.0}
    if head == "rankseg":
        head_cfg |= {"topk": 4, "downsample": 2}
    return from_dict(Config, {
        "model": {"num_classes": tiny_data.NUM_CLASSES, "head": head_cfg,
                  "backbone": {"embed_dim": 48, "num_heads": 2, "depth": 1, "patch_size": 8, "pos_embed_grid": [4, 4],
                               "drop_path_rate": 0.0}},
        "data": {"dataset": "tiny", "options": {"num_images": 10}, "workers": 0},
        "train": {"max_iters": 10, "batch_size": 4, "lr": 0.01, "weight_decay": 1e-3, "log_interval": 2,
                  "checkpoint_interval": 4, "eval_interval": -1, **train},
    })


@pytest.fixture(autouse=True)
def tiny_dataset(monkeypatch):
    tiny_data.install(monkeypatch)


def final_weights(result: engine.TrainResult) -> dict[str, torch.Tensor]:
    return load_file(result.checkpoint)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------------------------
# Optimisation rules


def test_decay_multiplier_longest_substring_wins():
    keys = {"norm": 0.0, "decode_head.blocks.0.": 100.0, "pos_embed": 0.0}
    assert decay_multiplier("decode_head.blocks.0.norm1.weight", keys) == 100.0  # longer key beats "norm"
    assert decay_multiplier("decode_head.blocks.1.norm1.weight", keys) == 0.0
    assert decay_multiplier("decode_head.proj_dec.weight", keys) == 1.0  # no key: base decay
    # Equal lengths: mmcv sorts alphabetically first, so "ab" is tried before "ba".
    assert decay_multiplier("xaba", {"ba": 3.0, "ab": 2.0}) == 2.0


def test_decay_multiplier_matches_reference_names_not_ours():
    model = build_model(tiny_config().model)
    # A fake mapping renaming every parameter to a name without "norm": no parameter matches the key.
    groups = param_groups(model, 1e-2, {"norm": 0.0}, lambda name: "x." + name.replace("norm", "ln"))
    assert [g["weight_decay"] for g in groups] == [1e-2]
    groups = param_groups(model, 1e-2, {"norm": 0.0}, lambda name: name)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 1e-2]


def test_decay_multipliers_of_rankseg_config():
    """The wd=1e-6 RankSeg rows of the model zoo: backbone LNs (reference ln1/ln2) keep the base decay, head norms get 0
    except block 0's (x100, like ml_fc), position table and class token 0, class embedding base."""
    cfg = tiny_config()
    keys = {"pos_embed": 0.0, "cls_token": 0.0, "norm": 0.0, "decode_head.blocks.0.": 100.0, "decode_head.ml_fc": 100.0}
    model = build_model(cfg.model)
    wd_of = {}
    for group in param_groups(model, 1e-6, keys, to_mmseg_name):
        for p in group["params"]:
            wd_of[id(p)] = group["weight_decay"]
    wd = {name: wd_of[id(p)] for name, p in model.named_parameters()}
    expected = {
        "backbone.blocks.0.norm1.weight": 1e-6, "backbone.norm.weight": 1e-6, "backbone.blocks.0.attn.qkv.weight": 1e-6,
        "backbone.pos_embed": 0.0, "backbone.cls_token": 0.0, "decode_head.cls_emb": 1e-6,
        "decode_head.decoder_norm.weight": 0.0, "decode_head.mask_norm.bias": 0.0,
        "decode_head.blocks.1.norm2.bias": 0.0,
        "decode_head.blocks.0.norm1.weight": 1e-4, "decode_head.blocks.0.mlp.fc1.weight": 1e-4,
        "decode_head.ml_fc.W": 1e-4,
    }
    assert {k: pytest.approx(wd[k]) for k in expected} == expected


def test_poly_schedule_values():
    cfg = TrainConfig(max_iters=1000, lr=1e-3, min_lr=1e-5, lr_power=0.9)
    assert poly_lr(0, cfg) == pytest.approx(1e-3)
    assert poly_lr(1000, cfg) == pytest.approx(1e-5)
    # (1e-3 - 1e-5) * 0.5 ** 0.9 + 1e-5 with 0.5 ** 0.9 = 0.535886731...
    assert poly_lr(500, cfg) == pytest.approx(0.00099 * 0.5358867313 + 1e-5, rel=1e-8)
    lrs = [poly_lr(t, cfg) for t in range(1000)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    warm = TrainConfig(max_iters=1000, lr=1e-3, min_lr=1e-5, warmup_iters=4)
    assert poly_lr(0, warm) == pytest.approx(poly_lr(0, cfg) / 5)
    assert poly_lr(3, warm) == pytest.approx(poly_lr(3, cfg) * 4 / 5)
    assert poly_lr(4, warm) == poly_lr(4, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Data order


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (4, 1), (2, 2)])
def test_ranks_share_each_step_batch(world, accum):
    stream = sampling.SampleStream(7, seed=3)  # 7 items: steps straddle passes over the data
    single = list(sampling.StepBatches(stream, 0, 6, 4, rank=0, world=1, accum=1))
    shards = [list(sampling.StepBatches(stream, 0, 6, 4, rank=r, world=world, accum=accum)) for r in range(world)]
    for step in range(6):
        union = sorted(key for shard in shards for key in sum(shard[step * accum:(step + 1) * accum], []))
        assert union == sorted(single[step])
    # Each pass is a permutation, and another seed gives another order.
    first_pass = [sampling.SampleStream(7, seed=3)[p][0] for p in range(7)]
    assert sorted(first_pass) == list(range(7))
    assert first_pass != [sampling.SampleStream(7, seed=4)[p][0] for p in range(7)]
    # A sampler started at step 3 (resume) yields what the full one yields from step 3 on.
    assert list(sampling.StepBatches(stream, 3, 6, 4, 0, 1, 1)) == single[3:]


def test_config_must_fit_processes_and_dataset(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        engine.train(tiny_config(batch_size=3, grad_accum=2), tmp_path / "run", progress=False)
    cfg = tiny_config()
    cfg.model.num_classes = tiny_data.NUM_CLASSES + 1
    with pytest.raises(ConfigError, match=f"model.num_classes: {tiny_data.NUM_CLASSES + 1}, but dataset"):
        engine.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


# ---------------------------------------------------------------------------------------------------------------
# Work directory, resume, signals


def test_work_dir_contents_and_refusal(tmp_path):
    work = tmp_path / "run"
    result = engine.train(tiny_config(keep_checkpoints=2), work, progress=False)
    assert result.step == 10 and not result.stopped
    assert from_dict(Config, yaml.safe_load((work / "config.yaml").read_text())).train.max_iters == 10
    records = [yaml.safe_load(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    metrics = {"pixel_acc", "pixel_recall", "image_recall", "image_precision"}
    assert {"loss", "loss_seg", "loss_img", "lr", "time_s", "eta_s", "memory_mb"} | metrics <= records[0].keys()
    assert all(0.0 <= r[k] <= 1.0 for r in records for k in metrics)  # fractions, as docs/metrics.md says
    assert (work / "checkpoints" / "latest").read_text().strip() == "iter_0000010"
    kept = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert kept == ["iter_0000008.safetensors", "iter_0000008.state.pt", "iter_0000010.safetensors",
                    "iter_0000010.state.pt", "latest"]
    state_dict = torch.load(work / "checkpoints" / "iter_0000010.state.pt", weights_only=True)
    assert state_dict["step"] == 10
    assert (work / "loss.png").stat().st_size > 0 and (work / "lr.png").stat().st_size > 0
    with pytest.raises(SegrankError, match="not empty"):
        engine.train(tiny_config(), work, progress=False)
    with pytest.raises(state.ResumeError, match="train.lr"):
        engine.train(tiny_config(lr=0.02), work, resume=True, progress=False)


def interrupt_at(monkeypatch, step: int, how: str) -> None:
    """At the start of iteration ``step`` send ourselves SIGINT (graceful stop) or crash (a kill without saving)."""
    set_lr = engine.optim.set_lr
    calls = {"n": 0}

    def hook(optimizer, lr):
        if calls["n"] == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("killed")
        calls["n"] += 1
        set_lr(optimizer, lr)

    monkeypatch.setattr(engine.optim, "set_lr", hook)


@pytest.mark.parametrize(("head", "workers"), [("rankseg", 0), ("segmenter", 1)])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, monkeypatch, head, workers, capsys):
    cfg = tiny_config(head, grad_accum=2)
    cfg.data.workers = workers  # 1: augmentation runs in a worker process, not in the training process
    cfg.model.head.dropout = 0.1  # random numbers in the model too: resume must reproduce them
    full = engine.train(cfg, tmp_path / "full", progress=False)

    work = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_at(m, 5, "signal")
        stopped = engine.train(cfg, work, progress=False)
    assert stopped.stopped and stopped.step == 6
    assert "--resume" in capsys.readouterr().out
    with monkeypatch.context() as m:
        interrupt_at(m, 2, "crash")  # resumed run dies at step 8 before its next checkpoint
        with pytest.raises(RuntimeError, match="killed"):
            engine.train(cfg, work, resume=True, progress=False)
    assert state.latest_checkpoint(work / "checkpoints") == "iter_0000008"
    resumed = engine.train(cfg, work, resume=True, progress=False)
    assert resumed.step == 10
    assert_bitwise_equal(final_weights(full), final_weights(resumed))
    logged = [yaml.safe_load(line)["step"] for line in (work / "log.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8, 10]  # no duplicate records from the runs that were cut


def test_nonfinite_loss_stops_or_skips(tmp_path, monkeypatch):
    loss = Segmentor.loss
    calls = {"n": 0}

    def poisoned(self, output, labels, ignore_index):
        out = loss(self, output, labels, ignore_index)
        calls["n"] += 1
        if calls["n"] == 7:
            out["loss_seg"] = out["loss_seg"] * float("nan")
            out["loss"] = out["loss_seg"] + out["loss_img"]
        return out

    monkeypatch.setattr(Segmentor, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 7: non-finite loss \(.*loss_seg=nan.*iter_0000004"):
        engine.train(tiny_config(), tmp_path / "stop", progress=False)
    assert state.latest_checkpoint(tmp_path / "stop" / "checkpoints") == "iter_0000004"

    calls["n"] = 0
    result = engine.train(tiny_config(nonfinite="skip"), tmp_path / "skip", progress=False)
    weights = final_weights(result)
    assert result.step == 10 and all(torch.isfinite(v).all() for v in weights.values())


def test_train_cli(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config())))
    work = tmp_path / "run"
    assert main(["train", str(config), "--work-dir", str(work), "--set", "train.max_iters=3", "--no-progress"]) == 0
    assert "finished 3 iterations" in capsys.readouterr().out
    assert main(["train", str(config), "--work-dir", str(work), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["train", str(config), "--work-dir", str(work), "--set", "train.max_iters=3", "--resume",
                 "--no-progress"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Distributed


CLI_SCRIPT = """
import sys
import time
from tests.training import tiny_data
from segrank.cli import main
tiny_data.install()
sys.exit(main(sys.argv[1:]))
"""


def two_process_run(cfg: Config, tmp_path: Path, device: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 segrank train`` of ``cfg`` into ``tmp_path / "ddp"`` (with the tiny dataset)."""
    config, script = tmp_path / "tiny.yaml", tmp_path / "run.py"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    script.write_text(CLI_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script), "train", str(config), "--work-dir", str(tmp_path / "ddp"), "--device", device,
                           "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_ddp_matches_single_process(tmp_path):
    """``torchrun --nproc_per_node 2 segrank train`` (gloo), batch 4 in 2 micro-batches: each rank takes one image of
    every micro-batch. The weights after 4 steps equal a single-process run's (float rounding of the gradient
    all-reduce only); rank 0 alone reports; with one image per process the token tables' gradients are slices of
    the sequence's, and DDP does not warn that their strides differ from its buckets'."""
    cfg = tiny_config(max_iters=4, grad_accum=2)
    proc = two_process_run(cfg, tmp_path, "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = tmp_path / "ddp" / "checkpoints" / "iter_0000004.safetensors"
    assert proc.stdout.count("segrank train: finished") == 1, proc.stdout
    assert f"finished 4 iterations; weights: {weights}" in proc.stdout
    assert "grad strides" not in proc.stderr.lower(), proc.stderr[-3000:]
    single = engine.train(cfg, tmp_path / "single", progress=False)
    ddp = load_file(weights)
    reference = final_weights(single)
    torch.manual_seed(0)  # the run's seed: its initial weights
    initial = build_model(tiny_config().model).state_dict()
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference if k in initial)
    assert moved > 1e-3  # the runs did train
    assert max((ddp[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    config, work = tmp_path / "tiny.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(max_iters=100000, log_interval=1, checkpoint_interval=1000))))
    script = tmp_path / "run.py"
    script.write_text(CLI_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), "train", str(config), "--work-dir", str(work),
                             "--no-progress"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = work / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "--resume" in out
    name = state.latest_checkpoint(work / "checkpoints")
    assert name is not None and name != "iter_0100000"
    saved = torch.load(work / "checkpoints" / f"{name}.state.pt", weights_only=True)
    assert saved["step"] == int(name.split("_")[1]) >= 3


def test_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    with runtime.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
