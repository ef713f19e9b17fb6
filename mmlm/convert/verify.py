"""`mmlm verify`: run the HF/PyTorch model and the converted mmlm model on the same random inputs.

Compared outputs (max absolute difference, and the limit it must stay under,
`atol + rtol * max|reference|`):
* CLIP (mmlm params['vision'] only): the selected hidden state without the
  class token (`hidden_states[select_layer][:, 1:]`);
* LLaMA (params['llm'] only): logits at the valid (non-padding) positions of
  a right-padded batch;
* LLaVA-Mini: the LLM-input vision tokens (compressor + projector +
  pre-fusion) and the logits of the full model, on a batch with instruction
  and response tokens and padding. The reference is `mmlm.convert.reference`
  (transformers CLIP/LLaMA modules + torch `nn.MultiheadAttention` /
  `nn.LayerNorm`). Without a CLIP tower on both sides (the release does not
  ship it: pass --vision), random CLIP features replace the images.

The two models run one after the other and the first is freed before the
second loads, so memory holds one model at a time. Exit status: 0 if every
output is within its limit, 1 otherwise, 2 on usage errors.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import numpy as np

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID

# (atol, rtol) by compute dtype; the limit of an output is atol + rtol * max|reference|.
DEFAULT_TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 5e-2)}


# ----------------------------------------------------------------------------- inputs

def text_inputs(vocab: int, batch: int, seq_len: int, seed: int, image: bool) -> dict[str, np.ndarray]:
    """Random ids (B, T), right padding on every other sample, optionally one <image> and a response."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq_len)).astype(np.int32)
    mask = np.ones((batch, seq_len), bool)
    labels = np.full((batch, seq_len), IGNORE_INDEX, np.int32)
    for i in range(batch):
        length = seq_len - (seq_len // 4 if i % 2 else 0)
        mask[i, length:] = False
        ids[i, length:] = 0
        if image:
            ids[i, 1 + i % 3] = IMAGE_TOKEN_ID
            resp = max(1, length // 4)  # the last tokens are the response: not fused by pre-fusion
            labels[i, length - resp:length] = ids[i, length - resp:length]
    # mmlm takes the fuse mask explicitly; for one training-style turn it is "not a response token".
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "fuse_mask": labels == IGNORE_INDEX}


def _result(ref: np.ndarray, out: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape}, mmlm {out.shape}")
    diff = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64))))
    scale = float(np.max(np.abs(ref)))
    limit = atol + rtol * scale
    return {"max_abs_diff": diff, "ref_max_abs": scale, "limit": limit, "ok": bool(diff <= limit),
            "shape": list(ref.shape)}


def _free(*objs) -> None:
    del objs
    gc.collect()


# ------------------------------------------------------------------------ mmlm side

def _mmlm(dst: str, dtype: str):
    import jax.numpy as jnp

    from mmlm import checkpoint
    from mmlm.convert import mapping
    from mmlm.convert.exporter import LeafStore
    from mmlm.models.config import model_config_from_dict

    config = checkpoint.load_config_json(dst)
    model = config.model
    model.dtype = dtype
    model.param_dtype = dtype
    cfg = model_config_from_dict(model)
    # Leaf by leaf (Orbax partial restore), so host memory holds one copy of the weights plus one leaf.
    store = LeafStore(dst)
    leaves = {}
    for path in list(store.meta):
        leaves[path] = jnp.asarray(store[path], jnp.dtype(dtype))
        store.pop(path)
    return cfg, mapping.unflatten(leaves)


# ------------------------------------------------------------------------ verifiers

def verify_clip(src: str, dst: str, args, atol: float, rtol: float) -> dict[str, Any]:
    import jax.numpy as jnp
    import torch

    from mmlm.convert.reference import to_numpy, torch_dtype
    from mmlm.models.vit import VisionTower

    from mmlm import checkpoint
    from mmlm.models.config import model_config_from_dict

    vcfg = model_config_from_dict(checkpoint.load_config_json(dst).model).vision
    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((args.batch, vcfg.image_size, vcfg.image_size, 3)).astype(np.float32)
    tdt = torch_dtype(args.dtype)
    model = _hf_clip(src, tdt)
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2).to(tdt), output_hidden_states=True)
        ref = to_numpy(out.hidden_states[vcfg.select_layer][:, 1:])
    _free(model, out)
    cfg, params = _mmlm(dst, args.dtype)
    mine = VisionTower(cfg.vision, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype).apply(
        {"params": params["vision"]}, jnp.asarray(images, cfg.compute_dtype))
    return {"kind": "clip", "inputs": f"random images {images.shape}",
            "outputs": {"features": _result(ref, np.asarray(mine, np.float32), atol, rtol)}}


