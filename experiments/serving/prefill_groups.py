"""Do grouped prefills (`mmlm serve --prefill_group G`) change answers?

Answers N held-out synthetic `shapes` questions twice on the engine of `mmlm serve`, in this process (no
HTTP): once with every request prefilled alone (the default) and once with greedy requests admitted
together sharing prefills of up to G rows. All N requests are queued at once, so the engine admits them
as slots free up, in groups. Reports how many answers differ (token ids), the prefills each pass ran, and,
for the first prefill batches of G questions, the largest difference between a row's next-token logits
in the batch of G and alone (XLA's CPU kernels round a row differently at another batch size).

    python experiments/serving/prefill_groups.py --workdir workdirs/demo --questions 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="workdirs/demo", help="training workdir of the model (default the demo's)")
    p.add_argument("--questions", type=int, default=2000, help="held-out questions answered (default 2000)")
    p.add_argument("--group", type=int, default=16, help="--prefill_group of the grouped pass (default 16)")
    p.add_argument("--max_tokens", type=int, default=16, help="longest answer (default 16)")
    p.add_argument("--logit_batches", type=int, default=8,
                   help="prefill batches of --group questions whose logits are compared (default 8)")
    p.add_argument("--seed", type=int, default=11, help="seed of the synthetic questions (default 11)")
    return p


def _requests(im, rows: list[dict], root: Path) -> list[tuple[list[int], list[bool], np.ndarray]]:
    from mmlm.infer.loading import encode_question
    from mmlm.serve.media import image_pixels

    out = []
    for row in rows:
        pixels = image_pixels(im, (root / row["image"]).read_bytes(), "image")
        prompt, fuse = encode_question(im, row["text"], True, return_fuse_mask=True)
        out.append((prompt, fuse, pixels))
    return out


def answer_all(im, reqs, *, group: int, max_tokens: int) -> tuple[list[list[int]], dict, float]:
    """Every request queued at once on a 16-slot engine; returns the answers, the engine's counters and the
    wall time (s)."""
    from mmlm.serve.engine import Engine, Request

    engine = Engine(im, max_batch=16, max_new_tokens=max_tokens, admit_wait_s=0.0, prefill_group=group)
    engine.start()
    engine.ready.wait()
    while engine.status()["compiling"]:  # grouped prefill programs, compiled in the background
        time.sleep(0.1)
    answers: list[list[int]] = [[] for _ in reqs]
    errors: list[str] = []
    left = threading.Semaphore(0)

    def emitter(i: int):
        def emit(kind, value):  # called on the engine's thread: errors are raised here, after the run
            if kind == "token":
                answers[i].append(value)
            elif kind == "error":
                errors.append(f"request {i} failed: {value}")
            if kind in ("done", "error"):
                left.release()
        return emit

    start = time.perf_counter()
    with engine._cv:  # queued together: the engine admits them as slots free up
        for i, (prompt, fuse, pixels) in enumerate(reqs):
            engine.submit(Request(prompt=prompt, fuse_mask=fuse, pixels=pixels, num_vision_tokens=None,
                                  max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0, emit=emitter(i)))
    for _ in reqs:
        left.acquire()
    wall = time.perf_counter() - start
    stats = engine.status()
    engine.stop()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, the first: {errors[0]}")
    return answers, stats, wall


def logit_gap(im, reqs, *, group: int, batches: int) -> tuple[float, int]:
    """Largest |logit| difference of a row's next token between its prefill in a batch of `group` and alone,
    over the first `batches` batches of `group` questions whose prompts share a text bucket; and the number of
    rows compared."""
    import flax.linen as nn
    import jax

    from mmlm.infer.batching import PROMPT_BUCKET, make_batch, round_up
    from mmlm.infer.generate import prefill_llm
    from mmlm.models.llama import init_cache
    from mmlm.models.llava_mini import LlavaMini

    model, params = LlavaMini(im.cfg), nn.unbox(im.params)

    @jax.jit
    def logits(batch):
        inputs = model.apply({"params": params}, batch, None, "left", method=LlavaMini.build_llm_inputs)
        b, p = inputs["valid"].shape
        cache = init_cache(im.cfg.llm, b, p, im.cfg.compute_dtype, per_layer=not im.cfg.scan_layers)
        return model.apply({"params": params}, inputs["embeds"], inputs["positions"], inputs["valid"], cache,
                           method=prefill_llm)[0]

    def batch_of(rs):
        return make_batch(im.cfg, [r[0] for r in rs], [r[2] for r in rs], pad_id=im.tokenizer.pad_id,
                          pad_len_to=PROMPT_BUCKET, fuse_masks=[r[1] for r in rs])

    by_bucket: dict[int, list] = {}
    for r in reqs:
        by_bucket.setdefault(round_up(len(r[0]), PROMPT_BUCKET), []).append(r)
    batched = [rs[i:i + group] for rs in by_bucket.values() for i in range(0, len(rs) - group + 1, group)]
    gap, compared = 0.0, 0
    for rows in batched[:batches]:
        together = np.asarray(logits(batch_of(rows)))
        alone = np.concatenate([np.asarray(logits(batch_of([r]))) for r in rows])
        gap, compared = max(gap, float(np.abs(together - alone).max())), compared + len(rows)
    return gap, compared


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error(f"--questions must be >= 1, got {args.questions}")
    if not 1 <= args.group <= 16:  # the engine's 16 slots
        parser.error(f"--group must be in [1, 16], got {args.group}")
    if args.max_tokens < 1:
        parser.error(f"--max_tokens must be >= 1, got {args.max_tokens}")
    from mmlm.data.synth import synthesize
    from mmlm.infer.loading import load_inference_model

    im = load_inference_model(workdir=args.workdir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize("shapes", root, args.questions, args.seed, split="check", progress=False)
        rows = [json.loads(line) for line in (root / "check_questions.jsonl").read_text().splitlines()]
        reqs = _requests(im, rows[:args.questions], root)
    alone, stats1, wall1 = answer_all(im, reqs, group=1, max_tokens=args.max_tokens)
    grouped, stats_g, wall_g = answer_all(im, reqs, group=args.group, max_tokens=args.max_tokens)
    differ = sum(a != g for a, g in zip(alone, grouped))
    gap, compared = logit_gap(im, reqs, group=args.group, batches=args.logit_batches)
    print(json.dumps({"questions": len(reqs), "group": args.group, "answers_that_differ": differ,
                      "prefills_alone": stats1["prefills"], "prefills_grouped": stats_g["prefills"],
                      "wall_s_alone": round(wall1, 2), "wall_s_grouped": round(wall_g, 2),
                      "logit_rows_compared": compared, "max_logit_gap": gap}))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
