"""KV-cache text generation for LLaVA-Mini / LLaVA-1.5 models.

Two phases, both pure functions of `(params, batch)`:

1. **Prefill** (`prefill`): the model builds the LLM input sequence with
   `LlavaMini.build_llm_inputs(align="left")` (valid tokens packed at the end
   of each row, so every row's last prompt token sits at slot P-1), runs the
   LLM over the whole prompt into a fresh cache of `P + max_new_tokens`
   slots and samples the first answer token from the last position.
2. **Decode** (`decode_step`): embeds the previous answer token (raw token
   embedding: answer tokens are response tokens, which pre-fusion never
   fuses, exactly as in training), writes it at slot `P + i - 1` with RoPE
   position `n_valid + i - 1`, marks the slot valid and samples token `i`.

`generate` runs the decode loop inside `jax.jit` with `lax.while_loop`
(stops when every row has produced a stop token or after `max_new_tokens`);
`stream` runs the same jitted step from a host loop so a chat can print
tokens as they arrive.

For LLaVA-Mini the prompt holds `m` vision tokens per image or video frame
(1 by default), so the cache of a T-frame video has `T*m` vision slots, not
`T*576` as for the LLaVA-1.5 baseline.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmlm.models.config import ModelConfig
from mmlm.models.layers import unstack_layers
from mmlm.models.llama import KVCache, init_cache
from mmlm.models.llava_mini import LlavaMini

Batch = dict[str, Any]
Params = Any


class DecodeState(NamedTuple):
    """Loop state of batched decoding (B rows, P prompt slots, S = P + max_new_tokens slots)."""

    step: jax.Array  # () int32: answer tokens produced so far (>= 1 after prefill)
    tokens: jax.Array  # (B, max_new_tokens) int32: answer tokens; pad_id after a row stops
    done: jax.Array  # (B,) bool: the row has produced a stop token
    lengths: jax.Array  # (B,) int32: answer tokens before the stop token
    cache: KVCache  # {"k","v": (layers, B, S, kv_heads, head_dim)}
    key_valid: jax.Array  # (B, S) bool: slots holding real tokens
    prompt_valid: jax.Array  # (B,) int32: valid prompt tokens per row (RoPE position of answer token 0)
    rng: jax.Array  # PRNG key for sampling


class SamplingParams(NamedTuple):
    """Traced sampling knobs (changing them does not recompile)."""

    temperature: jax.Array  # () float32, > 0 when sampling
    top_p: jax.Array  # () float32 in (0, 1]
    stop_ids: jax.Array  # (E,) int32 ids that end an answer
    pad_id: jax.Array  # () int32 written after a row has stopped


# ---------------------------------------------------------------------------- sampling

def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filtering: logits (B, V) with everything outside the top-p mass set to -inf.

    Keeps the smallest set of most likely tokens whose probability reaches
    `top_p` (always at least the most likely token).
    """
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each token: a token is kept if that mass is < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    # Threshold = smallest kept logit; ties at the threshold are kept too.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    # top_p = 1 keeps everything (the cumulative sum can round past 1 before the last token).
    return jnp.where((logits >= threshold) | (top_p >= 1.0), logits, -jnp.inf)


