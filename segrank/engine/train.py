"""Iteration-based training, single process or DDP under ``torchrun``, resumable exactly.

Determinism: the samples of step ``t`` are global positions ``t*B .. t*B+B-1`` of a stream of seeded permutations of
the dataset (one per pass), each loaded as ``dataset[(index, seed)]`` with its own augmentation seed; the model's
random numbers (dropout, drop path) are reseeded from (seed, step, micro-batch, rank) before every forward. Nothing
random depends on history, so a resumed run equals an uninterrupted one, and the union over ranks of one step's
samples is the single-process batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from segrank.checkpoints import _atomic_write, load_backbone_weights
from segrank.config import Config, ConfigError, TrainConfig, from_dict, to_dict
from segrank.engine import optim, report, state
from segrank.errors import SegrankError
from segrank.models.losses import presence_targets
from segrank.models.segmentor import Segmentor


class NonFiniteLossError(SegrankError):
    """Training produced a NaN/inf loss (the message names the step and the loss terms)."""


# --------------------------------------------------------------------------------------------------------------
# Seeds and data order


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SampleStream:
    """Global sample positions -> dataset indices: pass ``e`` over the data is a permutation seeded by (seed, e)."""

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed = num_items, seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __getitem__(self, position: int) -> tuple[int, int]:
        """(dataset index, augmentation seed) of global position ``position``."""
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 1))
            self._epoch, self._order = epoch, torch.randperm(self.num_items, generator=generator)
        return int(self._order[offset]), derive_seed(self.seed, position, 2)


class StepBatches(Sampler):
    """Micro-batches of this rank from ``start_step`` to ``max_iters``: step t, micro-batch a, rank r gets global
    positions t*B + (a*W + r)*b + [0, b) with b = B / (W*A)."""

    def __init__(self, stream: SampleStream, start_step: int, max_iters: int, batch: int, rank: int, world: int,
                 accum: int) -> None:
        self.stream, self.start, self.stop = stream, start_step, max_iters
        self.batch, self.rank, self.world, self.accum = batch, rank, world, accum
        self.micro = batch // (world * accum)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            for a in range(self.accum):
                first = step * self.batch + (a * self.world + self.rank) * self.micro
                yield [self.stream[p] for p in range(first, first + self.micro)]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items])}


# --------------------------------------------------------------------------------------------------------------
# Processes, signals, work directory


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SegrankError("--device cuda: no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, torch.device(device, local_rank) if device == "cuda" else torch.device("cpu"))


class GracefulStop:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 0. Second: exit at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        print(f"\nsegrank train: {signal.Signals(signum).name} received, saving a checkpoint after this step "
              "(send it again to exit at once)", flush=True)


def prepare_work_dir(work_dir: Path, cfg: Config, resume: bool) -> None:
    """Create the run folder with its resolved config; on resume, check the config is the stored one."""
    resolved = to_dict(cfg)
    config_path = work_dir / "config.yaml"
    if resume:
        if not config_path.is_file():
            raise state.ResumeError(f"{work_dir}: nothing to resume (no config.yaml)")
        stored = from_dict(Config, yaml.safe_load(config_path.read_text()))
        if to_dict(stored) != resolved:
            key = _first_difference(to_dict(stored), resolved)
            raise state.ResumeError(f"{config_path}: differs from the given config at {key}; resume with the same "
                                    "config and --set options")
        return
    if work_dir.exists() and (not work_dir.is_dir() or any(work_dir.iterdir())):
        raise SegrankError(f"{work_dir}: work directory exists and is not empty (pass --resume to continue it, or "
                           "choose another --work-dir)")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(config_path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(resolved, sort_keys=False)))
    except OSError as err:
        raise SegrankError(f"{work_dir}: cannot write the work directory ({err.strerror})") from None


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return f"{path} ({a!r} -> {b!r})"


def append_log(path: Path, record: dict[str, Any]) -> None:
    """Append a record to log.jsonl, and mirror its numbers to TensorBoard when that package is installed."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    writer = tensorboard_writer(path.parent)
    if writer is not None:
        for key, value in record.items():
            if key not in ("type", "step") and isinstance(value, (int, float)):
                writer.add_scalar(f"{record['type']}/{key}", value, record["step"])
        writer.flush()


@functools.cache
def tensorboard_writer(work_dir: Path) -> Any:
    """A SummaryWriter on ``work_dir/tensorboard`` if the optional tensorboard package is installed, else None."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(work_dir / "tensorboard"))


def truncate_log(path: Path, step: int) -> None:
    """Drop records a killed run wrote after the checkpoint it resumes from."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        _atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------------------------
