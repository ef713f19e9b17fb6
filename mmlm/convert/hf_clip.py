"""HF CLIP `config.json` (CLIPVisionModel or full CLIPModel) <-> the mmlm `model.vision` section."""

from __future__ import annotations

from typing import Any

import ml_collections

from mmlm.models.config import VisionConfig

# transformers `CLIPVisionConfig` defaults, for fields a config.json leaves out
# (older CLIPModel configs list only the non-default vision fields).
HF_CLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512,
)


def vision_section(hf: dict[str, Any]) -> dict[str, Any]:
    """The vision part of a CLIPVisionModel or CLIPModel config, defaults filled in."""
    section = hf.get("vision_config") if hf.get("model_type") == "clip" or "vision_config" in hf else hf
    section = dict(section or {})
    return {k: section.get(k, v) if section.get(k) is not None else v for k, v in HF_CLIP_VISION_DEFAULTS.items()}


def vision_config_from_hf(hf: dict[str, Any], select_layer: int = -2,
                          where: str = "config.json") -> ml_collections.ConfigDict:
    """The mmlm `model.vision` section for a CLIP config (errors name unsupported fields)."""
    v = vision_section(hf)
    if v["hidden_act"] != "quick_gelu":
        raise ValueError(
            f"{where}: hidden_act {v['hidden_act']!r} is not supported; mmlm's CLIP blocks use 'quick_gelu' "
            "(the OpenAI CLIP activation)")
    if int(v["num_channels"]) != 3:
        raise ValueError(f"{where}: num_channels {v['num_channels']} is not supported; mmlm feeds RGB images")
    cfg = ml_collections.ConfigDict(dict(
        image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), width=int(v["hidden_size"]),
        layers=int(v["num_hidden_layers"]), heads=int(v["num_attention_heads"]),
        mlp_dim=int(v["intermediate_size"]), select_layer=int(select_layer),
        layer_norm_eps=float(v["layer_norm_eps"]),
    ))
    _validate(VisionConfig(**cfg.to_dict()), where)
    return cfg


def _validate(vision: VisionConfig, where: str) -> None:
    """Checks select_layer and the patch grid with the model's own rules."""
    try:
        _ = vision.blocks_used, vision.grid
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def hf_config_from_vision(vision: VisionConfig, dtype: str, projection_dim: int | None = None) -> dict[str, Any]:
    """A `CLIPVisionModel` config.json for an mmlm vision config."""
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": vision.width,
        "intermediate_size": vision.mlp_dim,
        "num_hidden_layers": vision.layers,
        "num_attention_heads": vision.heads,
        "num_channels": 3,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": vision.layer_norm_eps,
        "projection_dim": projection_dim or HF_CLIP_VISION_DEFAULTS["projection_dim"],
        "torch_dtype": dtype,
    }
