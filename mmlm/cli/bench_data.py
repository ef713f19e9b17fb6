"""`mmlm bench data`: examples/s of the grain input pipeline on this machine (`mmlm.bench.data`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from mmlm.bench.data import run
from mmlm.cli.common import number


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm bench data",
        description="Measure examples/s of the mmlm grain input pipeline (make_dataset) on this "
                    "machine. Without --dataset a synthetic shapes dataset is made and built first.")
    p.add_argument("--dataset", default=None, metavar="DIR",
                   help="an `mmlm data build --out` directory (default: synthesise one)")
    p.add_argument("--split", default="train", help="split to read (default: %(default)s)")
    p.add_argument("--kind", default="shapes", choices=("shapes", "shapes_hd", "moving_shapes"),
                   help="synthetic kind when no --dataset (default: %(default)s)")
    p.add_argument("--num", type=number(int, 1), default=512, help="synthetic records (default: %(default)s)")
    p.add_argument("--source-size", type=number(int, 1), default=336,
                   help="side of the synthetic images in pixels (default: %(default)s)")
    p.add_argument("--image-size", type=number(int, 1), default=336, help="model image side H = W (default: %(default)s)")
    p.add_argument("--hd-grid", type=number(int, 1), default=1,
                   help="HD grid n: n x n crops + the whole image; 1 = no HD (default: %(default)s)")
    p.add_argument("--max-frames", type=number(int, 1), default=8, help="F for video datasets (default: %(default)s)")
    p.add_argument("--max-text-len", type=number(int, 2), default=128, help="T (default: %(default)s)")
    p.add_argument("--template", default="vicuna_v1", help="conversation template (default: %(default)s)")
    p.add_argument("--tokenizer", default="", help="tokenizer path (default: the tiny tokenizer)")
    p.add_argument("--batch-size", type=number(int, 1), default=32, help="batch size (default: %(default)s)")
    p.add_argument("--batches", type=number(int, 1), default=40, help="timed batches (default: %(default)s)")
    p.add_argument("--warmup", type=number(int, 0), default=3, help="untimed batches first (default: %(default)s)")
    p.add_argument("--workers", type=number(int, 0), default=0, help="grain worker processes (default: %(default)s)")
    p.add_argument("--threads", type=number(int, 1), default=4, help="read/preprocess threads (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("num", "source_size", "image_size", "hd_grid", "max_frames", "max_text_len", "batch_size",
                 "batches"):
        if getattr(args, name) < 1:
            print(f"mmlm bench data: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if args.workers < 0 or args.threads < 0 or args.warmup < 0:
        print("mmlm bench data: --workers, --threads and --warmup must be >= 0", file=sys.stderr)
        return 2
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"data pipeline: {result['examples_per_s']:.1f} examples/s "
              f"({result['batches_per_s']:.2f} batches/s of {args.batch_size}; images "
              f"{tuple(result['images_shape'])}, T={args.max_text_len}; {args.workers} workers, "
              f"{args.threads} threads, {result['cpus']} CPUs; {result['dataset']})")
    return 0