# Training


def train(cfg: Config, work_dir: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` in ``work_dir``; returns {"step", "checkpoint" (weights file), "eval" (last results),
    "stopped" (by a signal)}."""
    from segrank.data import build_dataset, dataset_info

    cfg = copy.deepcopy(cfg)  # class names get filled in below
    work_dir, tc = Path(work_dir), cfg.train
    env = setup_distributed(device)
    info = dataset_info(cfg.data.dataset, cfg.data.options, cfg.data.root)
    if cfg.model.num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but dataset {cfg.data.dataset!r} has "
                          f"{info.num_classes} classes")
    if cfg.model.class_names is None:
        cfg.model.class_names = list(info.class_names)
    if tc.batch_size % (env.world * tc.grad_accum):
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not divisible by {env.world} processes x "
                          f"grad_accum {tc.grad_accum}")
    reach = [side * max(cfg.data.ratio_range) for side in sorted(cfg.data.img_scale)]
    if any(c > r for c, r in zip(sorted(cfg.data.crop_size), reach, strict=True)):
        raise ConfigError(f"data.crop_size: {list(cfg.data.crop_size)} is larger than any resized training image "
                          f"(img_scale {list(cfg.data.img_scale)} x ratio {max(cfg.data.ratio_range)})")
    ckpt_interval = tc.checkpoint_interval or max(1, tc.max_iters // 10)
    eval_interval = tc.eval_interval or max(1, tc.max_iters // 10)
    ckpt_dir, log_path = work_dir / "checkpoints", work_dir / "log.jsonl"

    torch.manual_seed(tc.seed)
    model = Segmentor(cfg.model)
    if tc.pretrained and not resume:
        load_backbone_weights(model, tc.pretrained)
    model.to(env.device).train()
    optimizer = optim.build_optimizer(model, tc)
    scaler = torch.amp.GradScaler(env.device.type, enabled=tc.amp == "fp16" and env.device.type == "cuda")
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    if env.main:  # the run is refused (bad data, no room for a checkpoint) before the work directory is touched
        state.check_disk_space(work_dir, model, optimizer)
        prepare_work_dir(work_dir, cfg, resume)
    _barrier(env)
    start, result = 0, {"step": 0, "checkpoint": None, "eval": None, "stopped": False}
    if resume and state.latest_checkpoint(ckpt_dir) is not None:
        saved = state.load_training_state(ckpt_dir, model, optimizer)
        if scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
        start = result["step"] = saved["step"]
        result["checkpoint"] = str(ckpt_dir / f"{state.latest_checkpoint(ckpt_dir)}.safetensors")
    if env.main:
        truncate_log(log_path, start)
    ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.world > 1 else None

    sampler = StepBatches(SampleStream(len(train_set), tc.seed), start, tc.max_iters, tc.batch_size, env.rank,
                          env.world, tc.grad_accum)
    # Keys are (index, augmentation seed): segrank datasets draw every random choice of an item from its seed.
    batches = iter(DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.workers, collate_fn=collate,
                              pin_memory=env.device.type == "cuda"))
    bar = tqdm(total=tc.max_iters, initial=start, desc="train", dynamic_ncols=True, disable=not (progress and env.main))
    sums: dict[str, torch.Tensor] = {}
    logged, tick, ticked = 0, time.perf_counter(), start

    with GracefulStop() as stop, bar:
        for step in range(start, tc.max_iters):
            lr = optim.poly_lr(step, tc)
            optim.set_lr(optimizer, lr)
            losses, finite = _forward_backward(model, ddp, scaler, batches, step, tc, env, info.ignore_index)
            flags = torch.tensor([not finite, stop.requested], dtype=torch.float32, device=env.device)
            if ddp is not None:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank skips, stops or saves at the same step
            nonfinite, stopping = flags.tolist()
            done = step + 1
            if nonfinite:
                optimizer.zero_grad(set_to_none=True)
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if k.startswith("loss"))
                if tc.nonfinite == "stop":
                    last = state.latest_checkpoint(ckpt_dir)
                    raise NonFiniteLossError(f"step {done}: non-finite loss ({terms}); last good checkpoint: "
                                             f"{ckpt_dir / last if last else 'none'}")
                if env.main:
                    bar.write(f"segrank train: step {done}: non-finite loss ({terms}), step skipped")
            else:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                sums = {k: sums.get(k, 0.0) + v for k, v in losses.items()}
                logged += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}", lr=f"{lr:.2e}", refresh=False)

            if done % tc.log_interval == 0 or done == tc.max_iters:
                record = _log_record(sums, logged, done, lr, env, (time.perf_counter() - tick) / (done - ticked))
                record["eta_s"] = round(record["time"] * (tc.max_iters - done))
                if env.main:
                    append_log(log_path, record)
                sums, logged, tick, ticked = {}, 0, time.perf_counter(), done
            if done % ckpt_interval == 0 or done == tc.max_iters or stopping:
                if env.main:
                    result["checkpoint"] = str(state.save_training_state(
                        ckpt_dir, done, model, optimizer, scaler.state_dict() if scaler.is_enabled() else {},
                        tc.seed, tc.keep_checkpoints))
                _barrier(env)
            result["step"] = done
            if stopping:
                if env.main:
                    bar.write(f"segrank train: stopped at step {done}; resume with: segrank train <config> "
                              f"--work-dir {work_dir} --resume")
                result["stopped"] = True
                return result
            if tc.eval_interval >= 0 and (done % eval_interval == 0 or done == tc.max_iters):
                result["eval"] = _evaluate(model, cfg, info, done, work_dir, env, progress)
                tick, ticked = time.perf_counter(), done  # evaluation time is not training time
    if env.main:
        report.plot_training_curves(work_dir)
    return result


def _forward_backward(model: Segmentor, ddp: DistributedDataParallel | None, scaler: torch.amp.GradScaler,
                      batches: Iterator[dict[str, torch.Tensor]], step: int, tc: TrainConfig, env: Dist,
                      ignore_index: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Accumulate the gradients of one step's micro-batches; returns the step's mean losses/metrics and whether the
    loss was finite on this rank."""
    totals: dict[str, torch.Tensor] = {}
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16 if tc.amp == "bf16" else torch.float16,
                              enabled=tc.amp != "none")
    for micro in range(tc.grad_accum):
        batch = next(batches)
        images = batch["image"].to(env.device, non_blocking=True)
        labels = batch["label"].to(env.device, non_blocking=True)
        present = presence_targets(labels, model.num_classes, ignore_index).bool() \
            if model.needs_present_classes else None
        seed_everything(derive_seed(tc.seed, step, micro, env.rank, 3))
        # Gradients are all-reduced once per step, on the last micro-batch.
        last = micro == tc.grad_accum - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast:
                losses = model.loss((ddp or model)(images, present), labels, ignore_index)
            scaler.scale(losses["loss"] / tc.grad_accum).backward()
        totals = {k: totals.get(k, 0.0) + v.detach().float().mean() / tc.grad_accum for k, v in losses.items()}
    return totals, bool(torch.isfinite(totals["loss"]))


def _barrier(env: Dist) -> None:
    if env.world > 1:
        dist.barrier()


def _log_record(sums: dict[str, torch.Tensor], count: int, step: int, lr: float, env: Dist,
                sec_per_iter: float) -> dict[str, Any]:
    """Means over the ``count`` logged steps (and over ranks) of every loss and metric."""
    names = sorted(sums)
    values = torch.stack([sums[k] for k in names]) if names else torch.zeros(0)
    if env.world > 1 and names:
        dist.all_reduce(values)
        values /= env.world
    means = {k: v / max(1, count) for k, v in zip(names, values.tolist(), strict=True)}
    return {"type": "train", "step": step, "lr": lr, **means, "time": round(sec_per_iter, 4),
            "memory_mb": round(memory_mb(env.device), 1)}


def _evaluate(model: Segmentor, cfg: Config, info: Any, step: int, work_dir: Path, env: Dist,
              progress: bool) -> dict[str, Any]:
    from segrank.data import build_dataset
    from segrank.engine.evaluate import evaluate

    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    results = evaluate(model, dataset, cfg.eval, num_classes=cfg.model.num_classes, ignore_index=info.ignore_index,
                       class_names=cfg.model.class_names, oracle=model.needs_present_classes,
                       progress=progress and env.main, img_scale=cfg.data.img_scale, workers=cfg.data.workers)
    if env.main:
        path = work_dir / "eval" / f"{state.checkpoint_name(step)}.json"
        path.parent.mkdir(exist_ok=True)
        text = json.dumps(_nan_to_none(results | {"step": step}))  # standard JSON: NaN (undefined IoU) -> null
        _atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
        summary = {k: results[k] for k in ("mIoU", "aAcc", "mAcc", "image_recall") if k in results}
        append_log(work_dir / "log.jsonl", {"type": "eval", "step": step} | summary)
        report.plot_training_curves(work_dir)
    return results


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
