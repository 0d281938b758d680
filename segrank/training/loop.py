"""Iteration-based training, single process or DDP under ``torchrun``, resumable exactly, in three stages: run.py
prepares the run, step.py takes one step, and the loop here does the work after each step (log, checkpoint, stop,
evaluate). sampling.py: how every random choice derives from the seed; state.py: what the work dir holds."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from segrank.config import Config
from segrank.data import build_dataset
from segrank.evaluation.evaluate import evaluate
from segrank.reporting import plots as report
from segrank.runtime.distributed import Dist, GracefulStop, barrier, mean_over_ranks, memory_mb, process_group
from segrank.training import optim, state
from segrank.training.run import Run, prepare_run
from segrank.training.step import StepOutcome, loss_terms, take_step


@dataclass
class TrainResult:
    """Where a run ended: ``step`` (the last one taken), ``checkpoint`` (its latest weights file, None before the
    first), ``evaluation`` (the last evaluation's results, None before the first), ``stopped`` (by a signal, before
    ``max_iters``), ``rank`` (this process's under torchrun: only rank 0 should report)."""

    step: int
    checkpoint: str | None
    evaluation: dict[str, Any] | None
    stopped: bool
    rank: int


@dataclass
class LogWindow:
    """The updates since the last log record: the sums of their losses and metrics, their number, and the clock
    started at step ``since`` (restarted after an evaluation: evaluation time is not training time)."""

    since: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    clock: float = field(default_factory=time.perf_counter)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in losses.items()}
        self.count += 1

    def restart_clock(self, step: int) -> None:
        self.since, self.clock = step, time.perf_counter()

    def start_over(self, step: int) -> None:
        self.sums, self.count = {}, 0
        self.restart_clock(step)


def train(cfg: Config, work_dir: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``cfg`` in ``work_dir`` (``resume``: from its latest checkpoint), in one process or in every process
    of a torchrun job; a process group created for the run is destroyed when it ends."""
    with process_group(device) as env, contextlib.ExitStack() as held:  # held: the work-dir lock, the trackers
        run = prepare_run(cfg, work_dir, resume, env, held)
        result = TrainResult(run.start, run.checkpoint, None, False, env.rank)
        tc, window = run.cfg.train, LogWindow(run.start)
        bar = tqdm(total=tc.max_iters, initial=run.start, desc="train", dynamic_ncols=True,
                   disable=not (progress and env.main))
        with GracefulStop(announce=env.main) as stop, bar:
            for step in range(run.start, tc.max_iters):
                lr = optim.poly_lr(step, tc)
                optim.set_lr(run.optimizer, lr)
                outcome = take_step(run, step, stop.requested)
                if outcome.skipped and env.main:
                    bar.write(f"segrank train: step {step + 1}: non-finite loss ({loss_terms(outcome.losses)}), "
                              "step skipped")
                elif not outcome.skipped:
                    window.add(outcome.losses)
                bar.update(1)
                bar.set_postfix(loss=f"{outcome.losses['loss'].item():.4f}", lr=f"{lr:.2e}", refresh=False)
                after_step(run, step + 1, lr, outcome, window, result, bar)
                if result.stopped:
                    return result
        if env.main:
            report.plot_training_curves(run.work_dir)
        return result


def after_step(run: Run, done: int, lr: float, outcome: StepOutcome, window: LogWindow, result: TrainResult,
               bar: tqdm) -> None:
    """The work after step ``done`` (1-based), each at its interval and after the last step: a log record, a
    checkpoint (also when stopping), then the stop or an evaluation; ``result`` follows the run."""
    tc, env = run.cfg.train, run.env
    if done % tc.log_interval == 0 or done == tc.max_iters:
        record = log_record(window, done, lr, env)
        record["eta_s"] = round(record["time_s"] * (tc.max_iters - done))
        if env.main:
            state.append_log(run.log_path, record)
            run.trackers.log_record(record)
        window.start_over(done)
    if done % run.checkpoint_interval == 0 or done == tc.max_iters or outcome.stopping:
        result.checkpoint = save_checkpoint(run, done)
    result.step = done
    if outcome.stopping:
        if env.main:
            bar.write(f"segrank train: stopped at step {done}; resume with: segrank train <config> "
                      f"--work-dir {run.work_dir} --resume")
        result.stopped = True
    elif tc.eval_interval >= 0 and (done % run.eval_interval == 0 or done == tc.max_iters):
        result.evaluation = evaluate_run(run, done, progress=not bar.disable)  # shown where training's bar is
        window.restart_clock(done)  # evaluation time is not training time


def log_record(window: LogWindow, step: int, lr: float, env: Dist) -> dict[str, Any]:
    """Means over the window's updates (and over ranks) of every loss and metric; the keys and their units are
    listed in docs/metrics.md."""
    names = sorted(window.sums)
    values = torch.stack([window.sums[k] for k in names]) if names else torch.zeros(0)
    if names:
        values = mean_over_ranks(env, values)
    means = {k: v / max(1, window.count) for k, v in zip(names, values.tolist(), strict=True)}
    sec_per_iter = (time.perf_counter() - window.clock) / (step - window.since)
    return {"type": "train", "step": step, "lr": lr, **means, "time_s": round(sec_per_iter, 4),
            "memory_mb": round(memory_mb(env.device), 1)}


def save_checkpoint(run: Run, step: int) -> str:
    """Rank 0 writes the checkpoint of ``step``, the others wait for it; returns its weights file (on every rank)."""
    tc = run.cfg.train
    if run.env.main:
        state.save_training_state(run.checkpoint_dir, step, run.model, run.optimizer,
                                  run.scaler.state_dict() if run.scaler.is_enabled() else {}, tc.seed,
                                  tc.keep_checkpoints)
    barrier(run.env)
    return str(state.weights_path(run.checkpoint_dir, step))


def evaluate_run(run: Run, step: int, progress: bool) -> dict[str, Any]:
    """Evaluate the model on the validation split (under torchrun each process a share); rank 0 writes the results
    to the work dir and plots the curves."""
    cfg = run.cfg
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    results = evaluate(run.model, dataset, cfg.eval, num_classes=cfg.model.num_classes,
                       ignore_index=run.info.ignore_index, class_names=cfg.model.class_names,
                       progress=progress, img_scale=cfg.data.img_scale,
                       workers=cfg.data.workers)
    if run.env.main:
        results_file = state.write_eval_results(run.work_dir, step, results)
        run.trackers.log_eval(step, results, results_file)
        report.plot_training_curves(run.work_dir)
    return results
