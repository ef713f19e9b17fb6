"""`mmlm summary`: parameter counts, vision tokens and sequence lengths of a config (`mmlm.models.summary`)."""

from __future__ import annotations

import argparse
from typing import Any

from mmlm.cli.common import number, print_report, run_command
from mmlm.config_utils import load_config, split_config_overrides
from mmlm.train.config import validate_config
from mmlm.errors import UserError
from mmlm.models.config import PARTS, model_config_from_dict
from mmlm.models.summary import summarize


def _print_table(name: str, s: dict[str, Any]) -> None:
    print(f"config: {name}")
    print(f"{'part':<12}{'parameters':>18}")
    for part in PARTS + ("total",):
        print(f"{part:<12}{s['params'][part]:>18,}")
    print(f"\nvision tokens the LLM sees per image/frame: {s['llm_vision_tokens']}"
          f"  (budgets: {', '.join(map(str, s['budgets']))})")
    print(f"vision blocks built: {s['vision_blocks_built']} (blocks after the selected layer are not built)")
    print("sequence lengths: " + ", ".join(f"{k}={v}" for k, v in s["sequence_lengths"].items()))


def main(argv: list[str]) -> int:
    argv, overrides = split_config_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="mmlm summary",
        description="Parameter count per part (vision, projector, compressor, prefusion, llm), vision tokens "
                    "per image/frame and sequence lengths of a config, from abstract shapes (no weights "
                    "are allocated). Config overrides: --config.a.b=value.")
    parser.add_argument("--config", required=True, help="config file, e.g. configs/llava_mini_vicuna7b.py")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--text_len", type=number(int, 1), default=None,
                        help="text tokens per sample for the sequence lengths (default: config.text_len)")
    args = parser.parse_args(argv)
    args.overrides = overrides
    return run_command("summary", _run, args)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    validate_config(config)
    if args.text_len is not None and args.text_len < 1:
        raise UserError(f"--text_len must be >= 1, got {args.text_len}")
    cfg = model_config_from_dict(config.model)
    text_len = args.text_len or int(config.get("text_len", 64))
    s = summarize(cfg, text_len)
    return print_report(s, args.json, lambda: _print_table(args.config, s))
