"""`mmlm compile --what infer`: will a model answer questions on a TPU slice, and how fast?

Compiles the two programs of `mmlm chat` for the slice's first chip, no TPU
needed (libtpu, as `mmlm compile`): the prefill (`mmlm.infer.generate.prefill`:
vision tower, compressor, pre-fusion, the LLM over the prompt into a KV cache
of prompt + `--new_tokens` slots, the first token) and one decode step
(`decode_step`, donated state: the cache is updated in place), for the
config's LLaVA-Mini model and for its LLaVA-1.5 baseline (every patch to the
LLM), one prompt of `config.text_len` text tokens and one image. Weights are
in the inference dtype (`--dtype`, default bfloat16) and in the unrolled
layout that `load_inference_model` serves (`decoding_layout`).

Per program: per-chip memory (`memory_analysis()`), and the estimated time:
the compiler's `optimal_seconds` when positive for a loop-free program, else
the roofline of `mmlm.bench.roofline` (a single-sequence decode step is bound
by reading every weight from HBM once). Per model, `serving_bytes`: every
weight plus the larger program's temporaries and outputs (the KV cache);
`fits` compares it with the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmlm.bench.common import baseline_of, fmt_bytes, oom_temporaries
from mmlm.bench.compile import Slice, step_time, topology_devices
from mmlm.errors import UserError


def _abstract(tree: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _program_report(compiled: Any, s: Slice, seconds_key: str) -> dict[str, Any]:
    mem = compiled.memory_analysis()
    args_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temp_b, alias_b = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    total = args_b + out_b + temp_b - alias_b
    timing = step_time(compiled, s, model_flops=0.0)
    return {
        "per_chip_bytes": {"arguments": args_b, "temporaries": temp_b, "outputs": out_b, "aliased": alias_b,
                           "total": total},
        "fits": total <= s.hbm_bytes, "hbm_fraction": total / s.hbm_bytes,
        seconds_key: timing["estimated_step_seconds"], "estimator": timing["estimator"],
        "roofline": {k: timing["roofline"][k] for k in ("flops", "bytes", "compute_memory_seconds")},
    }


def compile_inference(config: ml_collections.ConfigDict, s: Slice, *, new_tokens: int = 64,
                      dtype: str = "bfloat16", weights: str = "float") -> dict[str, Any]:
    """Compiles prefill and one decode step of the config's model and of its LLaVA-1.5 baseline.

    `weights`: "float" (every weight in `dtype`) or "int8" (LLM and pre-fusion kernels weight-only int8,
    `mmlm.models.quant`; activations in `dtype`).
    """
    from mmlm.infer.generate import decode_step_jit, decoding_layout, prefill_jit, sampling_params
    from mmlm.kernels.compression import compile_platform
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.llava_mini import LlavaMini
    from mmlm.models.quant import WEIGHT_FORMATS, params_bytes, quantize_params
    from mmlm.models.summary import batch_shapes

    if new_tokens < 2:
        raise UserError(f"--new_tokens must be >= 2, got {new_tokens}")
    if weights not in WEIGHT_FORMATS:
        raise UserError(f"--weights {weights!r}: choose from {WEIGHT_FORMATS}")
    device = topology_devices(s)[0]
    one_chip = jax.sharding.SingleDeviceSharding(device)
    mini = model_config_from_dict(config.model)
    if mini.mode != "llava_mini":
        raise UserError(f"--what infer compares LLaVA-Mini with its LLaVA-1.5 baseline: give a llava_mini config "
                        f"(this one is {mini.mode})")
    mini = dataclasses.replace(mini, dtype=dtype, param_dtype=dtype, remat_policy="none")
    text_len = int(config.get("text_len", 64))
    rows = []
    for cfg in (mini, baseline_of(mini)):
        m = cfg.check_budget(None)
        shapes = batch_shapes(cfg, 1, text_len, 1)
        batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=one_chip) for k, (shape, dt) in shapes.items()}
        boxed = jax.eval_shape(LlavaMini(cfg).init, jax.random.key(0), batch)
        serve_cfg = decoding_layout(cfg, {})[0]
        serve = lambda p: decoding_layout(cfg, p)[1]
        if weights == "int8":
            serve = lambda p: quantize_params(decoding_layout(cfg, p)[1])
        params = jax.eval_shape(serve, nn.unbox(boxed)["params"])
        params = _abstract(params, one_chip)
        sp, greedy = sampling_params(0.0, 1.0, eos_id=2)
        sp = _abstract(sp, one_chip)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=one_chip)
        static = dict(max_new_tokens=new_tokens, num_vision_tokens=m, greedy=greedy)
        row: dict[str, Any] = {"mode": cfg.mode, "vision_tokens_per_image": m if cfg.mode == "llava_mini"
                               else cfg.vision.num_patches, "text_tokens": text_len, "new_tokens": new_tokens}
        t0 = time.perf_counter()
        row["params_bytes"] = params_bytes(params)
        with compile_platform("tpu"):
            state = jax.eval_shape(lambda p, b, q, k: prefill_jit(serve_cfg, p, b, q, k, **static),
                                   params, batch, sp, key)
            state = _abstract(state, one_chip)
            row["llm_prompt_tokens"] = int(state.key_valid.shape[1]) - new_tokens
            try:
                prefill = prefill_jit.lower(serve_cfg, params, batch, sp, key, **static).compile()
                decode = decode_step_jit.lower(serve_cfg, params, state, sp, greedy=greedy).compile()
            except Exception as e:  # noqa: BLE001 - XlaRuntimeError: the compiler's own verdict
                needed = oom_temporaries(str(e))
                if needed is None:
                    raise
                row.update(compile_seconds=time.perf_counter() - t0, fits=False, serving_bytes=None,
                           hbm_fraction=None, prefill=None, decode_step=None,
                           compile_error=str(e).strip().splitlines()[0][:500])
                rows.append(row)
                continue
        row["compile_seconds"] = time.perf_counter() - t0
        row["prefill"] = _program_report(prefill, s, "seconds")
        row["decode_step"] = _program_report(decode, s, "seconds")
        # Serving holds every weight (each program's own arguments leave out the weights it does not read:
        # the decode step never touches the vision tower) plus the larger program's temporaries and outputs
        # (the KV cache: the decode step's outputs alias its donated inputs).
        work = max(r["per_chip_bytes"]["temporaries"] + r["per_chip_bytes"]["outputs"]
                   for r in (row["prefill"], row["decode_step"]))
        row["serving_bytes"] = row["params_bytes"] + work
        row["hbm_fraction"] = row["serving_bytes"] / s.hbm_bytes
        row["fits"] = row["serving_bytes"] <= s.hbm_bytes
        rows.append(row)
    return {
        "what": "infer", "topology": s.name, "topology_string": s.topology, "device_kind": device.device_kind,
        "chips_used": 1, "hbm_bytes_per_chip": s.hbm_bytes, "dtype": dtype, "weights": weights, "models": rows,
        "fits": all(r["fits"] for r in rows),
    }


def format_inference_report(r: dict[str, Any]) -> str:
    weights = (f"{r['dtype']} weights" if r.get("weights", "float") == "float"
               else f"int8 LLM weights, {r['dtype']} compute")
    lines = [f"{r['topology']} ({r['device_kind']}, one chip, {fmt_bytes(r['hbm_bytes_per_chip'])} HBM), "
             f"{weights}, batch 1"]
    head = (f"{'model':<11} {'vision tok':>10} {'LLM prompt':>10} {'weights':>10} {'serving mem':>12} "
            f"{'fits':>10} {'prefill ms':>10} {'ms/token':>9}")
    lines += [head, "-" * len(head)]
    for m in r["models"]:
        if m.get("compile_error"):
            lines.append(f"{m['mode']:<11} {m['vision_tokens_per_image']:>10} {m['llm_prompt_tokens']:>10} "
                         f"{fmt_bytes(m['params_bytes']):>10}  does not fit: {m['compile_error']}")
            continue
        p, d = m["prefill"], m["decode_step"]
        ms = lambda x: f"{1e3 * x:.3g}" if x else "?"
        fits = f"{'yes' if m['fits'] else 'NO'} {100 * m['hbm_fraction']:.0f}%"
        lines.append(f"{m['mode']:<11} {m['vision_tokens_per_image']:>10} {m['llm_prompt_tokens']:>10} "
                     f"{fmt_bytes(m['params_bytes']):>10} {fmt_bytes(m['serving_bytes']):>12} {fits:>10} "
                     f"{ms(p['seconds']):>10} {ms(d['seconds']):>9}")
    estimators = sorted({m[k]["estimator"] or "?" for m in r["models"] if not m.get("compile_error")
                         for k in ("prefill", "decode_step")})
    if estimators:
        lines.append("times: " + ", ".join(estimators) + " estimates")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ long video

def compile_long_video(config: ml_collections.ConfigDict, s: Slice, frames: int, *, new_tokens: int = 64,
                       dtype: str = "bfloat16", weights: str = "float") -> dict[str, Any]:
    """Compiles the chunked video path of `mmlm chat --video` for `frames` frames on the slice's first chip.

    The programs of `mmlm.infer.chunked`, for the config's own model (LLaVA-Mini or LLaVA-1.5): one chunk
    of `data.video_chunk_frames` frames through the vision tower, compressor and pre-fusion
    (`encode_chunk_jit`; it runs ceil(frames / chunk) times), the prompt assembly (`prefill_inputs_jit`:
    frames x tokens-per-frame vision tokens + `config.text_len` text tokens, and the zeroed KV cache), one
    LLM prefill chunk of `data.prefill_chunk_tokens` tokens over that cache (`prefill_chunk_jit`, cache
    donated; it runs prompt / chunk times), and one decode step (`decode_step_jit`, donated).
    `serving_bytes`: every weight plus, at the worst moment, what is alive: the program's temporaries and
    outputs (the cache, aliased with its donated input) and the arrays it reads that outlive it (the video's
    vision tokens while encoding and assembling, the prompt embeddings while prefilling).
    """
    from mmlm.infer.chunked import (EncodedVideo, encode_chunk_jit, first_token_jit, prefill_chunk_jit,
                                    prefill_chunking, prefill_inputs_jit, reads_fused_text)
    from mmlm.infer.generate import decode_step_jit, decoding_layout, sampling_params
    from mmlm.kernels.compression import compile_platform
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.llava_mini import LlavaMini
    from mmlm.models.quant import WEIGHT_FORMATS, params_bytes, quantize_params
    from mmlm.models.summary import batch_shapes

    if frames < 1:
        raise UserError(f"--frames must be >= 1, got {frames}")
    if new_tokens < 2:
        raise UserError(f"--new_tokens must be >= 2, got {new_tokens}")
    if weights not in WEIGHT_FORMATS:
        raise UserError(f"--weights {weights!r}: choose from {WEIGHT_FORMATS}")
    data = config.get("data", {})
    chunk = int(data.get("video_chunk_frames", 16))
    prefill_chunk = int(data.get("prefill_chunk_tokens", 512))
    if chunk < 1 or prefill_chunk < 1:
        raise UserError("data.video_chunk_frames and data.prefill_chunk_tokens must be >= 1")
    device = topology_devices(s)[0]
    one_chip = jax.sharding.SingleDeviceSharding(device)
    cfg = model_config_from_dict(config.model)
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype, remat_policy="none")
    m = cfg.check_budget(None)
    per_frame = m if cfg.mode == "llava_mini" else cfg.vision.num_patches
    text_len = int(config.get("text_len", 64))
    chunks = -(-frames // chunk)
    vision_len = frames * per_frame  # the last chunk's padded frames are dropped after encoding
    abstract = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=one_chip)
    shapes = batch_shapes(cfg, 1, text_len, chunk)
    chunk_batch = {k: abstract(shape, dt) for k, (shape, dt) in shapes.items()}
    text = {k: chunk_batch[k] for k in ("input_ids", "attention_mask", "fuse_mask")}
    boxed = jax.eval_shape(LlavaMini(cfg).init, jax.random.key(0), {k: abstract(sh, dt) for k, (sh, dt) in
                                                                     batch_shapes(cfg, 1, text_len, 1).items()})
    serve_cfg = decoding_layout(cfg, {})[0]
    serve = lambda p: decoding_layout(cfg, p)[1]
    if weights == "int8":
        serve = lambda p: quantize_params(decoding_layout(cfg, p)[1])
    params = _abstract(jax.eval_shape(serve, nn.unbox(boxed)["params"]), one_chip)
    width, cdt = cfg.llm.width, jnp.dtype(cfg.compute_dtype)
    video = EncodedVideo(vision=abstract((1, vision_len, width), cdt), vision_valid=abstract((1, vision_len), bool),
                         text_sum=abstract((1, text_len, width), jnp.float32) if reads_fused_text(cfg) else None,
                         frames=abstract((1,), jnp.int32))
    sp, greedy = sampling_params(0.0, 1.0, eos_id=2)
    sp = _abstract(sp, one_chip)
    key = abstract((2,), jnp.uint32)
    row: dict[str, Any] = {"mode": cfg.mode, "frames": frames, "vision_tokens_per_frame": per_frame,
                           "video_chunk_frames": chunk, "prefill_chunk_tokens": prefill_chunk, "text_tokens": text_len,
                           "new_tokens": new_tokens, "params_bytes": params_bytes(params)}
    t0 = time.perf_counter()
    nbytes = lambda tree: sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
    with compile_platform("tpu"):
        pre = dict(max_new_tokens=new_tokens, prefill_chunk=prefill_chunk)
        embeds, positions, key_valid, cache = _abstract(jax.eval_shape(
            lambda p, t, v: prefill_inputs_jit(serve_cfg, p, t, v, **pre), params, text, video), one_chip)
        size, _ = prefill_chunking(int(embeds.shape[1]), prefill_chunk)
        start = abstract((), jnp.int32)
        last = _abstract(jax.eval_shape(lambda *a: prefill_chunk_jit(serve_cfg, *a, size=size)[0], params, embeds,
                                        positions, key_valid, cache, start), one_chip)
        state = _abstract(jax.eval_shape(
            lambda p, l, c, kv, q, k: first_token_jit(serve_cfg, p, l, c, kv, q, k, max_new_tokens=new_tokens,
                                                      greedy=greedy)[0], params, last, cache, key_valid, sp, key),
            one_chip)
        row["llm_prompt_tokens"] = text_len - 1 + frames * per_frame
        row["kv_cache_slots"] = int(key_valid.shape[1])
        row["kv_cache_bytes"] = nbytes(cache)
        row["vision_tokens_bytes"] = vision_len * width * cdt.itemsize
        row["prompt_embeds_bytes"] = nbytes(embeds)
        row["prefill_chunks"] = int(embeds.shape[1]) // size
        try:
            programs = {
                "encode_chunk": encode_chunk_jit.lower(serve_cfg, params, chunk_batch, num_tokens=m).compile(),
                "prefill_inputs": prefill_inputs_jit.lower(serve_cfg, params, text, video, **pre).compile(),
                "prefill_chunk": prefill_chunk_jit.lower(serve_cfg, params, embeds, positions, key_valid, cache,
                                                         start, size=size).compile(),
                "decode_step": decode_step_jit.lower(serve_cfg, params, state, sp, greedy=greedy).compile(),
            }
        except Exception as e:  # noqa: BLE001 - XlaRuntimeError: the compiler's own verdict
            if oom_temporaries(str(e)) is None:
                raise
            row.update(compile_seconds=time.perf_counter() - t0, fits=False, serving_bytes=None, hbm_fraction=None,
                       compile_error=str(e).strip().splitlines()[0][:500])
            programs = {}
    if programs:
        row["compile_seconds"] = time.perf_counter() - t0
        for name, compiled in programs.items():
            row[name] = _program_report(compiled, s, "seconds")
        work = lambda name: row[name]["per_chip_bytes"]["temporaries"] + row[name]["per_chip_bytes"]["outputs"]
        row["serving_bytes"] = row["params_bytes"] + max(
            work("encode_chunk") + row["vision_tokens_bytes"], work("prefill_inputs") + row["vision_tokens_bytes"],
            work("prefill_chunk") + row["prompt_embeds_bytes"], work("decode_step"))
        row["hbm_fraction"] = row["serving_bytes"] / s.hbm_bytes
        row["fits"] = row["serving_bytes"] <= s.hbm_bytes
        # A whole video's prefill: each vision chunk, then each LLM prefill chunk.
        row["prefill_seconds_total"] = chunks * (row["encode_chunk"]["seconds"] or 0.0) + \
            row["prefill_chunks"] * (row["prefill_chunk"]["seconds"] or 0.0)
    return {
        "what": "infer", "video": True, "topology": s.name, "topology_string": s.topology,
        "device_kind": device.device_kind, "chips_used": 1, "hbm_bytes_per_chip": s.hbm_bytes, "dtype": dtype,
        "weights": weights, "models": [row], "fits": bool(row["fits"]),
    }


def format_long_video_report(r: dict[str, Any]) -> str:
    m = r["models"][0]
    weights = (f"{r['dtype']} weights" if r["weights"] == "float" else f"int8 LLM weights, {r['dtype']} compute")
    lines = [f"{r['topology']} ({r['device_kind']}, one chip, {fmt_bytes(r['hbm_bytes_per_chip'])} HBM), {weights}: "
             f"{m['mode']}, {m['frames']} frames x {m['vision_tokens_per_frame']} vision tokens + {m['text_tokens']} "
             f"text = {m['llm_prompt_tokens']} LLM prompt tokens",
             f"chunks: {m['video_chunk_frames']} frames per vision chunk, {m['prefill_chunk_tokens']} tokens per "
             f"prefill chunk",
             f"weights {fmt_bytes(m['params_bytes'])}, KV cache {fmt_bytes(m['kv_cache_bytes'])} "
             f"({m['kv_cache_slots']} slots), vision tokens {fmt_bytes(m['vision_tokens_bytes'])}, prompt "
             f"embeddings {fmt_bytes(m['prompt_embeds_bytes'])} ({m['prefill_chunks']} prefill chunks)"]
    if m.get("compile_error"):
        lines.append(f"does not fit: {m['compile_error']}")
        return "\n".join(lines)
    ms = lambda x: f"{1e3 * x:.4g}" if x else "?"
    for name in ("encode_chunk", "prefill_inputs", "prefill_chunk", "decode_step"):
        p = m[name]
        lines.append(f"{name:<14} {fmt_bytes(p['per_chip_bytes']['total']):>10} per chip, "
                     f"temporaries {fmt_bytes(p['per_chip_bytes']['temporaries'])}, "
                     f"~{ms(p['seconds'])} ms ({p['estimator']})")
    lines.append(f"serving memory {fmt_bytes(m['serving_bytes'])} of {fmt_bytes(r['hbm_bytes_per_chip'])} "
                 f"({100 * m['hbm_fraction']:.0f}%): {'fits' if m['fits'] else 'does NOT fit'}; "
                 f"whole-video prefill ~{m['prefill_seconds_total']:.3g} s")
    return "\n".join(lines)
