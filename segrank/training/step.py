"""One training step: forward and backward over the step's micro-batches, then the update, or none when the loss
is not finite; every rank takes the same decision at the same step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from segrank.errors import SegrankError
from segrank.models.losses import presence_targets
from segrank.runtime.distributed import any_rank
from segrank.training import state
from segrank.training.run import Run
from segrank.training.sampling import SeedStream, derive_seed, seed_everything


class NonFiniteLossError(SegrankError):
    """Training produced a NaN/inf loss (the message names the step and the loss terms)."""


@dataclass
class StepOutcome:
    """``losses``: the step's mean losses and metrics on this rank; ``skipped``: no update, the loss was not finite
    on some rank (``train.nonfinite: skip``); ``stopping``: a stop was requested on some rank, the run checkpoints
    and stops after this step."""

    losses: dict[str, torch.Tensor]
    skipped: bool
    stopping: bool


def take_step(run: Run, step: int, stop_requested: bool) -> StepOutcome:
    """Step ``step`` (0-based) at the optimiser's current learning rate. A non-finite loss raises
    NonFiniteLossError (``train.nonfinite: stop``, naming the last good checkpoint) or skips the update."""
    tc = run.cfg.train
    losses, finite = forward_backward(run, step)
    nonfinite, stopping = any_rank(run.env, not finite, stop_requested)  # every rank skips, stops or saves alike
    if nonfinite:
        run.optimizer.zero_grad(set_to_none=True)
        if tc.nonfinite == "stop":
            last = state.latest_checkpoint(run.checkpoint_dir)
            raise NonFiniteLossError(f"step {step + 1}: non-finite loss ({loss_terms(losses)}); last good checkpoint: "
                                     f"{run.checkpoint_dir / last if last else 'none'}")
    else:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(losses, nonfinite, stopping)


def forward_backward(run: Run, step: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Accumulate the gradients of one step's micro-batches; returns the step's mean losses/metrics and whether the
    loss was finite on this rank."""
    tc, env, model, ignore_index = run.cfg.train, run.env, run.model, run.info.ignore_index
    totals: dict[str, torch.Tensor] = {}
    # fp32 master weights; bf16/fp16 only inside autocast (fp32 runs are the same code path as before: disabled)
    dtype = run.precision.dtype
    autocast = torch.autocast(env.device.type, dtype=dtype, enabled=dtype != torch.float32)
    for micro in range(tc.grad_accum):
        batch = next(run.batches)
        images = batch["image"].to(env.device, non_blocking=True)
        labels = batch["label"].to(env.device, non_blocking=True)
        present = presence_targets(labels, model.num_classes, ignore_index).bool() \
            if model.needs_present_classes else None
        seed_everything(derive_seed(tc.seed, step, micro, env.rank, SeedStream.FORWARD))
        # Gradients are all-reduced once per step, on the last micro-batch.
        last = micro == tc.grad_accum - 1
        with run.ddp.no_sync() if run.ddp is not None and not last else contextlib.nullcontext():
            with autocast:
                losses = model.loss((run.ddp or model)(images, present), labels, ignore_index)
            run.scaler.scale(losses["loss"] / tc.grad_accum).backward()
        totals = {k: totals.get(k, 0.0) + v.detach().float().mean() / tc.grad_accum for k, v in losses.items()}
    return totals, bool(torch.isfinite(totals["loss"]))


def loss_terms(losses: dict[str, torch.Tensor]) -> str:
    """The loss terms of a step, for a message, e.g. "loss_seg=nan, loss_img=0.25, loss=nan"."""
    return ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if k.startswith("loss"))
