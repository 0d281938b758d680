"""Preparing a training run: the config checked against the dataset and the processes, the model, optimiser and
gradient scaler, the work dir, the state of a resumed run, DDP and the batches of this rank."""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from segrank import files
from segrank.checkpoints.vit_weights import load_backbone_weights
from segrank.config import Config, ConfigError, TrainConfig, to_dict
from segrank.data import DatasetInfo, build_dataset, dataset_info
from segrank.inference.settings import run_inference_config
from segrank.models.segmentor import Segmentor
from segrank.runtime.distributed import Dist, agree, barrier, continues_job, elastic_restart, launch_id
from segrank.runtime.precision import PrecisionChoice, choose_precision
from segrank.training import optim, state
from segrank.training.lock import hold_work_dir
from segrank.training.sampling import SampleStream, StepBatches, collate
from segrank.training.trackers import Trackers, check_installed, start_trackers

CHECKPOINTS, LOG = "checkpoints", "log.jsonl"  # in the work dir (state.py: what they hold)

@dataclass
class Run:
    """A run ready for its first step: ``cfg`` with the dataset's class names filled in, ``model`` (wrapped in
    ``ddp`` under torchrun) on this process's device, ``batches`` this rank's micro-batches from step ``start`` on,
    ``checkpoint`` the weights file a resumed run starts from, ``trackers`` the experiment trackers (rank 0's)."""

    cfg: Config
    info: DatasetInfo
    env: Dist
    work_dir: Path
    model: Segmentor
    ddp: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: Iterator[dict[str, torch.Tensor]]
    start: int
    checkpoint: str | None
    precision: PrecisionChoice
    trackers: Trackers = field(default_factory=Trackers)

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / CHECKPOINTS

    @property
    def log_path(self) -> Path:
        return self.work_dir / LOG

    @property
    def checkpoint_interval(self) -> int:
        return self.cfg.train.checkpoint_interval or max(1, self.cfg.train.max_iters // 10)

    @property
    def eval_interval(self) -> int:
        return self.cfg.train.eval_interval or max(1, self.cfg.train.max_iters // 10)


def prepare_run(cfg: Config, work_dir: str | Path, resume: bool, env: Dist, held: contextlib.ExitStack) -> Run:
    """Check ``cfg``, build what the run needs and (rank 0) lock, create or check ``work_dir``; a run that is
    refused (bad config or data, no room for its checkpoints, a missing tracker package, the work dir in use) is
    refused before the work dir is touched. ``held`` keeps the lock and the trackers until the run ends."""
    cfg = copy.deepcopy(cfg)  # class names get filled in below
    work_dir, tc = Path(work_dir), cfg.train
    files.ensure_writable(work_dir, folder=True)
    check_installed(tc.loggers)
    # torchrun restarts the worker group after a failure (--max-restarts), SLURM may requeue a pre-empted job: a later
    # start of the torchrun job that created the work dir continues it from the latest checkpoint (the run of another
    # job there is still refused). Rank 0 decides for all, before it writes anything.
    continued = agree(env, not resume and continues_job(state.launched_by(work_dir)))
    resume = resume or continued
    info = dataset_info(cfg.data.dataset, cfg.data.options, cfg.data.root)
    check_against_dataset(cfg, info, env.world)
    if cfg.model.class_names is None:
        cfg.model.class_names = list(info.classes)
    ckpt_dir = work_dir / CHECKPOINTS

    torch.manual_seed(tc.seed)
    model = Segmentor(cfg.model)
    model.inference = run_inference_config(cfg, info)  # every checkpoint carries the run's test settings
    # A checkpoint replaces the pretrained backbone; a run resumed before its first checkpoint starts from it again.
    if tc.pretrained and not (resume and state.latest_checkpoint(ckpt_dir)):
        load_backbone_weights(model, tc.pretrained)
    model.to(env.device).train()
    optimizer = optim.build_optimizer(model, tc)
    precision = choose_precision(tc.precision or tc.amp, env.device)  # train.amp: the deprecated spelling
    if tc.precision == "auto" and env.main:
        announce_precision(precision.reason)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision.name == "fp16" and env.device.type == "cuda")
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    if env.main:  # the run is refused (bad data, no room for a checkpoint) before the work directory is touched
        state.check_run_disk_space(ckpt_dir, model, optim.state_tensors_per_parameter(tc), checkpoints_on_disk(tc))
        held.enter_context(hold_work_dir(work_dir))  # a killed attempt's lock died with it
        state.prepare_work_dir(work_dir, cfg, resume, launch_id())
        files.remove_temps(ckpt_dir)  # of writes a killed run left; nobody else writes here while we hold the lock
    barrier(env)
    start, checkpoint = resume_state(ckpt_dir, model, optimizer, scaler) if resume else (0, None)
    if continued and env.main:
        print(f"segrank train: torchrun job {launch_id()} started again (restart {elastic_restart()} of this node): "
              f"continuing {work_dir} from step {start}", flush=True)
    trackers = Trackers()
    if env.main:
        state.truncate_log(work_dir / LOG, start)
        trackers = start_trackers(tc.loggers, work_dir, to_dict(cfg), work_dir / "config.yaml")
        held.callback(trackers.close)
    ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.world > 1 else None
    return Run(cfg, info, env, work_dir, model, ddp, optimizer, scaler, step_batches(train_set, cfg, start, env),
               start, checkpoint, precision, trackers)


@functools.cache
def announce_precision(reason: str) -> None:
    """What ``train.precision: auto`` chose and why, once per process (the demo trains four runs in one)."""
    print(f"segrank train: precision {reason}", file=sys.stderr, flush=True)



def checkpoints_on_disk(tc: TrainConfig) -> int:
    """The most checkpoints the run has on disk at once: those kept plus the one being written (all it writes when
    ``keep_checkpoints`` is 0)."""
    written = -(-tc.max_iters // (tc.checkpoint_interval or max(1, tc.max_iters // 10)))
    return min(written, tc.keep_checkpoints + 1) if tc.keep_checkpoints else written


def check_against_dataset(cfg: Config, info: DatasetInfo, world: int) -> None:
    """The model's classes are the dataset's, the batch splits into ``world`` processes x ``grad_accum``
    micro-batches, and the crop fits in the resized training images."""
    tc = cfg.train
    if cfg.model.num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but dataset {cfg.data.dataset!r} has "
                          f"{info.num_classes} classes")
    if tc.batch_size % (world * tc.grad_accum):
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not divisible by {world} processes x "
                          f"grad_accum {tc.grad_accum}")
    reach = [side * max(cfg.data.ratio_range) for side in sorted(cfg.data.img_scale)]
    if any(c > r for c, r in zip(sorted(cfg.data.crop_size), reach, strict=True)):
        raise ConfigError(f"data.crop_size: {list(cfg.data.crop_size)} is larger than any resized training image "
                          f"(img_scale {list(cfg.data.img_scale)} x ratio {max(cfg.data.ratio_range)})")


def resume_state(ckpt_dir: Path, model: Segmentor, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler) -> tuple[int, str | None]:
    """Load the latest checkpoint of ``ckpt_dir`` into the model, optimiser and scaler; returns its step and weights
    file, (0, None) when there is none yet."""
    latest = state.latest_checkpoint(ckpt_dir)
    if latest is None:
        return 0, None
    saved = state.load_training_state(ckpt_dir, model, optimizer)
    if scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    return saved["step"], str(ckpt_dir / f"{latest}.safetensors")


def step_batches(train_set: Dataset, cfg: Config, start: int, env: Dist) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches from step ``start`` to the end (sampling.py: which samples, with which seeds)."""
    tc = cfg.train
    sampler = StepBatches(SampleStream(len(train_set), tc.seed), start, tc.max_iters, tc.batch_size, env.rank,
                          env.world, tc.grad_accum)
    # Keys are (index, augmentation seed): segrank datasets draw every random choice of an item from its seed.
    return iter(DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.data.workers, collate_fn=collate,
                           pin_memory=env.device.type == "cuda"))
