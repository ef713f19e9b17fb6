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

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from mmlm import IMAGE_TOKEN_ID
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

