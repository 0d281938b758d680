"""Iteration-based training, single process or DDP under ``torchrun``, resumable exactly (see sampling.py for
how every random choice derives from the seed, and state.py for what the work dir holds)."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from segrank import files
from segrank.checkpoints.vit_weights import load_backbone_weights
from segrank.config import Config, ConfigError, TrainConfig
from segrank.data import DatasetInfo, build_dataset, dataset_info
from segrank.engine import optim, report, state
from segrank.engine.evaluate import evaluate
from segrank.engine.runtime import (
    Dist,
    GracefulStop,
    agree,
    barrier,
    continues_job,
    elastic_restart,
    launch_id,
    memory_mb,
    setup_distributed,
)
from segrank.engine.sampling import SampleStream, StepBatches, collate, derive_seed, seed_everything
from segrank.engine.settings import run_inference_config
from segrank.errors import SegrankError
from segrank.models.losses import presence_targets
from segrank.models.segmentor import Segmentor


class NonFiniteLossError(SegrankError):
    """Training produced a NaN/inf loss (the message names the step and the loss terms)."""


def train(cfg: Config, work_dir: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` in ``work_dir``; returns {"step", "checkpoint" (weights file), "eval" (last results),
    "stopped" (by a signal), "rank" (this process's, under torchrun: only rank 0 should report)}."""
    cfg = copy.deepcopy(cfg)  # class names get filled in below
    work_dir, tc = Path(work_dir), cfg.train
    files.ensure_writable(work_dir, folder=True)
    env = setup_distributed(device)
    # torchrun restarts the worker group after a failure (--max-restarts), SLURM may requeue a pre-empted job: a later
    # start of the torchrun job that created the work dir continues it from the latest checkpoint (the run of another
    # job there is still refused). Rank 0 decides for all, before it writes anything.
    continued = agree(env, not resume and continues_job(state.launched_by(work_dir)))
    resume = resume or continued
    info = dataset_info(cfg.data.dataset, cfg.data.options, cfg.data.root)
    if cfg.model.num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but dataset {cfg.data.dataset!r} has "
                          f"{info.num_classes} classes")
    if cfg.model.class_names is None:
        cfg.model.class_names = list(info.classes)
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
    model.inference = run_inference_config(cfg, info)  # every checkpoint carries the run's test settings
    # A checkpoint replaces the pretrained backbone; a run resumed before its first checkpoint starts from it again.
    if tc.pretrained and not (resume and state.latest_checkpoint(ckpt_dir)):
        load_backbone_weights(model, tc.pretrained)
    model.to(env.device).train()
    optimizer = optim.build_optimizer(model, tc)
    scaler = torch.amp.GradScaler(env.device.type, enabled=tc.amp == "fp16" and env.device.type == "cuda")
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    if env.main:  # the run is refused (bad data, no room for a checkpoint) before the work directory is touched
        state.check_disk_space(work_dir, model, optimizer)
        state.prepare_work_dir(work_dir, cfg, resume, launch_id())
    barrier(env)
    start, result = 0, {"step": 0, "checkpoint": None, "eval": None, "stopped": False, "rank": env.rank}
    if resume and state.latest_checkpoint(ckpt_dir) is not None:
        saved = state.load_training_state(ckpt_dir, model, optimizer)
        if scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
        start = result["step"] = saved["step"]
        result["checkpoint"] = str(ckpt_dir / f"{state.latest_checkpoint(ckpt_dir)}.safetensors")
    if continued and env.main:
        print(f"segrank train: torchrun job {launch_id()} started again (restart {elastic_restart()} of this node): "
              f"continuing {work_dir} from step {start}", flush=True)
    if env.main:
        state.truncate_log(log_path, start)
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

    with GracefulStop(announce=env.main) as stop, bar:
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
                record["eta_s"] = round(record["time_s"] * (tc.max_iters - done))
                if env.main:
                    state.append_log(log_path, record)
                sums, logged, tick, ticked = {}, 0, time.perf_counter(), done
            if done % ckpt_interval == 0 or done == tc.max_iters or stopping:
                if env.main:
                    state.save_training_state(ckpt_dir, done, model, optimizer,
                                              scaler.state_dict() if scaler.is_enabled() else {}, tc.seed,
                                              tc.keep_checkpoints)
                barrier(env)
                result["checkpoint"] = str(state.weights_path(ckpt_dir, done))  # every rank knows where it is
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


def _log_record(sums: dict[str, torch.Tensor], count: int, step: int, lr: float, env: Dist,
                sec_per_iter: float) -> dict[str, Any]:
    """Means over the ``count`` logged steps (and over ranks) of every loss and metric; the keys and their units
    are listed in docs/metrics.md."""
    names = sorted(sums)
    values = torch.stack([sums[k] for k in names]) if names else torch.zeros(0)
    if env.world > 1 and names:
        dist.all_reduce(values)
        values /= env.world
    means = {k: v / max(1, count) for k, v in zip(names, values.tolist(), strict=True)}
    return {"type": "train", "step": step, "lr": lr, **means, "time_s": round(sec_per_iter, 4),
            "memory_mb": round(memory_mb(env.device), 1)}


def _evaluate(model: Segmentor, cfg: Config, info: DatasetInfo, step: int, work_dir: Path, env: Dist,
              progress: bool) -> dict[str, Any]:
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    results = evaluate(model, dataset, cfg.eval, num_classes=cfg.model.num_classes, ignore_index=info.ignore_index,
                       class_names=cfg.model.class_names, oracle=model.needs_present_classes,
                       progress=progress and env.main, img_scale=cfg.data.img_scale, workers=cfg.data.workers)
    if env.main:
        state.write_eval_results(work_dir, step, results)
        report.plot_training_curves(work_dir)
    return results
