"""Images/s of the reference train pipeline for 512 crops, in-process and through a DataLoader with workers.

Usage: python benchmarks/data_pipeline.py [--images 64] [--workers 2] [--crop 512]; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

from segrank.data.benchmark import benchmark_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=512)
    args = parser.parse_args()
    print(json.dumps(benchmark_data(args.crop, args.images, args.workers, args.batch_size, args.image_size)))


if __name__ == "__main__":
    main()
