"""`mmlm bench video-memory`: KV-cache bytes vs number of video frames (`mmlm.bench.video_memory`)."""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from mmlm.bench.common import baseline_of
from mmlm.bench.video_memory import check, llm_param_shapes, measure, per_frame_growth, per_token_kv_bytes, tree_nbytes
from mmlm.cli.common import check_output_file, number
from mmlm.configs import resolve_config_path
from mmlm.errors import UserError
from mmlm.safe_io import write_text_atomic


def _mb(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm bench video-memory",
        description="KV-cache bytes as a function of the number of video frames for the LLaVA-1.5 baseline "
                    "(N patch tokens per frame) and LLaVA-Mini (m compressed tokens per frame) with the same "
                    "LLM, read from the compiled decode step's memory analysis (abstract shapes: no weights "
                    "are allocated). Exits 1 if the figures disagree with layers x kv_heads x head_dim x 2 "
                    "x bytes per token.")
    p.add_argument("--config", required=True,
                   help="config file or name under configs/ (e.g. llava_mini_vicuna7b, configs/tiny.py)")
    p.add_argument("--frames", default="1,2,4,8,16,32,64", help="comma-separated frame counts")
    p.add_argument("--num_vision_tokens", type=number(int, 1), default=None,
                   help="LLaVA-Mini tokens per frame (default: the config's default budget)")
    p.add_argument("--text_tokens", type=number(int, 0), default=None, help="prompt text tokens (default: config.text_len)")
    p.add_argument("--memory_gib", type=number(float, 0, low_open=True), default=24.0,
                   help="device memory for the 'frames that fit' estimate (default 24 GiB, the paper's GPU)")
    p.add_argument("--json", default=None,
                   help="also write the figures to this JSON file (an existing one only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    return p


def main(argv: list[str]) -> int:
    from mmlm.config_utils import load_config, split_config_overrides
    from mmlm.models.config import model_config_from_dict

    rest, overrides = split_config_overrides(argv)
    args = build_parser().parse_args(rest)
    try:
        frames = sorted({int(v) for v in args.frames.split(",") if v.strip()})
    except ValueError:
        print(f"mmlm bench video-memory: --frames must be comma-separated integers, got {args.frames!r}",
              file=sys.stderr)
        return 2
    if len(frames) < 2 or frames[0] < 1:
        print("mmlm bench video-memory: --frames needs at least two positive frame counts, e.g. 1,2,4",
              file=sys.stderr)
        return 2
    if args.json:
        from mmlm.safe_io import check_not_input, refuse_existing

        try:  # checked before the (slow) compile: the figures file replaces no input and no earlier file
            check_output_file(args.json, "--json")
            check_not_input(args.json, "--json", {"--config": resolve_config_path(args.config)})
            refuse_existing(args.json, "--json", args.overwrite)
        except (UserError, FileNotFoundError) as e:
            print(f"mmlm bench video-memory: error: {e}", file=sys.stderr)
            return 2
    try:
        config = load_config(resolve_config_path(args.config), overrides)
        mini = model_config_from_dict(config.model)
        if mini.mode != "llava_mini":
            raise ValueError(f"{args.config} is a {mini.mode} config; give a llava_mini config (the baseline is "
                             "derived from it)")
        m = mini.check_budget(args.num_vision_tokens)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"mmlm bench video-memory: error: {e}", file=sys.stderr)
        return 2
    base = baseline_of(mini)
    n = base.vision.num_patches
    text = int(args.text_tokens if args.text_tokens is not None else config.get("text_len", 64))
    print(f"config {args.config}: LLM {mini.llm.layers} layers x {mini.llm.kv_heads} kv heads x "
          f"{mini.llm.head_dim} head_dim, cache dtype {jnp.dtype(mini.compute_dtype).name}, "
          f"{text} text tokens; backend {jax.default_backend()}")
    results = {}
    for name, cfg, t in (("llava15", base, n), ("llava_mini", mini, m)):
        rows = measure(cfg, frames, text, t)
        problems = check(rows, cfg)
        results[name] = {"tokens_per_frame": t, "per_token_kv_bytes": per_token_kv_bytes(cfg),
                         "per_frame_bytes": per_token_kv_bytes(cfg) * t, "rows": rows, "problems": problems}
    head = f"{'frames':>7} | {'LLaVA-1.5 slots':>15} {'cache':>13} | {'LLaVA-Mini slots':>16} {'cache':>13} | ratio"
    print(head)
    print("-" * len(head))
    for rb, rm in zip(results["llava15"]["rows"], results["llava_mini"]["rows"]):
        print(f"{rb['frames']:>7} | {rb['slots']:>15,} {_mb(rb['cache_bytes']):>13} | {rm['slots']:>16,} "
              f"{_mb(rm['cache_bytes']):>13} | {rb['cache_bytes'] / rm['cache_bytes']:.1f}x")
    weights = tree_nbytes(llm_param_shapes(mini)["llm"]) // jnp.dtype(mini.params_dtype).itemsize * \
        jnp.dtype(mini.compute_dtype).itemsize
    budget = args.memory_gib * 2**30 - weights
    for name in ("llava15", "llava_mini"):
        r = results[name]
        growth = per_frame_growth(r["rows"])
        fit = int(budget // r["per_frame_bytes"]) if budget > 0 else 0
        r["frames_in_memory"] = fit
        print(f"{name}: +{growth[0]:,.0f} B = {_mb(growth[0])} per frame (measured; {r['tokens_per_frame']} token(s) x "
              f"{r['per_token_kv_bytes']:,} B/token expected) -> about {fit:,} frames ({fit / 3600:.1f} h at 1 fps) "
              f"of cache fit in {args.memory_gib:g} GiB next to the {_mb(weights)} LLM weights"
              + (f"; PROBLEMS: {r['problems']}" if r["problems"] else ""))
    if args.json:
        write_text_atomic(args.json, json.dumps({"config": args.config, "text_tokens": text,
                                                 "backend": jax.default_backend(), "llm_weight_bytes": weights,
                                                 **results}, indent=2))
    ok = not (results["llava15"]["problems"] or results["llava_mini"]["problems"])
    print("check: per-frame growth = layers x kv_heads x head_dim x 2 x bytes x tokens_per_frame: "
          + ("OK" if ok else "FAILED"))
    return 0 if ok else 1
