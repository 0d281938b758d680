"""``segrank export onnx CKPT --out m.onnx``: a model as a graph for deployment runtimes."""

from __future__ import annotations

import argparse
from pathlib import Path

from segrank import files
from segrank.checkpoints import FORMATS, describe, load_model, resolve_checkpoint
from segrank.cli.flags import SubParsers, command_group, positive_float, positive_int
from segrank.deploy.onnx_export import DEFAULT_OPSET, export_onnx, graph_metadata, min_dynamic_side, output_names
from segrank.errors import SegrankError
from segrank.inference.settings import resolve_settings


def add_parser(sub: SubParsers) -> None:
    formats = command_group(sub, "export", "export a model for deployment", "FORMAT")
    p = formats.add_parser("onnx", help="ONNX graph (needs the onnx extra: pip install 'segrank[onnx]'); see "
                                        "docs/deployment.md")
    p.add_argument("ckpt", help="model checkpoint (native .safetensors, mmseg .pth, official Segmenter)")
    p.add_argument("--out", required=True, help="destination .onnx file")
    p.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="input size of the graph (with --dynamic: the tracing example; default: the training crop)")
    p.add_argument("--dynamic", action="store_true", help="dynamic height and width (the batch is always dynamic)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--labels", action="store_true",
                   help="output the class-id map (argmax and RankSeg's slot-to-class mapping in the graph)")
    p.add_argument("--check", action="store_true",
                   help="compare onnxruntime with PyTorch on random inputs (the export size, and two more sizes with "
                        "--dynamic); on a mismatch exit 2 and write nothing")
    p.add_argument("--tol", type=positive_float, default=1e-4, help="largest |Δlogit| --check accepts (default: 1e-4)")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto", help="checkpoint layout")
    p.add_argument("--config", help="YAML config for formats that do not carry their architecture")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out (never the checkpoint)")
    p.set_defaults(func=run_onnx)


def run_onnx(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise SegrankError(f"{out}: --out must end with .onnx")
    checkpoint = resolve_checkpoint(Path(args.ckpt))
    files.check_destinations([(out, "--out")], [checkpoint, args.config], args.force)
    files.ensure_writable(out)  # a folder, or a place that cannot be written: before the export, not after
    size = tuple(args.size) if args.size else None
    model = load_model(checkpoint, format=args.format, config=args.config)
    settings = resolve_settings(model, checkpoint)  # the normalisation `segrank predict` would use
    if size is None:  # the training crop: the size the position table was learnt at
        grid = model.cfg.backbone.pos_embed_grid
        size = (grid[0] * model.patch_size, grid[1] * model.patch_size)
    if removed := files.remove_stale_temps(out.parent):
        print(f"segrank export: removed {removed} temp files that killed runs left in {out.parent}")
    with files.naming_write_errors(out):
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
