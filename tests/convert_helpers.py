"""Shared helpers of the checkpoint-conversion tests: tiny random HF models written to disk.

Every model is built with transformers / torch in the test process (nothing is
downloaded). Norm weights and biases are randomised too, so a swapped or
dropped scale/bias cannot hide behind the default ones/zeros.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import numpy as np
import torch

from mmlm import checkpoint
from mmlm.cli import main as mmlm_main
from mmlm.models.config import model_config_from_dict


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Adds noise to every parameter (LayerNorm/RMSNorm scales and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return module


def tiny_llama_config(style: str, vocab: int = 128):
    """LLaMA-2 style (MHA, default RoPE), LLaMA-3.1 style (GQA + llama3 RoPE scaling), or tied embeddings."""
    from transformers import LlamaConfig

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  rms_norm_eps=1e-5, attn_implementation="eager", max_position_embeddings=256)
    if style == "llama2":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, **common)
    if style == "llama31":
        return LlamaConfig(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                           rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=16),
                           **common)
    if style == "tied":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common)
    raise ValueError(style)


def tiny_llama(directory: str, style: str, seed: int = 0, fmt: str = "safetensors", dtype=torch.float32):
    """A random `LlamaForCausalLM` saved to `directory` as sharded safetensors or a `.bin` file."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = randomize_(LlamaForCausalLM(tiny_llama_config(style)), seed).to(dtype).eval()
    if fmt == "safetensors":
        model.save_pretrained(directory, max_shard_size="40KB")  # several shards + index
    else:  # legacy PyTorch pickle
        os.makedirs(directory, exist_ok=True)
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    return model


def tiny_clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=16, attn_implementation="eager")


def clip_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision transformer of a `CLIPVisionModel` (transformers 4.x wraps it in `.vision_model`, 5.x does not)."""
    return getattr(model, "vision_model", model)


def tiny_clip(directory: str, style: str = "vision", seed: int = 1):
    """A random CLIP vision tower saved as `CLIPVisionModel` with `vision_model.*` keys ("vision": what
    transformers 4.x and the hub checkpoints hold), with bare keys ("bare": what transformers 5.x writes),
    or as a full `CLIPModel` ("full"). Returns the `CLIPVisionModel`."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    torch.manual_seed(seed)
    vcfg = tiny_clip_config()
    if style == "full":
        tcfg = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=50, max_position_embeddings=8)
        full = randomize_(CLIPModel(CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(),
                                               projection_dim=16)), seed).eval()
        full.save_pretrained(directory)
        vision = CLIPVisionModel(vcfg).eval()
        clip_tower(vision).load_state_dict(clip_tower(full.vision_model).state_dict())
        return vision
    vision = randomize_(CLIPVisionModel(vcfg), seed).eval()
    vision.config.save_pretrained(directory)
    prefix = "vision_model." if style == "vision" else ""
    state = {prefix + k: v.contiguous() for k, v in clip_tower(vision).state_dict().items()}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return vision


def run_mmlm(*argv: str) -> tuple[int, str, str]:
    """Runs the `mmlm` CLI in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mmlm_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def load_mmlm(directory: str) -> tuple[Any, dict]:
    """(ModelConfig, params) of an mmlm checkpoint."""
    cfg = model_config_from_dict(checkpoint.load_config_json(directory).model)
    return cfg, checkpoint.load_model_params(directory)


def assert_trees_equal(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested dicts of arrays (dtype included)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_trees_equal(a[k], b[k], f"{path}/{k}")
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{path}: values differ"


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
