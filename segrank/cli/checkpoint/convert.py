"""``segrank convert SRC --out DST``: a reference checkpoint as segrank's .safetensors or a save_pretrained folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from segrank import files
from segrank.checkpoints import FORMATS, describe, load_model, resolve_checkpoint, save_model, save_pretrained
from segrank.checkpoints.detect import PRETRAINED_FILES
from segrank.cli.flags import SubParsers
from segrank.config.inference import InferenceConfig
from segrank.errors import CheckpointError
from segrank.inference.settings import adopt_config_settings


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("convert", help="convert a reference checkpoint to segrank's .safetensors")
    p.add_argument("--from", dest="format", choices=["auto", *FORMATS[1:]], default="auto",
                   help="layout of SRC (default: detect)")
    p.add_argument("src", help="checkpoint: a file, a save_pretrained folder, a training run's work dir (its latest "
                               "checkpoint) or an official Segmenter run folder")
    p.add_argument("--config", help="YAML config giving the architecture (needed for npz/timm) and, when it has a "
                                    "data section, the test settings and class names the checkpoint will carry")
    p.add_argument("--out", required=True, help="destination: a .safetensors file, or a folder for the Hugging Face "
                                                "layout (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out: a .safetensors file, or a "
                                                        "folder of config.json + model.safetensors (never the source)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    folder = out.suffix != ".safetensors"  # anything else is a save_pretrained folder
    if folder and out.is_file():
        raise CheckpointError(f"{out}: is a file; --out is a .safetensors file or a folder")
    check_outputs(out, folder, [resolve_checkpoint(Path(args.src)), args.config], args.force)
    files.ensure_writable(out, folder=folder)
    model = load_model(args.src, format=args.format, config=args.config)
    if args.config is not None and adopt_config_settings(model, Path(args.config)):
        print(f"segrank convert: test settings and class names from {args.config}")
    if removed := files.remove_stale_temps(out.parent):
        print(f"segrank convert: removed {removed} temp files that killed runs left in {out.parent}")
    try:  # through a temp folder beside --out: a killed or failed write leaves --out as it was
        with files.naming_write_errors(out):
            files.staged_write(out, lambda tmp: save_pretrained(model, tmp) if folder else save_model(model, tmp),
                               folder=folder)
    except files.WriteError as err:
        raise CheckpointError(f"{err}; nothing was written") from None
    print(f"wrote {out}: {describe(model)}")
    unknown = [k for k in (model.inference or InferenceConfig()).missing() if k != "palette"]
    if unknown:
        print(f"segrank convert: {args.src} records no {', '.join(unknown)}; predict will announce the defaults it "
              "uses for them")
    return 0


def check_outputs(out: Path, folder: bool, inputs: list[Path | str | None], force: bool) -> None:
    """--out is never the source, nor inside a source folder; an existing file or checkpoint folder needs --force,
    a folder of other files is never replaced (files.check_destinations, files.check_folder_destination)."""
    if folder:
        files.check_destinations([(out / name, "--out") for name in PRETRAINED_FILES], inputs, force=True)
        files.check_folder_destination(out, PRETRAINED_FILES, force)
    else:
        files.check_destinations([(out, "--out")], inputs, force)