def sample_tokens(logits: jax.Array, rng: jax.Array, sp: SamplingParams, greedy: bool) -> jax.Array:
    """Next token per row from logits (B, V): argmax, or temperature + top-p sampling."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / sp.temperature
    return jax.random.categorical(rng, top_p_filter(scaled, sp.top_p), axis=-1).astype(jnp.int32)


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """(B,) bool: token is one of the stop ids."""
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


# ------------------------------------------------------------------------- the phases

def prefill_llm(model: LlavaMini, embeds: jax.Array, positions: jax.Array, key_valid: jax.Array,
                 cache: KVCache) -> tuple[jax.Array, KVCache]:
    """`LlavaMini.decode` over the whole prompt, projecting only the last position to the vocabulary.

    Left alignment puts every row's last prompt token at slot P-1; skipping the
    (B, P, V) logits of the other positions saves a vocabulary-sized matmul per
    prompt token. Returns next-token logits (B, V) fp32 and the filled cache.
    """
    hidden, cache = model.llm(embeds, positions, key_valid, cache=cache, cache_index=0, return_hidden=True)
    return model.llm.logits(hidden[:, -1]).astype(jnp.float32), cache


def prefill_logits(cfg: ModelConfig, params: Params, batch: Batch, *, max_new_tokens: int,
                   num_vision_tokens: int | None) -> tuple[jax.Array, KVCache, jax.Array, jax.Array]:
    """The prompt through the model: next-token logits (B, V) fp32 after the last prompt token, the cache
    (S = P + max_new_tokens slots), key_valid (B, S) and the valid prompt tokens per row (B,)."""
    model = LlavaMini(cfg)
    variables = {"params": params}
    inputs = model.apply(variables, batch, num_vision_tokens, "left", method=LlavaMini.build_llm_inputs)
    embeds, valid, positions = inputs["embeds"], inputs["valid"], inputs["positions"]
    b, p = valid.shape
    slots = p + max_new_tokens
    cache = init_cache(cfg.llm, b, slots, cfg.compute_dtype, per_layer=not cfg.scan_layers)
    key_valid = jnp.concatenate([valid, jnp.zeros((b, max_new_tokens), bool)], axis=1)
    logits, cache = model.apply(variables, embeds, positions, key_valid, cache, method=prefill_llm)
    return logits, cache, key_valid, valid.sum(axis=1)


def prefill(cfg: ModelConfig, params: Params, batch: Batch, sp: SamplingParams, rng: jax.Array, *,
            max_new_tokens: int, num_vision_tokens: int | None, greedy: bool) -> DecodeState:
    """Runs the prompt through the model and samples answer token 0.

    batch: input_ids / attention_mask / fuse_mask (B, T) right-padded prompts
    (see `mmlm.infer.batching.make_batch`), and for media `images`
    (B, F, K, H, W, 3) + `frame_mask` (B, F).
    """
    logits, cache, key_valid, n_valid = prefill_logits(cfg, params, batch, max_new_tokens=max_new_tokens,
                                                       num_vision_tokens=num_vision_tokens)
    return start_decoding(logits, cache, key_valid, n_valid, sp, rng, max_new_tokens=max_new_tokens, greedy=greedy)


def start_decoding(logits: jax.Array, cache: KVCache, key_valid: jax.Array, prompt_valid: jax.Array,
                   sp: SamplingParams, rng: jax.Array, *, max_new_tokens: int, greedy: bool) -> DecodeState:
    """The decoding state after a prefill: samples answer token 0 from the last prompt position's logits (B, V).

    key_valid: (B, P + max_new_tokens) the prompt's valid slots then the answer's (not yet valid);
    prompt_valid: (B,) valid prompt tokens per row.
    """
    b = logits.shape[0]
    rng, sub = jax.random.split(rng)
    first = sample_tokens(logits, sub, sp, greedy)
    done = _is_stop(first, sp.stop_ids)
    tokens = jnp.full((b, max_new_tokens), sp.pad_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(step=jnp.asarray(1, jnp.int32), tokens=tokens, done=done,
                       lengths=(~done).astype(jnp.int32), cache=cache, key_valid=key_valid,
                       prompt_valid=prompt_valid.astype(jnp.int32), rng=rng)


def decode_step(cfg: ModelConfig, params: Params, state: DecodeState, sp: SamplingParams, *,
                greedy: bool) -> DecodeState:
    """Feeds answer token `step-1` and samples answer token `step` (all rows at once)."""
    model = LlavaMini(cfg)
    variables = {"params": params}
    b, max_new = state.tokens.shape
    p = state.key_valid.shape[1] - max_new
    i = state.step
    prev = jax.lax.dynamic_slice_in_dim(state.tokens, i - 1, 1, axis=1)  # (B, 1)
    slot = p + i - 1
    key_valid = jax.lax.dynamic_update_slice_in_dim(state.key_valid, jnp.ones((b, 1), bool), slot, axis=1)
    positions = (state.prompt_valid + i - 1)[:, None]
    embeds = model.apply(variables, prev, method=LlavaMini.embed_tokens)
    logits, cache = model.apply(variables, embeds, positions, key_valid, state.cache, slot,
                                method=LlavaMini.decode)
    rng, sub = jax.random.split(state.rng)
    new = sample_tokens(logits[:, -1], sub, sp, greedy)
    new = jnp.where(state.done, sp.pad_id, new)
    done = state.done | _is_stop(new, sp.stop_ids)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, new[:, None], i, axis=1)
    return DecodeState(step=i + 1, tokens=tokens, done=done, lengths=state.lengths + (~done).astype(jnp.int32),
                       cache=cache, key_valid=key_valid, prompt_valid=state.prompt_valid, rng=rng)


def decode_loop(cfg: ModelConfig, params: Params, state: DecodeState, sp: SamplingParams, *,
                greedy: bool) -> DecodeState:
    """`decode_step` in a `lax.while_loop` until every row stopped or the answers are full."""
    max_new_tokens = state.tokens.shape[1]

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, lambda s: decode_step(cfg, params, s, sp, greedy=greedy), state)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "num_vision_tokens", "greedy"))
def _generate_jit(cfg: ModelConfig, params: Params, batch: Batch, sp: SamplingParams, rng: jax.Array, *,
                  max_new_tokens: int, num_vision_tokens: int | None, greedy: bool):
    state = prefill(cfg, params, batch, sp, rng, max_new_tokens=max_new_tokens,
                    num_vision_tokens=num_vision_tokens, greedy=greedy)
    state = decode_loop(cfg, params, state, sp, greedy=greedy)
    return state.tokens, state.lengths


prefill_jit = jax.jit(prefill, static_argnames=("cfg", "max_new_tokens", "num_vision_tokens", "greedy"))
decode_loop_jit = jax.jit(decode_loop, static_argnames=("cfg", "greedy"), donate_argnames=("state",))
# The cache is updated in place when the state is donated (one cache live, not two).
decode_step_jit = jax.jit(decode_step, static_argnames=("cfg", "greedy"), donate_argnames=("state",))


# ------------------------------------------------------------------------------ API

def decoding_layout(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """`(cfg, params)` with every layer stack unrolled (`scan_layers=False`, `layers_{i}` subtrees).

    A scanned stack slices each layer's weights out of the stacked arrays and
    threads the stacked KV cache through the scan at every decoding step:
    copies of all weights and of the cache per token (XLA on CPU and GPU
    cannot read a dynamic slice in place). Unrolled, each layer reads its own
    weights and updates its own cache buffer in place. Costs one copy of the
    layer weights, once: `load_inference_model` does it at load time.
    """
    if not cfg.scan_layers:
        return cfg, params
    return dataclasses.replace(cfg, scan_layers=False), unstack_layers(nn.unbox(params))


def _model_cfg(model: LlavaMini | ModelConfig) -> ModelConfig:
    return model.cfg if isinstance(model, LlavaMini) else model


def sampling_params(temperature: float, top_p: float, eos_id: int | Sequence[int],
                    pad_id: int | None = None) -> tuple[SamplingParams, bool]:
    """Validates the knobs; returns (SamplingParams, greedy). temperature 0 means greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stops = [int(eos_id)] if np.ndim(eos_id) == 0 else [int(e) for e in eos_id]
    if not stops:
        raise ValueError("eos_id must name at least one stop token")
    greedy = temperature == 0.0
    sp = SamplingParams(temperature=jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
                        top_p=jnp.asarray(top_p, jnp.float32), stop_ids=jnp.asarray(stops, jnp.int32),
                        pad_id=jnp.asarray(stops[0] if pad_id is None else pad_id, jnp.int32))
    return sp, greedy


