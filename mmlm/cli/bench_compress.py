"""`mmlm bench compress`: the fused Pallas compression kernel vs the XLA path (`mmlm.bench.compress`)."""

from __future__ import annotations

import argparse
import sys

from mmlm.bench import compress
from mmlm.bench.compress import run
from mmlm.cli.common import SEED, number, print_report


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _print_table(report: dict) -> None:
    print(f"backend {report['backend']} ({report['device']}), jax {report['jax']}, "
          f"median of {report['repeats']} runs after {report['warmup']} warm-up")
    for note in report["notes"]:
        print(f"NOTE: {note}")
    header = (f"{'frames':>6} {'N':>5} {'m':>3} {'impl':<7} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'speedup':>8} {'fwd MB':>9} {'(temp)':>9} {'bwd MB':>9} {'(temp)':>9} {'K/V MB':>8} {'peak MB':>9}")
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        fm, bm = r.get("fwd_memory") or {}, r.get("fwd_bwd_memory") or {}
        impl = r["impl"] + ("*" if r["interpret"] else "")
        peak = r.get("fwd_bwd_device_peak_mb", r.get("fwd_device_peak_mb"))
        print(f"{r['frames']:>6} {r['n']:>5} {r['m']:>3} {impl:<7} {_fmt(r.get('fwd_ms')):>9} "
              f"{_fmt(r.get('fwd_bwd_ms')):>11} {_fmt(r.get('fwd_speedup_vs_xla'), '.2f'):>8} {_fmt(fm.get('total_mb'), '.1f'):>9} "
              f"{_fmt(fm.get('temp_mb'), '.1f'):>9} {_fmt(bm.get('total_mb'), '.1f'):>9} "
              f"{_fmt(bm.get('temp_mb'), '.1f'):>9} {r['kv_mb']:>8.1f} {_fmt(peak, '.0f'):>9}")
    if any(r["interpret"] for r in report["results"]):
        print("* interpret mode: emulated kernel, timings are not performance figures")
    print("speedup: XLA fwd ms / Pallas fwd ms at the same point; "
          "MB columns: compiled temp + argument + output bytes of the jitted program (memory_analysis); "
          "K/V MB: what the XLA path materialises; peak: device high-water mark so far (GPU/TPU only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmlm bench compress",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time and memory of the compressor's attention (LayerNorm + K/V projections + "
                    "multi-head attention of m queries over N patches, for B frames): the fused Pallas "
                    "kernel vs the XLA path, forward and forward+backward, over a grid of "
                    "(frames, N, m). Defaults: the paper's Dv=1024, 8 heads; N=576 (336 px) and 2304 "
                    "(HD, 48x48); m in {1, 16, 64}; 1 image or 64 video frames.",
        epilog=compress.__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--frames", type=number(int, 1), nargs="+", default=[1, 64], help="batch sizes B (default: 1 64)")
    parser.add_argument("--n", type=number(int, 1), nargs="+", default=[576, 2304], help="patches per frame N (default: 576 2304)")
    parser.add_argument("--m", type=number(int, 1), nargs="+", default=[1, 16, 64], help="query counts m (default: 1 16 64)")
    parser.add_argument("--dv", type=number(int, 1), default=1024, help="vision width Dv (default 1024)")
    parser.add_argument("--heads", type=number(int, 1), default=8, help="attention heads H (default 8)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of inputs and weights (default bfloat16; compute is fp32 inside)")
    parser.add_argument("--impl", choices=["both", "xla", "pallas"], default="both",
                        help="paths to time (default both; on CPU the Pallas path is skipped unless --interpret)")
    parser.add_argument("--interpret", action="store_true",
                        help="on CPU, also run the Pallas path in interpret mode (a smoke test: its timings "
                             "are not performance figures)")
    parser.add_argument("--block_n", type=number(int, 1), default=None, help="kernel block over N (default: the kernel's)")
    parser.add_argument("--warmup", type=number(int, 0), default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--repeats", type=number(int, 1), default=5, help="timed runs; the median is reported (default 5)")
    parser.add_argument("--no_backward", action="store_true", help="time the forward only")
    parser.add_argument("--seed", type=SEED, default=0, help="input RNG seed")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (MB and ms) instead of a table")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        print("mmlm bench compress: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.dv % args.heads:
        print(f"mmlm bench compress: --dv {args.dv} is not divisible by --heads {args.heads}", file=sys.stderr)
        return 2
    report = run(args)
    return print_report(report, args.json, lambda: _print_table(report))
