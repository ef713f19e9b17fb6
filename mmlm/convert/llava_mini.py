"""LLaVA-Mini release `config.json` <-> the mmlm `model` section.

The release config is a LLaMA config plus the multimodal fields below. The
compressor of the release is fixed at 8 heads and has no key projection
(`kv_proj` is the identity when the vision width is the compressor width).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mmlm import config_defaults
from mmlm.convert import hf_llama
from mmlm.errors import UserError
from mmlm.models.config import ModelConfig
from mmlm.models.projector import projector_depth

RELEASE_COMPRESSOR_HEADS = 8
DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"

# Release fields with no mmlm counterpart that are fine at these values.
_ACCEPTED = {
    "mm_vision_select_feature": ("patch",),
    "image_aspect_ratio": ("pad",),
    "mm_patch_merge_type": (None, "flat"),
    "mm_use_im_start_end": (None, False),
}
_WHY = {
    "mm_vision_select_feature": "mmlm drops the class token and keeps the patch features ('patch')",
    "image_aspect_ratio": "mmlm pads images to a square with the CLIP mean colour ('pad')",
    "mm_patch_merge_type": "mmlm does not implement AnyRes patch merging ('flat')",
    "mm_use_im_start_end": "mmlm has no image start/end tokens",
}


def is_release_config(hf: dict[str, Any]) -> bool:
    return "compressor_size" in hf


def model_config_from_release(hf: dict[str, Any], vision: ml_collections.ConfigDict,
                              where: str = "config.json", hd_grid: int | None = None,
                              query_rows: int | None = None) -> ml_collections.ConfigDict:
    """The mmlm `model` section of a LLaVA-Mini release config.

    `vision` is the vision section (from the CLIP tower's config, or the
    CLIP ViT-L/14-336 default the release names); its select_layer and width
    are checked against / taken from the release fields.

    `hd_grid` (`mmlm convert --hd_grid`) states the HD grid n of a release
    whose config lacks `resolution_ratio`. It must agree with a
    `resolution_ratio` that is present, and with the compressor: HD stitches
    the n x n crops' features into one grid that the C x C queries cover, so
    each crop gets a (C/n) x (C/n) block of queries and C must be a multiple
    of n (the HD release: C = 8, n = 2). `query_rows` is the number of
    queries the checkpoint stores (C^2), checked against `compressor_size`.
    """
    if not is_release_config(hf):
        raise ValueError(
            f"{where}: no 'compressor_size' field, so this is not a LLaVA-Mini checkpoint; use --from hf-llama "
            "for a plain LLaMA model")
    for key, allowed in _ACCEPTED.items():
        value = hf.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"{where}: {key}={value!r} is not supported: {_WHY[key]}")
    llm = hf_llama.llm_config_from_hf(hf, where, check_model_type=False)
    c = int(hf["compressor_size"])
    if c < 1:
        raise ValueError(f"{where}: compressor_size must be >= 1, got {c}")
    if query_rows is not None and query_rows != c * c:
        raise UserError(f"{where}: compressor_size={c} means {c * c} compressor queries, but the checkpoint's "
                        f"model.compressor.query has {query_rows} rows; config.json does not belong to these "
                        "weights")
    ratio = int(hf.get("resolution_ratio") or 1)
    if hd_grid is not None:
        if hf.get("resolution_ratio") and ratio != hd_grid:
            raise UserError(f"--hd_grid {hd_grid} contradicts {where}: resolution_ratio={ratio}; drop --hd_grid "
                            "(it is only for configs without resolution_ratio) or fix config.json")
        if hd_grid > 1 and c % hd_grid:
            raise UserError(
                f"--hd_grid {hd_grid} contradicts the checkpoint's compressor: compressor_size={c} ({c * c} "
                f"queries on a {c}x{c} grid) does not split over {hd_grid}x{hd_grid} crops (an HD compressor's "
                f"grid is a multiple of the crop grid, e.g. 8 for 2x2); this checkpoint is not HD with that "
                "grid: check --hd_grid, or leave it out for a non-HD model")
        ratio = hd_grid
    projector = hf.get("mm_projector_type", "linear")
    try:
        projector_depth(projector)
    except ValueError as e:
        raise ValueError(f"{where}: mm_projector_type: {e}") from None
    mm_hidden = hf.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.width:
        raise ValueError(
            f"{where}: mm_hidden_size={mm_hidden} but the vision tower is {vision.width} wide; pass the matching "
            "CLIP directory with --vision")
    if mm_hidden is not None and int(mm_hidden) % RELEASE_COMPRESSOR_HEADS:
        raise ValueError(f"{where}: mm_hidden_size={mm_hidden} is not divisible by the compressor's 8 heads")
    vision = ml_collections.ConfigDict(vision.to_dict())
    vision.select_layer = int(hf.get("mm_vision_select_layer", -2))
    model = config_defaults.model_config(vision=vision, llm=llm, mode="llava_mini", tokens=c * c,
                                         prefusion_layers=int(hf.get("prefusion_layer_num", 4)))
    model.projector = projector
    model.hd_grid = ratio
    model.compressor.heads = RELEASE_COMPRESSOR_HEADS
    return model


def release_config(cfg: ModelConfig, dtype: str, mm_vision_tower: str,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The release config.json for an mmlm model (LLaMA fields + multimodal fields)."""
    if cfg.mode != "llava_mini":
        raise ValueError(f"model.mode={cfg.mode!r}: only 'llava_mini' models export to the LLaVA-Mini layout")
    if cfg.compressor.kind != "query":
        raise ValueError("an average-pooling compressor has no LLaVA-Mini release equivalent (it has no weights "
                         "the release could load); export needs compressor.kind='query'")
    if cfg.compressor.matryoshka:
        raise ValueError(
            f"this compressor is Matryoshka (budgets {cfg.compressor.budgets}): its queries carry permuted "
            "position codes the release Resampler cannot express; export needs model.compressor.budgets=()")
    if cfg.compressor.heads != RELEASE_COMPRESSOR_HEADS:
        raise ValueError(f"the release compressor has 8 heads; this model has {cfg.compressor.heads}")
    out = hf_llama.hf_config_from_llm(cfg.llm, dtype, extra)
    out.update({
        "architectures": ["LlavaMiniLlamaForCausalLM"],
        "model_type": "llava_mini",
        "compressor_size": cfg.compressor.grid,
        "prefusion_layer_num": cfg.prefusion_layers,
        "mm_vision_tower": mm_vision_tower,
        "mm_projector_type": cfg.projector,
        "mm_hidden_size": cfg.vision.width,
        "mm_vision_select_layer": cfg.vision.select_layer,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "use_mm_proj": True,
    })
    if cfg.hd_grid > 1:
        out["resolution_ratio"] = cfg.hd_grid
    return out
