"""``segrank predict CKPT INPUT... --out DIR``: label, colour and overlay PNGs (and RankSeg's class ranking)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segrank import files
from segrank.checkpoints import resolve_checkpoint
from segrank.cli.flags import SubParsers, add_test_settings_options, announce_precision, positive_int
from segrank.errors import SegrankError
from segrank.inference.attention import AttentionOptions
from segrank.inference.images import collect_inputs
from segrank.inference.prediction import output_files
from segrank.inference.predictor import Predictor


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("predict", help="segment image files: label, colour and overlay PNGs (+ RankSeg class "
                                       "ranking JSON)")
    p.add_argument("checkpoint", help="model checkpoint (file, save_pretrained folder or training run's work dir)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder (never the folder of an input image)")
    p.add_argument("--force", action="store_true", help="overwrite outputs that exist in --out")
    add_test_settings_options(p)
    p.add_argument("--batch-size", type=positive_int, help="windows per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no per-image progress lines")
    p.add_argument("--attention", action="store_true",
                   help="also write <name>_attention.png: the attention of each class token on the patches (classes "
                        "of the predicted label) and of the ViT's class token, a row per layer (docs/attention.md)")
    p.add_argument("--attention-classes", nargs="+", metavar="CLASS",
                   help="names or ids of the classes to show (implies --attention)")
    p.add_argument("--attention-layers", nargs="+", metavar="LAYER",
                   help="decoder[.I], multilabel, backbone[.I] (implies --attention; default: the last decoder "
                        "layer, RankSeg's multi-label layer, the last ViT block)")
    p.set_defaults(func=run)


def default_notes(command: str, predictor: Predictor) -> list[str]:
    """One line per test setting the checkpoint does not carry (predict and serve), and how to override them."""
    notes = [f"segrank {command}: no setting stored with the checkpoint, using {note}"
             for note in predictor.settings.notes]
    if notes:
        notes.append(f"segrank {command}: --config, --mean/--std, --img-scale and --whole/--slide override them")
    return notes


def attention_options(args: argparse.Namespace) -> AttentionOptions | None:
    if not (args.attention or args.attention_classes or args.attention_layers):
        return None
    return AttentionOptions(classes=args.attention_classes, layers=args.attention_layers)


def run(args: argparse.Namespace) -> int:
    paths = collect_inputs(args.inputs)
    out = Path(args.out)
    files.ensure_writable(out, folder=True)
    predictor = Predictor(args.checkpoint, device=args.device or "auto", ms_flip=args.ms_flip,
                          batch_size=args.batch_size or 1, config=args.config, mean=args.mean, std=args.std,
                          img_scale=args.img_scale, mode=args.mode, precision=args.precision,
                          compile=args.compile, warn=False, attention=attention_options(args))
    announce_precision("predict", args.precision, predictor.precision)
    for note in default_notes("predict", predictor):
        print(note)
    check_outputs(args, predictor, paths)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SegrankError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    if removed := files.remove_stale_temps(out):
        print(f"segrank predict: removed {removed} temp files that killed runs left in {out}")
    written = []
    for i, prediction in enumerate(predictor.iterate(paths)):
        try:
            written += prediction.save(out)
        except files.WriteError as err:
            kept = f", their files are in {out}" if i else ""
            raise SegrankError(f"{err}; {i} of {len(paths)} images done{kept}") from None
        if not args.no_progress:
            print(f"[{i + 1}/{len(paths)}] {prediction.source} -> {out / prediction.name}.png", file=sys.stderr,
                  flush=True)
    print(f"segrank predict: {len(paths)} images, {len(written)} files written to {out}")
    return 0


def check_outputs(args: argparse.Namespace, predictor: Predictor, paths: list[Path]) -> None:
    """Every file the images will produce, checked as a set before the first is written (files.check_destinations)."""
    ranking = "image_logits" in predictor.model.decode_head.output_names  # image-level scores: a class ranking
    attention = attention_options(args) is not None
    outputs = [(path, str(image)) for image in paths
               for path in output_files(args.out, image.stem, ranking, attention)]
    inputs = [*paths, resolve_checkpoint(Path(args.checkpoint)), args.config]
    files.check_destinations(outputs, inputs, args.force, apart_from=paths)