def _hf_llama(src: str, hf: dict[str, Any], tdt):
    """`LlamaForCausalLM.from_pretrained` with transformers' own reading of config.json (extra
    LLaVA-Mini tensors in the directory are left out); fails if a LLaMA weight is missing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures", "auto_map")})
    model, info = LlamaForCausalLM.from_pretrained(src, config=cfg, dtype=tdt, attn_implementation="eager",
                                                   output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise ValueError(f"{src}: transformers found no weights for {missing[:8]}")
    return model.eval()


def _hf_clip(directory: str, tdt):
    """`CLIPVisionModel.from_pretrained` (CLIPVisionModel or CLIPModel directories); checkpoints with bare
    (unprefixed) keys are loaded by name instead."""
    from transformers import CLIPVisionModel

    from mmlm.convert import mapping
    from mmlm.convert.io import CheckpointReader
    from mmlm.convert.reference import clip_tower, load_weights

    model, info = CLIPVisionModel.from_pretrained(directory, dtype=tdt, attn_implementation="eager",
                                                  output_loading_info=True)
    if info["missing_keys"]:
        reader = CheckpointReader(directory)
        load_weights(clip_tower(model), reader, mapping.clip_prefix(reader.names()) or "", tdt)
    return model.eval()


def verify_llama(src: str, dst: str, args, atol: float, rtol: float) -> dict[str, Any]:
    import jax.numpy as jnp
    import torch

    from mmlm.convert.io import read_hf_config
    from mmlm.convert.reference import to_numpy, torch_dtype
    from mmlm.models.llama import LlamaModel

    hf = read_hf_config(src)
    tdt = torch_dtype(args.dtype)
    model = _hf_llama(src, hf, tdt)
    inputs = text_inputs(model.config.vocab_size, args.batch, args.seq_len, args.seed, image=False)
    with torch.no_grad():
        ref = to_numpy(model(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
                             attention_mask=torch.from_numpy(inputs["attention_mask"]).long()).logits)
    _free(model)
    cfg, params = _mmlm(dst, args.dtype)
    mine = LlamaModel(cfg.llm, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype).apply(
        {"params": params["llm"]}, jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]),
        method=LlamaModel.forward_tokens)
    valid = inputs["attention_mask"]
    return {"kind": "llama", "inputs": f"random token ids {inputs['input_ids'].shape} with right padding",
            "outputs": {"logits": _result(ref[valid], np.asarray(mine)[valid], atol, rtol)}}


def verify_llava_mini(src: str, dst: str, args, atol: float, rtol: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmlm import checkpoint
    from mmlm.convert import mapping
    from mmlm.convert.importer import find_vision_dir
    from mmlm.convert.io import CheckpointReader, read_hf_config
    from mmlm.convert.reference import LlavaMiniReference, clip_tower, load_weights, to_numpy, torch_dtype
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.llava_mini import LlavaMini

    hf = read_hf_config(src)
    if "compressor_size" not in hf:
        raise ValueError(f"{src}: config.json has no compressor_size; it is not a LLaVA-Mini directory")
    mcfg = model_config_from_dict(checkpoint.load_config_json(dst).model)
    if mcfg.hd_grid > 1 and not hf.get("resolution_ratio"):
        # Imported with --hd_grid: the release config does not say it is HD, the converted one does.
        hf = {**hf, "resolution_ratio": mcfg.hd_grid}
    tdt = torch_dtype(args.dtype)
    reader = CheckpointReader(src)
    # Same precedence as the import: --vision, else a tower inside the release, else one found on disk.
    in_ckpt = mapping.clip_prefix(reader.names()) == mapping.CLIP_PREFIXES[0] and not args.vision
    vision_dir = None if in_ckpt else find_vision_dir(src, hf, args.vision)
    vision = None
    if "vision" not in mmlm_parts(dst):
        vision_dir = in_ckpt = None  # compare from features: the mmlm side has no tower
    if vision_dir:
        vision = _hf_clip(vision_dir, tdt)
    elif in_ckpt:  # the tower is inside the release checkpoint: shape from the mmlm config
        from mmlm.convert.hf_clip import hf_config_from_vision

        vcfg = CLIPVisionConfig(**hf_config_from_vision(mcfg.vision, args.dtype))
        vcfg._attn_implementation = "eager"
        vision = CLIPVisionModel(vcfg).to(tdt).eval()
        load_weights(clip_tower(vision), reader, mapping.CLIP_PREFIXES[0], tdt)
    llm = _hf_llama(src, hf, tdt)
    ref_model = LlavaMiniReference(hf, llm, vision, int(hf.get("mm_vision_select_layer", -2)),
                                   mcfg.vision.width).to(tdt).eval()
    ref_model.load(reader, tdt)

    inputs = text_inputs(mcfg.llm.vocab_size, args.batch, args.seq_len, args.seed, image=True)
    rng = np.random.default_rng(args.seed + 1)
    k = 1 if mcfg.hd_grid == 1 else mcfg.hd_grid**2 + 1
    s = mcfg.vision.image_size
    t = {n: torch.from_numpy(v) for n, v in inputs.items()}
    t["input_ids"] = t["input_ids"].long()
    t["labels"] = t["labels"].long()
    with torch.no_grad():
        if vision is not None:
            images = rng.standard_normal((args.batch, k, s, s, 3)).astype(np.float32)
            feats = ref_model.features(torch.from_numpy(images).permute(0, 1, 4, 2, 3).to(tdt))
            media, described = images, f"random images {images.shape}"
        else:
            feats_np = rng.standard_normal((args.batch, k, mcfg.vision.num_patches, mcfg.vision.width))
            feats = torch.from_numpy(feats_np.astype(np.float32)).to(tdt)
            media, described = feats_np.astype(np.float32), (
                f"random CLIP features {feats_np.shape} (no vision tower: pass --vision to include it)")
        tokens, fused = ref_model.vision_and_text(feats, t["input_ids"], t["labels"], t["attention_mask"])
        logits, valid = ref_model.logits(tokens, fused, t["input_ids"], t["attention_mask"])
        ref_tokens, ref_logits, ref_valid = to_numpy(tokens), to_numpy(logits), valid.numpy()
    _free(ref_model, llm, vision)

    cfg, params = _mmlm(dst, args.dtype)
    model = LlavaMini(cfg) if vision is not None else _feature_model(cfg)
    batch = {k2: jnp.asarray(v) for k2, v in inputs.items()}
    batch["images"] = jnp.asarray(media[:, None], cfg.compute_dtype)  # one frame
    batch["frame_mask"] = jnp.ones((args.batch, 1), bool)
    m = cfg.compressor.tokens
    # jit: the scanned blocks run far faster compiled than op by op.
    mine_tokens, _, _ = jax.jit(lambda p, b: model.apply({"params": p}, b, m, method=LlavaMini.vision_and_text))(
        params, batch)
    out = jax.jit(lambda p, b: model.apply({"params": p}, b, m))(params, batch)
    mine_valid = np.asarray(out["valid"])
    if not np.array_equal(mine_valid, ref_valid):
        raise AssertionError("mmlm and the reference disagree on which LLM positions are valid")
    return {"kind": "llava-mini", "inputs": described + f", token ids {inputs['input_ids'].shape}",
            "outputs": {
                "vision_tokens": _result(ref_tokens, np.asarray(mine_tokens, np.float32), atol, rtol),
                "logits": _result(ref_logits[ref_valid], np.asarray(out["logits"])[mine_valid], atol, rtol)}}


def _feature_model(cfg):
    """`LlavaMini` whose `images` entry already holds CLIP features (B, F, K, N, Dv): everything after the
    vision tower runs the model's own code."""
    from mmlm.models.llava_mini import LlavaMini

    class FeatureLlavaMini(LlavaMini):
        def encode_images(self, images):
            return images

    return FeatureLlavaMini(cfg)


