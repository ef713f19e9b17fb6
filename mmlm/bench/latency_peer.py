"""The PyTorch peer of `mmlm bench latency`: transformers' `LlavaForConditionalGeneration`.

mmlm's LLaVA-1.5 mode and transformers' LLaVA are the same model, so with the
same weights they must give the same logits and greedy tokens; only their
speed may differ. `peer_row` builds the transformers model from mmlm's random
params (names through `mmlm.convert.mapping`), checks first-token logits and
`model.generate`'s greedy answer against mmlm's, and times transformers'
prefill (`model(...)`) and its cached greedy decoding (one `model(...)` per
token with the default dynamic KV cache, the loop `generate` runs) against
mmlm's jitted prefill and in-graph decode loop.

Needs `torch` and `transformers` (both in the `test` extra).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from mmlm.convert.hf_clip import hf_config_from_vision
from mmlm.convert.hf_llama import hf_config_from_llm
from mmlm.convert.mapping import clip_map, flatten, llama_map, to_hf
from mmlm.models.config import ModelConfig
from mmlm.models.layers import unstack_layers

HF_CLIP_PREFIX = "model.vision_tower."


def peer_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _hf_name(name: str) -> str:
    """mmlm's LlamaForCausalLM names -> LlavaForConditionalGeneration's."""
    return name if name.startswith("lm_head.") else "model.language_model." + name[len("model."):]


def hf_state_dict(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """mmlm LLaVA-1.5 params -> transformers LLaVA tensors (name -> torch-layout array)."""
    flat = flatten(unstack_layers(_plain(params)))

    def leaf(target) -> np.ndarray:
        path = target.path if target.layer is None else _layer_path(target.path, target.layer)
        return to_hf(np.asarray(flat[path], np.float32), target.op)

    out = {_hf_name(n): leaf(t) for n, t in llama_map(cfg.llm.layers, cfg.llm.tie_embeddings).items()}
    out.update({n: leaf(t) for n, t in clip_map(HF_CLIP_PREFIX, cfg.vision.blocks_used).items()})
    for j, hf in ((0, 1), (2, 2)):
        out[f"model.multi_modal_projector.linear_{hf}.weight"] = to_hf(
            np.asarray(flat[("projector", f"linear_{j}", "kernel")], np.float32), "t")
        out[f"model.multi_modal_projector.linear_{hf}.bias"] = np.asarray(
            flat[("projector", f"linear_{j}", "bias")], np.float32)
    return out


def _plain(tree: Any) -> Any:
    import flax.linen as nn
    import jax
    return jax.tree.map(np.asarray, nn.unbox(tree))


def _layer_path(path: tuple[str, ...], layer: int) -> tuple[str, ...]:
    i = path.index("layers")
    return path[:i] + (f"layers_{layer}",) + path[i + 1:]


def build_peer(cfg: ModelConfig, params: Any, image_token_id: int):
    """transformers `LlavaForConditionalGeneration` (fp32, eval mode) holding mmlm's weights."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if cfg.mode != "llava15" or cfg.projector != "mlp2x_gelu" or cfg.hd_grid != 1:
        raise ValueError("the transformers peer is LLaVA-1.5 (mode llava15, mlp2x_gelu projector, no HD)")
    vision = CLIPVisionConfig(**{k: v for k, v in hf_config_from_vision(cfg.vision, "float32").items()
                                 if k not in ("architectures", "model_type", "torch_dtype")})
    text = LlamaConfig(**{k: v for k, v in hf_config_from_llm(cfg.llm, "float32").items()
                          if k not in ("architectures", "model_type", "torch_dtype")})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         projector_hidden_act="gelu", vision_feature_layer=cfg.vision.select_layer,
                         vision_feature_select_strategy="default", image_seq_length=cfg.vision.num_patches)
    model = LlavaForConditionalGeneration(config).eval().float()
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf_state_dict(cfg, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    unused = {f"{HF_CLIP_PREFIX}post_layernorm.weight", f"{HF_CLIP_PREFIX}post_layernorm.bias"}
    late = tuple(f"{HF_CLIP_PREFIX}encoder.layers.{i}." for i in range(cfg.vision.blocks_used, cfg.vision.layers))
    missing = [k for k in missing if k not in unused and not k.startswith(late)]
    if missing or unexpected:
        raise RuntimeError(f"transformers LLaVA weights do not line up: missing {missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
    return model


def _median_ms(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peer_row(cfg: ModelConfig, params: Any, prompt: list[int], media: np.ndarray, *, new_tokens: int,
             runs: int, mmlm_logits: np.ndarray, mmlm_tokens: np.ndarray) -> dict[str, Any]:
    """Times transformers on mmlm's prompt (batch 1) and compares its outputs with mmlm's.

    prompt: mmlm token ids with one image placeholder (any negative id);
    media: (1, H, W, 3) the image; mmlm_logits (V,): mmlm's first-token
    logits; mmlm_tokens: mmlm's greedy answer (new_tokens,).
    """
    import torch

    image_id = cfg.llm.vocab_size - 1  # an id the random prompt never uses (it draws below it)
    model = build_peer(cfg, params, image_id)
    ids = []
    for t in prompt:
        ids += [image_id] * cfg.vision.num_patches if t < 0 else [int(t)]
    input_ids = torch.tensor([ids])
    pixels = torch.from_numpy(np.ascontiguousarray(media.transpose(0, 3, 1, 2)))
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
               pad_token_id=0, num_beams=1)
    def decode_seconds() -> float:
        """Greedy decoding of new_tokens - 1 tokens from a fresh prefill, timed without the prefill."""
        out = model(input_ids=input_ids, pixel_values=pixels, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0

    with torch.inference_mode():
        logits = model(input_ids=input_ids, pixel_values=pixels).logits[0, -1].numpy()
        tokens = model.generate(input_ids=input_ids, pixel_values=pixels, **gen)[0, len(ids):].numpy()
        prefill_ms = _median_ms(lambda: model(input_ids=input_ids, pixel_values=pixels, use_cache=True), runs)
        decode_seconds()  # warm-up
        decode_ms = 1e3 * statistics.median(decode_seconds() for _ in range(runs))
    return {
        "mode": "transformers", "vision_tokens_per_image": cfg.vision.num_patches, "llm_prompt_tokens": len(ids),
        "ttft_ms": prefill_ms, "decode_ms_per_token": decode_ms / (new_tokens - 1),
        "decode_tokens_per_s": 1e3 * (new_tokens - 1) / decode_ms,
        "response_ms": prefill_ms + decode_ms, "runs": runs,
        "max_abs_logit_diff": float(np.max(np.abs(logits - mmlm_logits))),
        "greedy_tokens_equal": int(np.sum(tokens[:new_tokens] == np.asarray(mmlm_tokens)[:new_tokens])),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
