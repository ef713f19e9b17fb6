"""LLaMA-family decoder: RMSNorm, RoPE (default / llama3), MHA/GQA, SwiGLU, KV cache.

The same `LlamaBlock` is used by the modality pre-fusion layers.

KV cache layout: `{"k": (L, B, S, Hkv, Dh), "v": ...}` with `S` cache slots for
a scanned layer stack, or a tuple of L `{"k": (B, S, Hkv, Dh), ...}` for an
unrolled one (`init_cache(per_layer=True)`; what inference serves: each layer
then updates its own buffer in place).
A call writes its T new keys/values at slots `[index, index+T)`; the caller
passes `key_valid` (B, S) marking every slot that holds a real token
(including the new ones), so prompts of different lengths can share a batch
(left-padded). Without a cache (training, scoring) attention is causal over
the valid keys and runs through `mmlm.kernels.attention` (XLA, splash on TPU,
cuDNN on GPU: `model.attention`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmlm.models.config import LlamaConfig
from mmlm.kernels.attention import dense_attention, self_attention
from mmlm.models.layers import (ACT_BATCH, ACT_HEADS, ACT_KV_HEADS, ACT_LENGTH, ACT_MLP, BTD, BlockStack, RMSNorm,
                                apply_rope, causal_mask, constrain, dense, kernel_initializer,
                                rope_inv_freq)

KVCache = dict[str, jax.Array] | tuple[dict[str, jax.Array], ...]


class LlamaBlock(nn.Module):
    cfg: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # whole-sequence attention implementation (mmlm.kernels.attention)
    init_std: float = 0.02  # dense kernels at init (layers.kernel_initializer)

    @nn.compact
    def __call__(self, x: jax.Array, cache: KVCache | None, positions: jax.Array, mask: jax.Array | None,
                 key_valid: jax.Array | None, cache_index: jax.Array | None = None):
        """x: (B, T, D); positions: (B, T). Returns (x, new layer cache).

        With a cache, `mask` (B, T, S) says which slots each query reads. Without
        one, `mask` is None and attention is causal over the T positions with
        `key_valid` (B, T) marking the keys that may be read.
        """
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dk = dict(kw, kernel_init=kernel_initializer(self.init_std))
        b, t, _ = x.shape
        x = constrain(x, BTD)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        h = RMSNorm(cfg.rms_eps, name="input_layernorm", **kw)(x)
        q = dense(cfg.heads * cfg.head_dim, ("embed", "heads"), use_bias=False, name="q_proj", **dk)(h)
        k = dense(cfg.kv_heads * cfg.head_dim, ("embed", "kv_heads"), use_bias=False, name="k_proj", **dk)(h)
        v = dense(cfg.kv_heads * cfg.head_dim, ("embed", "kv_heads"), use_bias=False, name="v_proj", **dk)(h)
        q = apply_rope(q.reshape(b, t, cfg.heads, cfg.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(b, t, cfg.kv_heads, cfg.head_dim), positions, inv_freq)
        v = v.reshape(b, t, cfg.kv_heads, cfg.head_dim)
        q = constrain(q, (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None))
        k, v = (constrain(a, (ACT_BATCH, ACT_LENGTH, ACT_KV_HEADS, None)) for a in (k, v))
        new_cache = None
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        if cache is None:
            attn = self_attention(q, k, v, key_valid, causal=True, impl=self.attention)
        else:
            attn = dense_attention(q, k, v, mask)
        attn = constrain(attn, (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None)).reshape(b, t, cfg.heads * cfg.head_dim)
        x = constrain(x + dense(cfg.width, ("heads", "embed"), use_bias=False, name="o_proj", **dk)(attn), BTD)
        h = RMSNorm(cfg.rms_eps, name="post_attention_layernorm", **kw)(x)
        gate = dense(cfg.mlp_dim, ("embed", "mlp"), use_bias=False, name="gate_proj", **dk)(h)
        up = dense(cfg.mlp_dim, ("embed", "mlp"), use_bias=False, name="up_proj", **dk)(h)
        hidden = constrain(nn.silu(gate) * up, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
        x = x + dense(cfg.width, ("mlp", "embed"), use_bias=False, name="down_proj", **dk)(hidden)
        return constrain(x, BTD), new_cache


def block_stack(cfg: LlamaConfig, num_layers: int, dtype, param_dtype, scan: bool, remat: str,
                name: str, attention: str = "auto", unroll: int = 1, init_std: float = 0.02) -> BlockStack:
    return BlockStack(LlamaBlock, (("cfg", cfg), ("dtype", dtype), ("param_dtype", param_dtype),
                                   ("attention", attention), ("init_std", init_std)),
                      num_layers, scan=scan, remat=remat, unroll=unroll, name=name)


def init_cache(cfg: LlamaConfig, batch: int, slots: int, dtype=jnp.float32, layers: int | None = None,
               per_layer: bool = False) -> KVCache:
    """Zeroed KV cache with `slots` positions per sequence.

    Stacked `{"k", "v": (L, B, S, Hkv, Dh)}` for a scanned layer stack, or with
    `per_layer` (unrolled layers) a tuple of L `{"k", "v": (B, S, Hkv, Dh)}`.
    """
    n = layers or cfg.layers
    shape = (batch, slots, cfg.kv_heads, cfg.head_dim)
    if per_layer:
        return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(n))
    return {"k": jnp.zeros((n,) + shape, dtype), "v": jnp.zeros((n,) + shape, dtype)}


class LlamaModel(nn.Module):
    """Decoder-only LM. Parameters: embed_tokens, layers, norm, lm_head (unless tied)."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"
    scan_unroll: int = 1
    init_std: float = 0.02  # dense kernels at init (layers.kernel_initializer)

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.decoder = block_stack(cfg, cfg.layers, self.dtype, self.param_dtype, self.scan_layers, self.remat,
                                   name="decoder", attention=self.attention, unroll=self.scan_unroll,
                                   init_std=self.init_std)
        self.norm = RMSNorm(cfg.rms_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="lm_head",
                                 kernel_init=kernel_initializer(self.init_std))

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings (B, T, D); negative ids (placeholders) embed as id 0."""
        return constrain(self.embed_tokens(jnp.maximum(ids, 0)), BTD)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.cfg.tie_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, embeds: jax.Array, positions: jax.Array, key_valid: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0,
                 return_hidden: bool = False):
        """Runs the decoder.

        embeds: (B, T, D); positions: (B, T) RoPE positions; key_valid: (B, S)
        valid key slots, S = T without a cache or the cache size with one.
        Returns (logits (B, T, V) fp32 — or the final hidden states if
        `return_hidden` — , new cache or None).
        """
        t = embeds.shape[1]
        if cache is None:  # whole sequences: causal attention over the valid keys
            x, _ = self.decoder(embeds.astype(self.dtype), None, positions, None, key_valid)
            new_cache = None
        else:
            mask = causal_mask(jnp.arange(t) + cache_index, key_valid)
            x, new_cache = self.decoder(embeds.astype(self.dtype), cache, positions, mask, None,
                                        jnp.asarray(cache_index, jnp.int32))
        x = constrain(self.norm(x), BTD)
        if return_hidden:
            return x, new_cache
        return self.logits(x).astype(jnp.float32), new_cache

    def forward_tokens(self, ids: jax.Array, valid: jax.Array | None = None):
        """Convenience: logits (B, T, V) for right-padded token ids (B, T)."""
        if valid is None:
            valid = jnp.ones(ids.shape, bool)
        positions = jnp.where(valid, jnp.cumsum(valid, axis=-1) - 1, 0)
        return self(self.embed(ids), positions, valid)[0]
