"""Modality pre-fusion (LLaVA-Mini): a few LLM-shaped decoder blocks that let the
instruction text read the image before the LLM does.

Sequence per image/frame: `[vision tokens (P) , text (T)]`, where the vision
part ends with the compressed tokens. Attention is causal plus a key-padding
mask that hides text positions that are padding, the image placeholder or a
response token (only instruction text is fused). Position ids are the running
count of unmasked positions minus one (masked positions get 0).

`prefusion_from_llm` is the parameter surgery that starts these blocks as
copies of the LLM's (`train.init_prefusion_from_llm`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmlm.models.config import LlamaConfig
from mmlm.models.layers import BTD, constrain, positions_from_valid, stack_layers, unstack_layers
from mmlm.models.llama import block_stack


class PreFusion(nn.Module):
    cfg: LlamaConfig
    num_layers: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"
    scan_unroll: int = 1
    init_std: float = 0.02  # dense kernels at init (layers.kernel_initializer)

    @nn.compact
    def __call__(self, vision: jax.Array, text: jax.Array, fuse: jax.Array) -> tuple[jax.Array, jax.Array]:
        """vision: (B, P, D); text: (B, T, D); fuse: (B, T) bool, text positions to fuse.

        Returns (vision hidden states (B, P, D), text (B, T, D)); text positions
        that are not fused keep their input embedding.
        """
        p = vision.shape[1]
        x = constrain(jnp.concatenate([vision, text], axis=1).astype(self.dtype), BTD)
        valid = jnp.concatenate([jnp.ones(vision.shape[:2], bool), fuse], axis=1)
        positions = positions_from_valid(valid)
        stack = block_stack(self.cfg, self.num_layers, self.dtype, self.param_dtype, self.scan_layers,
                            self.remat, name="blocks", attention=self.attention, unroll=self.scan_unroll,
                            init_std=self.init_std)
        out, _ = stack(x, None, positions, None, valid)
        fused_text = jnp.where(fuse[..., None], out[:, p:], text.astype(self.dtype))
        return out[:, :p], fused_text


def prefusion_from_llm(params: dict[str, Any]) -> dict[str, Any]:
    """Params whose pre-fusion block i is a copy of LLM block i mod L (L = LLM blocks); the rest unchanged.

    The pre-fusion blocks have the LLM's block structure, so a pretrained
    LLM's blocks are a start that already knows how text reads the vision
    tokens (`train.init_prefusion_from_llm`). Works on scanned (`layers`,
    leading layer axis) and unrolled (`layers_{i}`) stacks alike. Raises
    ValueError when the block shapes differ.
    """
    if "prefusion" not in params:
        return params
    llm = unstack_layers(params["llm"]["decoder"])
    old = params["prefusion"]["blocks"]
    prefusion = unstack_layers(old)
    # Copies, not views: the train step donates the state, and one buffer may be donated only once.
    new = {f"layers_{i}": jax.tree.map(jnp.copy, llm[f"layers_{i % len(llm)}"]) for i in range(len(prefusion))}
    for name, block in new.items():
        want = jax.tree.map(jnp.shape, prefusion[name])
        if jax.tree.map(jnp.shape, block) != want:
            raise ValueError(f"LLM blocks {jax.tree.map(jnp.shape, block)} do not have the pre-fusion block "
                             f"shapes {want}")
    blocks = stack_layers(new, len(new)) if "layers" in old else new
    return {**params, "prefusion": {**params["prefusion"], "blocks": blocks}}
