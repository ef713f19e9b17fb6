"""`mmlm bench flops`: FLOPs per part for one image-question prefill (`mmlm.bench.flops`)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

from mmlm.bench import flops
from mmlm.bench.flops import DEFAULT_TEXT_TOKENS, flops_report, load_model_config
from mmlm.cli.common import number, print_report
from mmlm.config_utils import split_config_overrides
from mmlm.models.flops import LM_HEAD_CHOICES, PARTS, make_workload


def _unit(value: float) -> tuple[str, float]:
    """A readable FLOPs unit for numbers of `value`'s size."""
    for name, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return name, scale
    return "", 1.0


def _print_table(name: str, r: dict[str, Any]) -> None:
    unit, scale = _unit(r["analytic"]["total"])
    f = lambda x: f"{x / scale:14.4f}"
    print(f"config: {name}   text tokens: {r['text_tokens']}   LLM vision tokens: {r['num_vision_tokens']}")
    has_xla = "xla" in r
    head = f"{'part':<12}{'analytic ' + unit:>14}"
    if has_xla:
        head += f"{'xla ' + unit:>14}{'xla matmul ' + unit:>14}{'xla/analytic':>14}"
    print(f"{head}\n{'-' * len(head)}")
    for part in PARTS + ("total",):
        a = r["analytic"][part]
        row = f"{part:<12}{f(a)}"
        if has_xla:
            ratio = f"{r['xla'][part] / a:14.4f}" if a else f"{'-':>14}"
            row += f"{f(r['xla'][part])}{f(r['xla_matmul'][part])}{ratio}"
        print(row)
    if "xla_whole_model" in r:
        wm = r["xla_whole_model"]
        print(f"whole-model forward (XLA, one program): {wm['flops'] / scale:.4f} {unit} "
              f"(matmul {wm['matmul'] / scale:.4f} {unit})")
    print(f"vision: {r['assumptions']['vision_blocks']}")
    print(f"LM head: {r['assumptions']['lm_head']}")
    print(f"the paper's rule (2 x params x tokens, full tower): {r['assumptions']['paper_rule_total'] / scale:.4f} "
          f"{unit}")


def _help_epilog() -> str:
    """The module docstring from "Analytic count" on: what is counted, XLA, the text-length derivation."""
    doc = flops.__doc__ or ""
    start = doc.find("**Analytic count**")
    return doc[start:].replace("**", "").replace("``", "") if start >= 0 else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmlm bench flops",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "FLOPs per part (vision, projector, compressor, prefusion, llm) for ONE image-question prefill: "
            "an analytic count (2 x multiply-adds of every matmul) and XLA's cost analysis of each part "
            "compiled on abstract shapes (no weights). Values in FLOPs in --json. Config overrides: "
            "--config.a.b=value, e.g. --config.model.prefusion_layers=2.", 79),
        epilog=_help_epilog())
    parser.add_argument("--config", required=True,
                        help="config file or name in configs/ (e.g. llava_mini_vicuna7b or configs/tiny.py)")
    parser.add_argument("--json", action="store_true", help="print JSON (values in FLOPs) instead of a table")
    parser.add_argument("--text_tokens", type=number(int, 0), default=DEFAULT_TEXT_TOKENS,
                        help=f"instruction text tokens, <image> placeholder excluded (default "
                             f"{DEFAULT_TEXT_TOKENS}: the length that reproduces the paper's Table 14 under its "
                             "'2 x params x tokens' rule, derivation below)")
    parser.add_argument("--num_vision_tokens", type=number(int, 1), default=None,
                        help="Matryoshka budget m (default: the config's default budget)")
    parser.add_argument("--lm_head", choices=LM_HEAD_CHOICES, default="all",
                        help="LM head over every LLM position (default, as the forward and the paper's rule) "
                             "or only the last one (what generating the first token needs)")
    parser.add_argument("--analytic_only", action="store_true", help="skip XLA compilation")
    parser.add_argument("--no_whole_model", action="store_true",
                        help="skip compiling the whole-model forward (the cross-check of the parts' sum)")
    return parser


def main(argv: list[str]) -> int:
    argv, overrides = split_config_overrides(argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = load_model_config(args.config, overrides)
        w = make_workload(cfg, args.text_tokens, args.num_vision_tokens, args.lm_head)  # validates early
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"mmlm bench flops: {e}", file=sys.stderr)
        return 2
    report = flops_report(cfg, w.text_tokens, w.vision_tokens, args.lm_head,
                          xla=not args.analytic_only, whole_model=not args.no_whole_model)
    report["config"] = args.config
    if overrides:
        report["overrides"] = list(overrides)
    return print_report(report, args.json, lambda: _print_table(args.config, report))
