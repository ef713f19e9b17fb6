"""HF LLaMA `config.json` <-> the mmlm `model.llm` section.

Reads both config generations: transformers 4.x (`rope_theta` plus
`rope_scaling`, with `type` or `rope_type`) and 5.x (`rope_parameters`,
holding `rope_theta` and `rope_type`). Anything that changes the math and
that mmlm does not implement is an error naming the field.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mmlm import config_defaults

# transformers `LlamaConfig` defaults, for fields a config.json leaves out.
HF_LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, max_position_embeddings=2048,
)

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
LLAMA_MODEL_TYPES = ("llama",)


def _get(hf: dict[str, Any], key: str) -> Any:
    value = hf.get(key)
    return HF_LLAMA_DEFAULTS[key] if value is None else value


def rope_from_hf(hf: dict[str, Any], where: str = "config.json") -> tuple[float, dict[str, Any]]:
    """(rope_theta, mmlm rope_scaling dict) from either config generation."""
    params = hf.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", hf.get("rope_theta", HF_LLAMA_DEFAULTS["rope_theta"]))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        field = "rope_parameters"
    else:
        theta = _get(hf, "rope_theta")
        scaling = dict(hf.get("rope_scaling") or {})
        field = "rope_scaling"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), {}
    if kind != "llama3":
        raise ValueError(
            f"{where}: unsupported {field} type {kind!r}; mmlm implements the default RoPE and 'llama3' "
            "frequency scaling only (convert a model that uses one of those)")
    missing = [k for k in LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"{where}: {field} of type 'llama3' lacks {missing}")
    unknown = sorted(set(scaling) - set(LLAMA3_KEYS) - {"rope_type", "type"})
    if unknown:
        raise ValueError(f"{where}: unsupported {field} field(s) {unknown} for 'llama3' scaling")
    out = {"rope_type": "llama3"}
    out.update({k: float(scaling[k]) for k in LLAMA3_KEYS})
    out["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return float(theta), out


def llm_config_from_hf(hf: dict[str, Any], where: str = "config.json",
                       check_model_type: bool = True) -> ml_collections.ConfigDict:
    """The mmlm `model.llm` section for an HF LLaMA config (errors name unsupported fields)."""
    model_type = hf.get("model_type")
    if check_model_type and model_type not in (None,) + LLAMA_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a LLaMA model; `--from hf-llama` converts "
            f"{LLAMA_MODEL_TYPES} checkpoints (LlamaForCausalLM)")
    act = _get(hf, "hidden_act")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported; mmlm's LLaMA MLP is SwiGLU ('silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if _get(hf, flag):
            raise ValueError(f"{where}: {flag}=true is not supported; mmlm's LLaMA projections have no bias")
    heads = int(_get(hf, "num_attention_heads"))
    width = int(_get(hf, "hidden_size"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or width // heads)
    theta, scaling = rope_from_hf(hf, where)
    llm = config_defaults.llm_vicuna7b()
    llm.update(dict(
        vocab_size=int(_get(hf, "vocab_size")), width=width, layers=int(_get(hf, "num_hidden_layers")),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, mlp_dim=int(_get(hf, "intermediate_size")),
        rms_eps=float(_get(hf, "rms_norm_eps")), rope_theta=theta,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings")),
    ))
    with llm.ignore_type():
        llm.rope_scaling = scaling
    return llm


# Token ids and context length are not part of the mmlm model config; they are
# carried in `config.source.hf` so an export writes them back.
HF_PASSTHROUGH = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def hf_config_from_llm(llm: Any, dtype: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `LlamaForCausalLM` config.json (readable by transformers 4.45+ and 5.x) for an mmlm LLM config.

    `llm` is an mmlm `LlamaConfig` (dataclass); `extra` adds passthrough fields.
    """
    scaling = dict(llm.rope_scaling) if llm.rope_scaling else None
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.width,
        "intermediate_size": llm.mlp_dim,
        "num_hidden_layers": llm.layers,
        "num_attention_heads": llm.heads,
        "num_key_value_heads": llm.kv_heads,
        "head_dim": llm.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": llm.rms_eps,
        "rope_theta": llm.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": llm.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": HF_LLAMA_DEFAULTS["max_position_embeddings"],
        "torch_dtype": dtype,
    }
    if scaling:
        cfg["max_position_embeddings"] = int(scaling["original_max_position_embeddings"] * scaling["factor"])
    for k, v in (extra or {}).items():
        if v is not None:
            cfg[k] = v
    return cfg
