"""`mmlm bench latency`: time to first token and decode tokens/s, baseline vs LLaVA-Mini (`mmlm.bench.latency`)."""

from __future__ import annotations

import argparse
import sys

import jax

from mmlm.bench.latency import PRESETS, bench_model
from mmlm.cli.common import number


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm bench latency",
        description="Time to first token and decode tokens/s of the LLaVA-1.5 baseline vs LLaVA-Mini at the "
                    "same config (random weights; compile excluded; medians). Override config fields with "
                    "--config.a.b=value.")
    p.add_argument("--config", default="configs/tiny.py", help="a llava_mini config file (default configs/tiny.py)")
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS),
                   help="size overrides applied before --config.* ones (default cpu-small; 'none' keeps the "
                        "config's sizes)")
    p.add_argument("--batch", type=number(int, 1), default=1, help="prompts per batch (default 1)")
    p.add_argument("--text_len", type=number(int, 1), default=32, help="prompt text tokens incl. the image placeholder")
    p.add_argument("--new_tokens", type=number(int, 1), default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--runs", type=number(int, 1), default=5, help="timed runs per measurement (median; default 5)")
    p.add_argument("--scanned", action="store_true",
                   help="decode with the scanned layer stacks the model trains with, instead of the unrolled "
                        "layout that load_inference_model serves (for comparison)")
    p.add_argument("--peer", default="auto", choices=("auto", "on", "off"),
                   help="also time transformers' LlavaForConditionalGeneration with the baseline's weights and "
                        "check that its first-token logits and greedy tokens equal mmlm's (auto: when torch "
                        "and transformers are installed; batch 1 only)")
    return p


def main(argv: list[str]) -> int:
    from mmlm.bench.common import baseline_of
    from mmlm.configs import resolve_config_path
    from mmlm.config_utils import load_config, split_config_overrides
    from mmlm.models.config import model_config_from_dict

    rest, overrides = split_config_overrides(argv)
    args = build_parser().parse_args(rest)
    for name in ("batch", "runs"):
        if getattr(args, name) < 1:
            print(f"mmlm bench latency: --{name} must be >= 1", file=sys.stderr)
            return 2
    if args.text_len < 3 or args.new_tokens < 2:
        print("mmlm bench latency: --text_len must be >= 3 and --new_tokens >= 2", file=sys.stderr)
        return 2
    try:
        config = load_config(resolve_config_path(args.config), list(PRESETS[args.preset]) + overrides)
        mini = model_config_from_dict(config.model)
        if mini.mode != "llava_mini":
            raise ValueError(f"{args.config} is a {mini.mode} config; give a llava_mini config")
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"mmlm bench latency: error: {e}", file=sys.stderr)
        return 2
    base = baseline_of(mini)
    print(f"config {args.config} (preset {args.preset}): vision {mini.image_size}px/{mini.vision.patch_size} "
          f"= {mini.vision.num_patches} patches, width {mini.vision.width} x {mini.vision.blocks_used} blocks; "
          f"LLM width {mini.llm.width} x {mini.llm.layers} layers; batch {args.batch}, {args.text_len} text "
          f"tokens, {args.new_tokens} new tokens; {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}), dtype {mini.dtype}")
    from mmlm.bench.latency_peer import peer_available, peer_row
    if args.peer == "on" and not peer_available():
        print("mmlm bench latency: --peer on needs torch and transformers (pip install -e '.[test]')",
              file=sys.stderr)
        return 2
    peer = args.peer == "on" or (args.peer == "auto" and args.batch == 1 and peer_available())
    if peer and args.batch != 1:
        print("mmlm bench latency: --peer compares batch 1 only; drop --batch", file=sys.stderr)
        return 2
    rows = [bench_model(cfg, batch=args.batch, text_len=args.text_len, new_tokens=args.new_tokens, runs=args.runs,
                        keep=peer and cfg is base, unrolled=not args.scanned)
            for cfg in (base, mini)]
    if peer:
        rows.append(peer_row(base, **rows[0].pop("_peer"), new_tokens=args.new_tokens, runs=args.runs))
    head = (f"{'model':<11} {'vision tok':>10} {'LLM prompt':>10} {'TTFT ms':>9} {'decode tok/s':>12} "
            f"{'ms/token':>9} {'response ms':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<11} {r['vision_tokens_per_image']:>10} {r['llm_prompt_tokens']:>10} "
              f"{r['ttft_ms']:>9.1f} {r['decode_tokens_per_s']:>12.1f} {r['decode_ms_per_token']:>9.2f} "
              f"{r['response_ms']:>11.1f}")
    b, m = rows[:2]
    if peer:
        t = rows[2]
        print(f"mmlm llava15 vs transformers (same weights): first-token logits max |diff| "
              f"{t['max_abs_logit_diff']:.2e}, greedy tokens equal {t['greedy_tokens_equal']}/{args.new_tokens}; "
              f"TTFT {t['ttft_ms'] / b['ttft_ms']:.2f}x, decode {t['decode_ms_per_token'] / b['decode_ms_per_token']:.2f}x "
              f"(> 1: mmlm faster; torch {t['torch']}, {t['torch_threads']} threads)")
    print(f"LLaVA-Mini vs baseline: TTFT {b['ttft_ms'] / m['ttft_ms']:.2f}x faster, decode "
          f"{m['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x tokens/s, whole response "
          f"{b['response_ms'] / m['response_ms']:.2f}x faster")
    return 0
