"""``segrank serve CKPT``: a local web page that segments the images dropped on it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from segrank.cli.flags import SubParsers, add_test_settings_options, port_number, positive_float, precision_notes
from segrank.cli.use.predict import default_notes
from segrank.deploy.serve import serve
from segrank.inference.predictor import Predictor


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("serve", help="a local web page: drop an image, see its segmentation, legend and (RankSeg) "
                                     "class ranking")
    p.add_argument("checkpoint", help="model checkpoint (file, save_pretrained folder or training run's work dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default: 8000; 0: any free port)")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest upload accepted (default: 20)")
    add_test_settings_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> NoReturn:
    predictor = Predictor(args.checkpoint, device=args.device or "auto", ms_flip=args.ms_flip, config=args.config,
                          mean=args.mean, std=args.std, img_scale=args.img_scale, mode=args.mode,
                          precision=args.precision, compile=args.compile, warn=False)
    # After the address line, which comes first so that scripts can read it from the first line.
    notes = precision_notes("serve", args.precision, predictor.precision) + default_notes("serve", predictor)
    serve(predictor, args.host, args.port, args.max_upload_mb, title=Path(args.checkpoint).resolve().name,
          notes=notes)
    # Stopped cleanly (every answer sent, every connection's thread ended): end the process here, not through the
    # interpreter's shutdown, which tears down PyTorch's C++ state under any thread still alive (an abort, "terminate
    # called without an active exception", was seen there once in some 30 runs of the Ctrl+C test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
