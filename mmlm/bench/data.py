"""`mmlm bench data`: examples/s of the grain input pipeline on this machine.

Without `--dataset`, it synthesises a `shapes` dataset (rendered at
`--source-size` px so image decoding costs what a real photo's would, roughly)
and builds it in a temporary directory first (building needs TensorFlow).
Timing covers `--batches` batches after `--warmup` batches; each batch is
fully materialised (decode, pad-to-square, resize, normalise, tokenise, pad).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time



def _make_dataset_dir(args, tmp: str) -> str:
    from mmlm.data import build, synth

    src = os.path.join(tmp, "synth")
    print(f"synthesising {args.num} {args.kind} records at {args.source_size} px ...", file=sys.stderr)
    path = synth.synthesize(args.kind, src, args.num, 0, args.split, image_size=args.source_size,
                            progress=False)
    out = os.path.join(tmp, "ds")
    build.build_dataset({args.split: path}, src, out, videos_dir=src, name="bench", progress=False)
    return out


def run(args) -> dict:
    """Runs the benchmark; returns the measurements."""
    import ml_collections

    from mmlm.data.config import default_data_config
    from mmlm.data.pipeline import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or _make_dataset_dir(args, tmp)
        config = ml_collections.ConfigDict()
        config.data = default_data_config()
        d = config.data
        d.dataset_dir, d.template, d.max_text_len = dataset, args.template, args.max_text_len
        d.image_size, d.hd_grid, d.max_frames = args.image_size, args.hd_grid, args.max_frames
        d.batch_size, d.worker_count, d.read_threads = args.batch_size, args.workers, args.threads
        if args.tokenizer:
            d.tokenizer = args.tokenizer
        pipe = make_dataset(config, args.split, process_index=0, process_count=1, train=True)
        it = iter(pipe)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            next(it)
        t1 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        t2 = time.perf_counter()
        if hasattr(it, "close"):
            it.close()
    n = args.batches * args.batch_size
    return {
        "examples_per_s": n / (t2 - t1),
        "batches_per_s": args.batches / (t2 - t1),
        "warmup_s": t1 - t0,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "images_shape": list(batch["images"].shape),
        "text_len": args.max_text_len,
        "workers": args.workers,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "dataset": args.dataset or f"synthetic {args.kind} ({args.num} records, {args.source_size} px)",
    }

