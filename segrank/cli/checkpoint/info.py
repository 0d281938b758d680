"""``segrank info CKPT``: architecture, classes, stored test settings, parameters and GFLOPs of one forward."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from segrank.checkpoints import FORMATS, describe, load_model
from segrank.cli.flags import SubParsers, positive_int
from segrank.config import load_yaml, to_dict
from segrank.config.inference import InferenceConfig
from segrank.inference.flops import class_map_flops, flops_input_size
from segrank.inference.settings import SettingsOverrides, resolve_settings


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: architecture, classes, parameters, GFLOPs at the test "
                                    "size")
    p.add_argument("ckpt")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto")
    p.add_argument("--config", help="YAML config for formats that do not carry their architecture; its test settings "
                                    "give the size of the FLOPs count")
    p.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="count FLOPs for an H x W input (default: the test window, or a square image at the test "
                        "scale)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    stored_settings = model.inference or InferenceConfig()
    stored = {k: v for k, v in to_dict(stored_settings).items() if v is not None and k != "palette"}
    print(yaml.safe_dump({"test_settings": stored}, sort_keys=False, default_flow_style=None).rstrip())
    unknown = [k for k in stored_settings.missing() if k != "palette"]  # without one, a palette is generated
    if unknown:
        print(f"not stored: {', '.join(unknown)} (prediction announces the defaults it uses)")
    count = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("backbone", "decode_head")}
    print(f"parameters: {sum(count.values()):,} (backbone {count['backbone']:,}, head {count['decode_head']:,})")
    if args.size is not None:
        (height, width), what = tuple(args.size), "an input (--size)"
    else:  # a config with only a model section gives no test settings
        config = args.config if args.config and "data" in load_yaml(args.config) else None
        settings = resolve_settings(model, Path(args.ckpt), overrides=SettingsOverrides(config=config))
        (height, width), what = flops_input_size(settings)
    flops = class_map_flops(model, (height, width))
    print(f"GFLOPs: {flops / 1e9:.4g} for {what} of {height}x{width} pixels, to the class map (a multiply-add counts "
          "2, torch.utils.flop_counter)")
    return 0
