"""What each ``segrank`` command does, given its parsed arguments (the flags are declared in cli.py).

Each handler returns the exit code; bad input raises SegrankError, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from segrank import files
from segrank.benchmarks.data import bench_data
from segrank.benchmarks.eval_memory import bench_eval_memory
from segrank.benchmarks.forward import bench_forward
from segrank.benchmarks.learn import TOPK, run_learn, text_summary
from segrank.benchmarks.measure import count_flops, machine_info
from segrank.benchmarks.train_step import bench_train_step
from segrank.checkpoints import describe, load_model, resolve_checkpoint, save_model, save_pretrained
from segrank.config import ModelConfig, load_config, load_yaml, to_dict
from segrank.config.inference import InferenceConfig
from segrank.data import DATASETS, build_dataset, dataset_info
from segrank.data.check import check_dataset, format_report
from segrank.data.convert import prepare
from segrank.engine.demo import run_demo
from segrank.engine.eval_outputs import ensure_outputs_writable, write_eval_outputs
from segrank.engine.evaluate import confusion, results_of
from segrank.engine.images import check_distinct_names, collect_inputs
from segrank.engine.metrics import format_summary, format_table
from segrank.engine.onnx_export import export_onnx, graph_metadata, min_dynamic_side, output_names
from segrank.engine.predictor import Predictor
from segrank.engine.report import learning_curves
from segrank.engine.runtime import setup_distributed
from segrank.engine.serve import serve
from segrank.engine.settings import adopt_config_settings, resolve_settings
from segrank.engine.train import train
from segrank.errors import CheckpointError, SegrankError
from segrank.models.segmentor import Segmentor

# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    folder = out.suffix != ".safetensors"  # anything else is a save_pretrained folder
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists (use --force to overwrite)")
    if folder and out.is_file():
        raise CheckpointError(f"{out}: is a file; --out is a .safetensors file or a folder")
    files.ensure_writable(out, folder=folder)
    model = load_model(args.src, format=args.format, config=args.config)
    if args.config is not None and adopt_config_settings(model, Path(args.config)):
        print(f"segrank convert: test settings and class names from {args.config}")
    if folder:
        save_pretrained(model, out)
    else:
        save_model(model, out)
    print(f"wrote {out}: {describe(model)}")
    unknown = [k for k in (model.inference or InferenceConfig()).missing() if k != "palette"]
    if unknown:
        print(f"segrank convert: {args.src} records no {', '.join(unknown)}; predict will announce the defaults it "
              "uses for them")
    return 0


def info(args: argparse.Namespace) -> int:
    model = load_model(args.ckpt, format=args.format, config=args.config)
    cfg = model.cfg
    print(describe(model))
    if cfg.class_names:
        shown = ", ".join(cfg.class_names[:10]) + (", ..." if len(cfg.class_names) > 10 else "")
        print(f"classes: {shown}")
    else:
        print("classes: no names stored (class ids only)")
    # The names were printed above; the architecture follows as a config's model section.
    architecture = {key: value for key, value in to_dict(cfg).items() if key != "class_names"}
    print(yaml.safe_dump({"model": architecture}, sort_keys=False).rstrip())
    inference = model.inference or InferenceConfig()
    stored = {k: v for k, v in to_dict(inference).items() if v is not None and k != "palette"}
    print(yaml.safe_dump({"test_settings": stored}, sort_keys=False, default_flow_style=None).rstrip())
    unknown = [k for k in inference.missing() if k != "palette"]  # without one, a palette is generated
    if unknown:
        print(f"not stored: {', '.join(unknown)} (prediction announces the defaults it uses)")
    count = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("backbone", "decode_head")}
    print(f"parameters: {sum(count.values()):,} (backbone {count['backbone']:,}, head {count['decode_head']:,})")
    (height, width), what = test_size(model, Path(args.ckpt), args.config, args.size)
    images = torch.zeros(1, 3, height, width)
    # A GT-oracle head takes the image's classes: count it with as many as its top-k slots.
    present = (torch.arange(model.num_classes) < cfg.head.topk)[None] if model.needs_present_classes else None
    with torch.no_grad():
        flops = count_flops(lambda: model.class_map(images, present=present))
    print(f"GFLOPs: {flops / 1e9:.4g} for {what} of {height}x{width} pixels, to the class map (a multiply-add counts "
          "2, torch.utils.flop_counter)")
    return 0


def test_size(model: Segmentor, checkpoint: Path, config: str | None, size: list[int] | None
              ) -> tuple[tuple[int, int], str]:
    """The input one forward pass sees at test time, and what it is: ``--size``, else the sliding window or, for
    whole-image inference, a square image at the test scale, as ``segrank predict`` would find them (a config
    with only a model section gives no test settings)."""
    if size is not None:
        return (size[0], size[1]), "an input (--size)"
    settings = resolve_settings(model, checkpoint, config if config and "data" in load_yaml(config) else None)
    if settings.eval.mode == "slide":
        return tuple(settings.eval.crop_size), "one sliding window"
    short = min(settings.img_scale)
    return (short, short), "a square image at the test scale"


def export_onnx_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise SegrankError(f"{out}: --out must end with .onnx")
    if out.exists() and not args.force and not out.is_dir():
        raise SegrankError(f"{out}: already exists (use --force to overwrite)")
    files.ensure_writable(out)  # a folder, or a place that cannot be written: before the export, not after
    size = tuple(args.size) if args.size else None
    checkpoint = resolve_checkpoint(Path(args.ckpt))
    model = load_model(checkpoint, format=args.format, config=args.config)
    settings = resolve_settings(model, checkpoint)  # the normalisation `segrank predict` would use
    if size is None:  # the training crop: the size the position table was learnt at
        grid = model.cfg.backbone.pos_embed_grid
        size = (grid[0] * model.patch_size, grid[1] * model.patch_size)
    results = export_onnx(model, out, size, dynamic=args.dynamic, opset=args.opset, labels=args.labels,
                          check_tol=args.tol if args.check else None,
                          metadata=graph_metadata(settings.class_names, settings.mean, settings.std))
    for result in results:
        print(f"check {result.line()}")
    shape = f"H, W >= {min_dynamic_side(model)}" if args.dynamic else f"{size[0]}x{size[1]}"
    print(f"wrote {out}: {describe(model)}; opset {args.opset}, input image float32 (B, 3, {shape}); outputs "
          f"{', '.join(output_names(model, args.labels))}")
    guessed = any(note.startswith("normalisation") for note in settings.notes)
    print(f"input normalisation: (RGB pixel - mean) / std, mean {settings.mean}, std {settings.std}"
          + (" (a default: the checkpoint stores none)" if guessed else "") + "; stored in the file's metadata")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Training, evaluation, prediction


def train_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / Path(args.config).stem
    try:
        result = train(cfg, work_dir, resume=args.resume, device=args.device, progress=not args.no_progress)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not result["stopped"] and result["rank"] == 0:  # under torchrun, one report
        print(f"segrank train: finished {result['step']} iterations; weights: {result['checkpoint']}")
    return 0


def demo(args: argparse.Namespace) -> int:
    report = run_demo(Path(args.out), seed=args.seed, iters=args.iters, val_images=args.val_images,
                      device=args.device, force=args.force)
    print(f"segrank demo: report written to {report}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else resolve_checkpoint(Path(args.checkpoint)).with_suffix(".eval.json")
    ensure_outputs_writable(out)  # before hours of evaluation, not after
    info = dataset_info(cfg.data.dataset, cfg.data.options, cfg.data.root)
    model = load_model(args.checkpoint, config=cfg.model if args.use_config_model else None)
    if not args.use_config_model:
        check_model_overrides(args.set, cfg.model, model.cfg)
    if model.num_classes != info.num_classes:
        raise SegrankError(f"{args.checkpoint}: model has {model.num_classes} classes, dataset "
                           f"{cfg.data.dataset!r} has {info.num_classes}")
    if args.oracle and not model.needs_present_classes:
        raise SegrankError(f"--oracle: {args.checkpoint} has a {model.cfg.head.type!r} head; GT-oracle evaluation "
                           "needs a model whose head type is 'rankseg_gt'")
    env = setup_distributed(args.device)  # torchrun: each process evaluates a share of the images
    try:
        dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
        eval_cfg = cfg.eval if args.batch_size is None else dataclasses.replace(cfg.eval, batch_size=args.batch_size)
        hist, recall = confusion(model.to(env.device), dataset, eval_cfg, num_classes=info.num_classes,
                                 ignore_index=info.ignore_index, oracle=args.oracle, ms_flip=args.ms_flip,
                                 device=env.device, progress=env.main and not args.no_progress,
                                 img_scale=cfg.data.img_scale, workers=cfg.data.workers)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if env.main:
        results = results_of(hist, recall, len(dataset), info.classes)
        results |= {"checkpoint": str(args.checkpoint), "config": str(args.config), "ms_flip": args.ms_flip,
                    "oracle": args.oracle}
        print(format_table(results, info.classes) if args.per_class else format_summary(results, hist, info.classes))
        written = write_eval_outputs(out, results, hist, info.classes)
        print(f"segrank eval: results written to {out} (with {', '.join(p.name for p in written[1:])})")
    return 0


def check_model_overrides(overrides: list[str], config_model: ModelConfig, checkpoint_model: ModelConfig) -> None:
    """Refuse a ``--set model.KEY=VALUE`` that the checkpoint's model contradicts: eval would silently ignore it.
    Values the checkpoint already has are accepted (the same --set list as for training)."""

    def at(tree: Any, path: list[str]) -> Any:
        for part in path:
            tree = tree.get(part) if isinstance(tree, dict) else None
        if isinstance(tree, dict):  # a preset stands for the sizes it fills in; class names come from the dataset
            return {k: at(v, []) for k, v in tree.items() if k not in ("preset", "class_names")}
        return tree

    given, stored = to_dict(config_model), to_dict(checkpoint_model)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        path = key.split(".")[1:]
        if key.split(".")[0] != "model" or path[-1:] == ["class_names"]:
            continue
        path = path[:-1] if path[-1:] == ["preset"] else path
        if at(given, path) != at(stored, path):
            raise SegrankError(f"--set {item}: the checkpoint's model has {'.'.join(['model', *path])} = "
                               f"{at(stored, path)!r} and eval takes the model from the checkpoint; add "
                               "--use-config-model to build it from the config")


def announce_defaults(command: str, predictor: Predictor) -> None:
    for note in predictor.settings.notes:
        print(f"segrank {command}: no setting stored with the checkpoint, using {note}")
    if predictor.settings.notes:
        print(f"segrank {command}: --config, --mean/--std, --img-scale and --whole/--slide override them")


def predict(args: argparse.Namespace) -> int:
    paths = collect_inputs(args.inputs)
    check_distinct_names(paths)
    out = Path(args.out)
    files.ensure_writable(out, folder=True)
    predictor = Predictor(args.checkpoint, device=args.device or "auto", ms_flip=args.ms_flip,
                          batch_size=args.batch_size or 1, config=args.config, mean=args.mean, std=args.std,
                          img_scale=args.img_scale, mode=args.mode, warn=False)
    announce_defaults("predict", predictor)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SegrankError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    written = []
    for i, prediction in enumerate(predictor.iterate(paths)):
        written += prediction.save(out)
        if not args.no_progress:
            print(f"[{i + 1}/{len(paths)}] {prediction.source} -> {out / prediction.name}.png", file=sys.stderr,
                  flush=True)
    print(f"segrank predict: {len(paths)} images, {len(written)} files written to {out}")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    predictor = Predictor(args.checkpoint, device=args.device or "auto", ms_flip=args.ms_flip, config=args.config,
                          mean=args.mean, std=args.std, img_scale=args.img_scale, mode=args.mode, warn=False)
    announce_defaults("serve", predictor)
    serve(predictor, args.host, args.port, args.max_upload_mb, title=Path(args.checkpoint).resolve().name)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Datasets


def datasets_list(args: argparse.Namespace) -> int:
    for name, spec in DATASETS.items():
        if name == "folder":
            print(f"{name:17s} {'-':>5s} {'-':>6s} {'per classes.yaml':10s} {spec.description}")
            continue
        info = dataset_info(name)
        print(f"{name:17s} {info.num_classes:5d} {info.ignore_index:6d} {spec.normalization:10s} "
              f"{spec.description}")
    return 0


def datasets_check(args: argparse.Namespace) -> int:
    report = check_dataset(args.name, args.root, args.split, workers=args.workers)
    print(format_report(report, args.top))
    return 2 if report.problems else 0


def datasets_prepare(args: argparse.Namespace) -> int:
    if not args.src.is_dir():
        raise SegrankError(f"{args.src}: source directory not found")
    files.ensure_writable(args.dst, folder=True)
    extra = {"categories": args.categories} if args.name == "ade20k_full" else {}
    done = prepare(args.name, args.src, args.dst, workers=args.workers, progress=not args.no_progress, **extra)
    speed = f", {done.images_per_s:.1f} images/s" if done.converted else ""
    print(f"segrank datasets prepare: {args.name}: {done.images} images in {args.dst} ({done.converted} converted, "
          f"{done.images - done.converted} already there; {args.workers} workers{speed})")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Configs


def config_show(args: argparse.Namespace) -> int:
    """Print the config after ``_base_`` composition, ``--set`` overrides and derived defaults, checked like every
    command checks it; the output loads again as a config file."""
    cfg = load_config(args.config, args.set)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Benchmarks


def _print_records(args: argparse.Namespace, device: torch.device, records: Iterator[dict[str, Any]]) -> int:
    machine = machine_info(device)
    for record in records:
        record["machine"] = machine
        print(json.dumps(record) if args.json else " ".join(f"{k}={v}" for k, v in record.items() if k != "machine"))
        sys.stdout.flush()
    return 0


def _benchmark_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SegrankError("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def benchmark_forward(args: argparse.Namespace) -> int:
    device = _benchmark_device(args)
    return _print_records(args, device, bench_forward(device, args.backbone, args.size, args.classes, args.models,
                                                      args.reps, args.amp))


def benchmark_train_step(args: argparse.Namespace) -> int:
    device = _benchmark_device(args)
    return _print_records(args, device, bench_train_step(device, args.backbone, args.size, args.classes, args.batch,
                                                         args.models, args.reps))


def benchmark_eval_memory(args: argparse.Namespace) -> int:
    device = _benchmark_device(args)
    return _print_records(args, device, bench_eval_memory(device, args.backbone, args.classes,
                                                          tuple(args.image_size), args.reps))


def benchmark_data(args: argparse.Namespace) -> int:
    device = _benchmark_device(args)
    return _print_records(args, device, bench_data(crop=args.size, images=args.images, workers=args.workers,
                                                   batch_size=args.batch_size))


def benchmark_learn(args: argparse.Namespace) -> int:
    if min(args.classes) < TOPK:
        raise SegrankError(f"--classes: every N must be >= {TOPK} (RankSeg keeps {TOPK} classes per image)")
    if args.plots:
        try:  # refused before the quarter of an hour of training, not after
            Path(args.plots).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SegrankError(f"{args.plots}: cannot create the plots folder ({err.strerror})") from None
    device = _benchmark_device(args)
    result = run_learn(args.classes, args.seeds, args.iters, device=device.type, threads=torch.get_num_threads(),
                       equal_time=args.equal_time)
    if args.plots:
        for case in result["cases"]:
            learning_curves(case, Path(args.plots) / f"learn_n{case['num_classes']}_seed{case['seed']}.png", TOPK)
    print(json.dumps(files.json_safe(result), indent=1) if args.json else text_summary(result))
    return 0
