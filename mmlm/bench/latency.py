"""`mmlm bench latency`: time to first token and decode tokens/s, LLaVA-1.5 baseline vs LLaVA-Mini.

Both models share the config's vision tower and LLM (the baseline is the
config with `mode=llava15`: all N patch tokens go to the LLM, no compressor,
no pre-fusion). Weights are random (latency does not depend on their values).
For each model:

* time to first token (TTFT): the jitted prefill — vision tower, compressor
  and pre-fusion (LLaVA-Mini), LLM over the whole prompt into the KV cache,
  first token — on one image-question batch;
* decode: the jitted in-graph decode loop (`lax.while_loop`) producing the
  remaining `new_tokens - 1` tokens from the prefilled cache; tokens/s =
  batch x (new_tokens - 1) / time.

Compile time is excluded (one warm-up call); figures are medians of `--runs`.

    mmlm bench latency                                   # configs/tiny.py, preset "cpu-small"
    mmlm bench latency --config configs/tiny.py --preset none --runs 20
    mmlm bench latency --config configs/llava_mini_vicuna7b.py --preset none   # on an accelerator
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from mmlm import IMAGE_TOKEN_ID
from mmlm.cli_common import number
from mmlm.models.config import ModelConfig

# Overrides that give a model big enough for the baseline/LLaVA-Mini difference to show on a laptop CPU,
# small enough to run in a minute: 224 px / 14 px patches = 256 patch tokens, a 16-layer 512-wide LLM and
# 2 pre-fusion layers. The proportions follow LLaVA-Mini-7B (pre-fusion = 1/8 of the LLM's depth, a vision
# tower ~1/20 of the LLM's parameters), so the parts' shares of the latency are comparable.
PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "cpu-small": (
        "model.image_size=224", "model.vision.patch_size=14", "model.vision.width=256", "model.vision.layers=4",
        "model.vision.heads=4", "model.vision.mlp_dim=1024", "model.llm.vocab_size=4096",
        "model.llm.width=512", "model.llm.layers=16", "model.llm.heads=8", "model.llm.kv_heads=8",
        "model.llm.head_dim=64", "model.llm.mlp_dim=1408", "model.compressor.tokens=1",
        "model.compressor.budgets=()", "model.compressor.heads=8", "model.prefusion_layers=2",
        "model.dtype=float32",
    ),
    # The scaled-down 7B of experiments/efficiency, deep enough for per-layer costs to dominate decoding:
    # 336 px / 14 px patches (576 tokens), CLIP width 128 x 24 blocks, LLaMA width 512 x 32 layers, vocab 32,000.
    "cpu-deep": (
        "model.image_size=336", "model.vision.patch_size=14", "model.vision.width=128", "model.vision.layers=24",
        "model.vision.heads=2", "model.vision.mlp_dim=512", "model.llm.vocab_size=32000",
        "model.llm.width=512", "model.llm.layers=32", "model.llm.heads=4", "model.llm.kv_heads=4",
        "model.llm.head_dim=128", "model.llm.mlp_dim=1376", "model.compressor.tokens=1",
        "model.compressor.budgets=()", "model.compressor.heads=8", "model.prefusion_layers=4",
        "model.dtype=float32",
    ),
}


def _timed(fn: Callable[[], Any], runs: int) -> tuple[float, list[float]]:
    """(first call seconds incl. compile, seconds of each later call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def bench_model(cfg: ModelConfig, *, batch: int, text_len: int, new_tokens: int, runs: int,
                seed: int = 0, keep: bool = False, unrolled: bool = True) -> dict[str, Any]:
    """TTFT and decode throughput of one model on random weights and a random image.

    With `keep`, the row also carries (under "_peer") what a peer comparison
    needs: the params, row 0's prompt and image, its first-token logits (V,)
    and greedy answer (new_tokens,). `unrolled`: serve the model in the decoding layout of
    `load_inference_model` (`decoding_layout`), else with its scanned layer stacks.
    """
    from mmlm.infer.batching import make_batch, views_per_frame
    from mmlm.infer.generate import decode_loop, decoding_layout, prefill_jit, sampling_params
    from mmlm.infer.random_model import random_params

    params = random_params(cfg, seed)
    if unrolled:
        cfg, params = decoding_layout(cfg, params)  # what load_inference_model serves
    rng = np.random.default_rng(seed)
    s = cfg.image_size
    prompt = [1, IMAGE_TOKEN_ID] + [int(t) for t in rng.integers(3, cfg.llm.vocab_size - 1, text_len - 2)]
    media = rng.standard_normal((1, views_per_frame(cfg), s, s, 3)).astype(np.float32)
    data = make_batch(cfg, [prompt] * batch, [media] * batch, pad_id=0, pad_len_to=1)
    sp, greedy = sampling_params(0.0, 1.0, eos_id=-1)  # no stop token: always new_tokens tokens
    key = jax.random.PRNGKey(seed)
    m = cfg.check_budget(None)

    def first_token():
        return prefill_jit(cfg, params, data, sp, key, max_new_tokens=new_tokens, num_vision_tokens=m,
                            greedy=greedy)

    decode = jax.jit(lambda p, st: decode_loop(cfg, p, st, sp, greedy=greedy))
    ttft_first, ttft = _timed(first_token, runs)
    state = first_token()
    dec_first, dec = _timed(lambda: decode(params, state), runs)
    out = decode(params, state)
    produced = int(np.asarray(out.step))
    if produced != new_tokens:
        raise RuntimeError(f"decode produced {produced} tokens, expected {new_tokens}")
    llm_prompt = int(np.asarray(state.key_valid).shape[1]) - new_tokens
    dec_med = statistics.median(dec)
    extras = {}
    if keep:
        from mmlm.models.llava_mini import LlavaMini
        logits = jax.jit(lambda p, b: LlavaMini(cfg).apply({"params": p}, b, m)["logits"])(params, data)
        extras["_peer"] = dict(params=params, prompt=prompt, media=media[:1, 0] if media.ndim == 5 else media,
                               mmlm_logits=np.asarray(logits[0, -1]), mmlm_tokens=np.asarray(out.tokens[0]))
    return extras | {
        "mode": cfg.mode, "vision_tokens_per_image": m, "llm_prompt_tokens": llm_prompt,
        "ttft_ms": 1e3 * statistics.median(ttft), "ttft_compile_s": ttft_first,
        "decode_tokens_per_s": batch * (new_tokens - 1) / dec_med, "decode_ms_per_token": 1e3 * dec_med / (new_tokens - 1),
        "response_ms": 1e3 * (statistics.median(ttft) + dec_med), "runs": runs,
    }


def _parser() -> argparse.ArgumentParser:
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
    from mmlm.bench.video_memory import baseline_of
    from mmlm.configs import resolve_config_path
    from mmlm.config_utils import load_config, split_config_overrides
    from mmlm.models.config import model_config_from_dict

    rest, overrides = split_config_overrides(argv)
    args = _parser().parse_args(rest)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
