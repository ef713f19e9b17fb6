"""`mmlm bench NAME ...`: dispatches to `mmlm.cli.bench_NAME` (each has `main(argv)`; the library is `mmlm.bench.NAME`)."""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "flops": ("mmlm.cli.bench_flops", "analytic and XLA FLOPs per part for one image-question"),
    "compress": ("mmlm.cli.bench_compress", "fused Pallas compression kernel vs XLA: time and peak memory"),
    "latency": ("mmlm.cli.bench_latency", "time to first token and decode tokens/s, baseline vs LLaVA-Mini"),
    "video-memory": ("mmlm.cli.bench_video_memory", "KV-cache bytes vs number of video frames"),
    "data": ("mmlm.cli.bench_data", "examples/s of the grain input pipeline"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mmlm bench NAME [options]\n\nbenchmarks:")
        for name, (_, doc) in BENCHES.items():
            print(f"  {name:<13} {doc}")
        return 0
    if argv[0] not in BENCHES:
        print(f"mmlm bench: unknown benchmark {argv[0]!r}; choose from {sorted(BENCHES)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]][0]).main(argv[1:]) or 0)