# ----------------------------------------------------------------------------- main

def mmlm_parts(dst: str) -> set[str]:
    """Top-level params of an mmlm checkpoint, from the Orbax metadata (nothing loaded)."""
    from mmlm import checkpoint

    return set(checkpoint.load_model_params_metadata(dst).keys())


def detect_kind(parts: set[str]) -> str:
    if parts == {"vision"}:
        return "clip"
    if parts == {"llm"}:
        return "llama"
    return "llava-mini"


def run(args) -> dict[str, Any]:
    from mmlm import checkpoint

    for flag, path in (("--hf", args.hf), ("--mmlm", args.mmlm)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {path!r} is not a directory")
    if not checkpoint.is_model_checkpoint(args.mmlm):
        raise FileNotFoundError(f"--mmlm {args.mmlm!r} is not an mmlm model checkpoint (config.json + params/)")
    atol0, rtol0 = DEFAULT_TOLERANCE[args.dtype]
    atol = atol0 if args.atol is None else args.atol
    rtol = rtol0 if args.rtol is None else args.rtol
    kind = detect_kind(mmlm_parts(args.mmlm))
    from transformers.utils import logging as hf_logging

    # transformers reports the LLaVA-Mini tensors LlamaForCausalLM does not use, and draws progress bars:
    # neither belongs in this command's output.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    verifier = {"clip": verify_clip, "llama": verify_llama, "llava-mini": verify_llava_mini}[kind]
    result = verifier(args.hf, args.mmlm, args, atol, rtol)
    result.update(hf=os.path.abspath(args.hf), mmlm=os.path.abspath(args.mmlm), dtype=args.dtype,
                  atol=atol, rtol=rtol, ok=all(o["ok"] for o in result["outputs"].values()))
    return result
