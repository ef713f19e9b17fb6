"""`mmlm bench video-memory`: KV-cache bytes vs number of video frames, LLaVA-1.5 vs LLaVA-Mini.

For F frames the LLM's cache must hold `text + F * tokens_per_frame` slots:
N = 576 patch tokens per frame for the LLaVA-1.5 baseline, m (1 by default)
compressed tokens for LLaVA-Mini. The figures come from XLA, not from a
formula: the decode step (one new token attending to the whole cache) is
lowered and compiled for abstract shapes (`jax.ShapeDtypeStruct`, nothing is
allocated, so a 7B config runs on a laptop), with the cache donated; the
compiled program's `memory_analysis()` then reports

* `alias_size_in_bytes`: the donated buffers updated in place = the cache;
* `argument_size_in_bytes`: cache + LLM weights + the token and index.

The bench checks the cache figure against the argument total minus the
weights (from their shapes) and checks that each added frame grows the cache
by exactly `layers x kv_heads x head_dim x 2 (K and V) x bytes x
tokens_per_frame`; it exits with status 1 if either check fails.

    mmlm bench video-memory --config llava_mini_vicuna7b
    mmlm bench video-memory --config configs/tiny.py --frames 1,2,3 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmlm.cli_common import check_output_file, number
from mmlm.errors import UserError
from mmlm.models.config import ModelConfig
from mmlm.models.llama import LlamaModel, init_cache
from mmlm.models.llava_mini import LlavaMini
from mmlm.safe_io import write_text_atomic


def baseline_of(cfg: ModelConfig) -> ModelConfig:
    """The LLaVA-1.5 baseline with the same vision tower and LLM: all N patch tokens, no compressor/pre-fusion."""
    return dataclasses.replace(cfg, mode="llava15", prefusion_layers=0, hd_grid=1,
                               compressor=dataclasses.replace(cfg.compressor, budgets=()))


def per_token_kv_bytes(cfg: ModelConfig) -> int:
    """Cache bytes of one token: layers x kv_heads x head_dim x 2 (K, V) x bytes per element."""
    llm = cfg.llm
    return llm.layers * llm.kv_heads * llm.head_dim * 2 * jnp.dtype(cfg.compute_dtype).itemsize


def _nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _llm_param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Abstract params of the LLM only (all a decode step reads), in the params dtype."""
    llm = LlamaModel(cfg.llm, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, scan_layers=cfg.scan_layers)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda x: llm.init(jax.random.PRNGKey(0), x, method=llm.forward_tokens), ids)
    return {"llm": nn.unbox(variables)["params"]}


def _decode_step(cfg: ModelConfig):
    """One-token decode step of an unpadded single sequence: (params, cache, token, index) -> (logits, cache)."""
    model = LlavaMini(cfg)

    def step(params, cache, token, index):
        slots = cache["k"].shape[2]
        key_valid = (jnp.arange(slots) <= index)[None, :]
        embeds = model.apply({"params": params}, token, method=LlavaMini.embed_tokens)
        positions = jnp.full(token.shape, index, jnp.int32)
        logits, cache = model.apply({"params": params}, embeds, positions, key_valid, cache, index,
                                    method=LlavaMini.decode)
        return logits[:, -1], cache

    return step


def compiled_cache_bytes(cfg: ModelConfig, slots: int, params_shapes: Any | None = None) -> dict[str, int]:
    """Compiles the decode step for a `slots`-slot cache (batch 1); returns XLA's memory figures."""
    params_shapes = params_shapes if params_shapes is not None else _llm_param_shapes(cfg)
    cache = jax.eval_shape(lambda: init_cache(cfg.llm, 1, slots, cfg.compute_dtype))
    token = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = jax.jit(_decode_step(cfg), donate_argnums=1).lower(params_shapes, cache, token, index).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError(f"backend {jax.default_backend()!r} gives no memory analysis for compiled programs")
    args = int(ma.argument_size_in_bytes)
    other = _nbytes(params_shapes) + _nbytes((token, index))
    alias = int(ma.alias_size_in_bytes)
    return {"slots": slots, "argument_bytes": args, "cache_bytes_from_arguments": args - other,
            # Backends that ignore donation report no alias: fall back to the argument difference.
            "cache_bytes": alias if alias else args - other, "alias_bytes": alias,
            "temp_bytes": int(ma.temp_size_in_bytes), "expected_cache_bytes": _nbytes(cache)}


def measure(cfg: ModelConfig, frames: Sequence[int], text_tokens: int, tokens_per_frame: int
            ) -> list[dict[str, int]]:
    """Cache figures for each frame count F (slots = text_tokens + F * tokens_per_frame)."""
    shapes = _llm_param_shapes(cfg)
    rows = []
    for f in frames:
        r = compiled_cache_bytes(cfg, text_tokens + f * tokens_per_frame, shapes)
        rows.append(dict(frames=f, tokens_per_frame=tokens_per_frame, **r))
    return rows


def per_frame_growth(rows: Sequence[dict[str, int]]) -> list[float]:
    """Cache bytes added per frame between consecutive measurements."""
    return [(b["cache_bytes"] - a["cache_bytes"]) / (b["frames"] - a["frames"]) for a, b in zip(rows, rows[1:])]


def check(rows: Sequence[dict[str, int]], cfg: ModelConfig) -> list[str]:
    """Problems found (empty = the cache is exactly text + F*t tokens' KV and grows by t tokens per frame)."""
    problems = []
    expect = per_token_kv_bytes(cfg) * rows[0]["tokens_per_frame"]
    for r in rows:
        if r["cache_bytes"] != r["cache_bytes_from_arguments"]:
            problems.append(f"F={r['frames']}: aliased cache {r['cache_bytes']} B != arguments minus weights "
                            f"{r['cache_bytes_from_arguments']} B")
        if r["cache_bytes"] != r["expected_cache_bytes"]:
            problems.append(f"F={r['frames']}: cache {r['cache_bytes']} B != shape-derived "
                            f"{r['expected_cache_bytes']} B")
    for g in per_frame_growth(rows):
        if g != expect:
            problems.append(f"per-frame growth {g} B != {expect} B")
    return problems


def _mb(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _parser() -> argparse.ArgumentParser:
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
    from mmlm.configs import resolve_config_path
    from mmlm.models.config import model_config_from_dict

    rest, overrides = split_config_overrides(argv)
    args = _parser().parse_args(rest)
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
    weights = _nbytes(_llm_param_shapes(mini)["llm"]) // jnp.dtype(mini.params_dtype).itemsize * \
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
