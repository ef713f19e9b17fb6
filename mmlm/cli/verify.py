"""`mmlm verify`: compare a converted checkpoint with the transformers model (`mmlm.convert.verify`)."""

from __future__ import annotations

import argparse
import json
import sys

from mmlm.cli.common import SEED, number
from mmlm.convert.verify import DEFAULT_TOLERANCE, run
from mmlm.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm verify",
        description="Compare a converted mmlm checkpoint with the transformers/PyTorch model on the same random "
                    "inputs; prints the max absolute difference of each output and exits 1 above tolerance.",
        epilog="Example: mmlm verify --hf Meta-Llama-3.1-8B-Instruct --mmlm ckpt/llama31 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, metavar="SRC", help="the HF directory that was converted (or exported)")
    p.add_argument("--mmlm", required=True, metavar="DST", help="the mmlm model checkpoint")
    p.add_argument("--vision", metavar="CLIP_DIR", help="LLaVA-Mini: the CLIP directory of the tower")
    p.add_argument("--dtype", choices=tuple(DEFAULT_TOLERANCE), default="float32",
                   help="compute dtype of both models (default float32; bfloat16 halves memory for 7-8B models)")
    p.add_argument("--atol", type=number(float, 0), help="absolute tolerance (default by dtype: fp32 1e-4, bf16 2e-2)")
    p.add_argument("--rtol", type=number(float, 0), help="tolerance relative to max|reference| (default fp32 1e-4, bf16 5e-2)")
    p.add_argument("--batch", type=number(int, 1), default=2, help="samples (default 2)")
    p.add_argument("--seq_len", type=number(int, 1), default=16, help="text tokens per sample (default 16)")
    p.add_argument("--seed", type=SEED, default=0, help="input RNG seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"mmlm verify: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['kind']}: {result['inputs']} ({result['dtype']})")
        for name, o in result["outputs"].items():
            print(f"  {name:14s} max|diff| = {o['max_abs_diff']:.3e}   limit {o['limit']:.3e}   "
                  f"(max|ref| {o['ref_max_abs']:.3e})   {'OK' if o['ok'] else 'FAIL'}")
        print("OK" if result["ok"] else "FAIL: outputs differ beyond tolerance")
    return 0 if result["ok"] else 1