@functools.partial(jax.jit, static_argnames=("cfg",))
def _vision_features_jit(cfg: ModelConfig, params: Params, batch: Batch) -> jax.Array:
    return LlavaMini(cfg).apply({"params": params}, batch, method=LlavaMini.vision_features)


def with_vision_features(model: LlavaMini | ModelConfig, params: Params, batch: Batch) -> Batch:
    """`batch` plus its ViT patch features (B, F, K, N, Dv) as `vision_features`.

    Generation from such a batch skips the vision tower: scoring several
    Matryoshka budgets runs the ViT once per batch instead of once per budget.
    A batch without media, or one that already carries them, is returned as it is.
    """
    if "images" not in batch or "vision_features" in batch:
        return batch
    feats = _vision_features_jit(_model_cfg(model), nn.unbox(params), batch)
    return {**batch, "vision_features": feats}


def _check_batch(cfg: ModelConfig, batch: Batch, num_vision_tokens: int | None) -> int | None:
    if "attention_mask" in batch and not np.all(np.asarray(batch["attention_mask"]).any(axis=1)):
        raise ValueError("every prompt in the batch needs at least one token")
    if "images" in batch:
        return cfg.check_budget(num_vision_tokens)
    if num_vision_tokens is not None:
        cfg.check_budget(num_vision_tokens)
    return None  # text-only batch: the budget changes nothing, so do not compile per budget


def generate(model: LlavaMini | ModelConfig, params: Params, batch: Batch, *, max_new_tokens: int,
             eos_id: int | Sequence[int], num_vision_tokens: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None, pad_id: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Batched generation, prefill + decode loop in one jitted program.

    Args:
      model: a `LlavaMini` (or its `ModelConfig`).
      params: the model's params (boxed or plain).
      batch: right-padded prompts: input_ids, attention_mask, fuse_mask (B, T); with media also
        images (B, F, K, H, W, 3) and frame_mask (B, F), and optionally their `vision_features`
        (`with_vision_features`). Rows may have different lengths and media.
      max_new_tokens: answer length limit (static: one compile per value).
      eos_id: stop token id or ids.
      num_vision_tokens: Matryoshka budget (None = the model's default).
      temperature: 0 = greedy; otherwise softmax temperature.
      top_p: nucleus mass when sampling.
      rng: PRNG key for sampling (default key 0).
      pad_id: written after a row stops (default: the first stop id).

    Returns:
      tokens (B, max_new_tokens) int32 — each row's answer, then its stop token, then pad_id — and
      lengths (B,) int32, the answer length before the stop token (max_new_tokens if none).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = _model_cfg(model)
    m = _check_batch(cfg, batch, num_vision_tokens)
    sp, greedy = sampling_params(temperature, top_p, eos_id, pad_id)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    tokens, lengths = _generate_jit(cfg, nn.unbox(params), batch, sp, rng, max_new_tokens=max_new_tokens,
                                    num_vision_tokens=m, greedy=greedy)
    return np.asarray(tokens), np.asarray(lengths)


def stream(model: LlavaMini | ModelConfig, params: Params, batch: Batch, *, max_new_tokens: int,
           eos_id: int | Sequence[int], num_vision_tokens: int | None = None, temperature: float = 0.0,
           top_p: float = 1.0, rng: jax.Array | None = None) -> Iterator[np.ndarray]:
    """Like `generate`, but yields each step's tokens (B,) as soon as they exist.

    A host loop over the jitted one-token step (same `decode_step` as the
    in-jit loop, so results are identical). Stops when every row has produced
    a stop token (which is yielded) or after `max_new_tokens` tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = _model_cfg(model)
    m = _check_batch(cfg, batch, num_vision_tokens)
    sp, greedy = sampling_params(temperature, top_p, eos_id)
    params = nn.unbox(params)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    state = prefill_jit(cfg, params, batch, sp, rng, max_new_tokens=max_new_tokens, num_vision_tokens=m,
                         greedy=greedy)
    yield from stream_decoding(cfg, params, state, sp, greedy=greedy)


def stream_decoding(cfg: ModelConfig, params: Params, state: DecodeState, sp: SamplingParams, *,
                    greedy: bool) -> Iterator[np.ndarray]:
    """Yields each step's tokens (B,) from a prefilled state: token 0, then one jitted decode step per token
    until every row has stopped or the answers are full."""
    yield np.asarray(state.tokens[:, 0])
    for i in range(1, state.tokens.shape[1]):
        if bool(np.all(np.asarray(state.done))):
            return
        state = decode_step_jit(cfg, params, state, sp, greedy=greedy)
        yield np.asarray(state.tokens[:, i])


def trim_answer(tokens: np.ndarray, length: int) -> list[int]:
    """One row's answer ids (without the stop token)."""
    return [int(t) for t in np.asarray(tokens)[: int(length)]]
