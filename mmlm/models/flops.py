"""Analytic matmul FLOPs of a LLaVA-Mini model: one image-question prefill, and one train step.

FLOPs = 2 x multiply-adds of every matmul (dense layers, attention scores and
``A V`` over the full square, the patch-embedding convolution, the LM head);
norms, softmax, activations, RoPE and other elementwise work are not counted.
`mmlm bench flops` documents the conventions and compares them with XLA.

`train_step_flops` is the model-FLOPs count of one optimizer step, the
numerator of MFU (recomputation by remat is NOT counted, as MFU requires):
every sample of the global batch runs the forward once; the backward costs
one more forward for the activation gradients of every layer that has a
trainable parameter upstream of it, and one more for the weight gradients of
every trainable layer. Scanned layer stacks count every layer, and gradient
accumulation changes nothing (the global batch is the same).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mmlm.models.config import PARTS, LlamaConfig, ModelConfig, VisionConfig
from mmlm.models.projector import projector_depth

LM_HEAD_CHOICES = ("all", "last")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Token counts of one image-question prefill (batch 1, one image)."""

    text_tokens: int  # instruction text tokens (the <image> placeholder excluded)
    vision_tokens: int  # m: vision tokens the LLM sees
    views: int  # images through the vision tower (1, or n*n crops + the whole image for HD)
    patches: int  # N per view
    compressor_keys: int  # patches the compressor attends over (0 = no compressor)
    projected: int  # tokens through the projector
    prefusion_vision: int  # vision positions of the pre-fusion sequence (0 = no pre-fusion)
    prefusion_len: int  # pre-fusion sequence: vision + text + the (masked) placeholder slot
    llm_len: int  # LLM sequence: text + vision tokens (the placeholder replaced)
    lm_head_positions: int  # positions the LM head is applied to


def make_workload(cfg: ModelConfig, text_tokens: int, num_vision_tokens: int | None = None,
                  lm_head: str = "all") -> Workload:
    """Sequence lengths of every part for `text_tokens` instruction tokens and one image."""
    if text_tokens < 1:
        raise ValueError(f"--text_tokens must be >= 1, got {text_tokens}")
    if lm_head not in LM_HEAD_CHOICES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_CHOICES}, got {lm_head!r}")
    m = cfg.check_budget(num_vision_tokens)
    n = cfg.vision.num_patches
    hd = cfg.hd_grid
    views = 1 if hd == 1 else hd * hd + 1
    if cfg.mode == "llava15":
        keys, projected, pf_vision = 0, n, 0
    else:
        keys = n * hd * hd
        pf_vision = (keys + (n if hd > 1 else 0) + m) if cfg.prefusion_layers else 0
        projected = pf_vision if cfg.prefusion_layers else m
    llm_len = text_tokens + m
    return Workload(
        text_tokens=text_tokens, vision_tokens=m, views=views, patches=n, compressor_keys=keys,
        projected=projected, prefusion_vision=pf_vision,
        prefusion_len=pf_vision + text_tokens + 1 if pf_vision else 0,
        llm_len=llm_len, lm_head_positions=llm_len if lm_head == "all" else 1)


# ----------------------------------------------------------------------------- analytic


def dense_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A (tokens, d_in) x (d_in, d_out) matmul."""
    return 2 * tokens * d_in * d_out


def attention_flops(q_len: int, k_len: int, width: int) -> int:
    """Q K^T plus A V over the full q_len x k_len score matrix; width = heads * head_dim."""
    return 2 * (2 * q_len * k_len * width)


def vit_block_flops(cfg: VisionConfig, seq: int) -> int:
    """One pre-LN CLIP block over `seq` tokens (q, k, v, out projections, MLP, attention)."""
    d = cfg.width
    return dense_flops(seq, d, 4 * d) + dense_flops(seq, d, 2 * cfg.mlp_dim) + attention_flops(seq, seq, d)


def llama_block_flops(cfg: LlamaConfig, seq: int) -> int:
    """One LLaMA block over `seq` tokens (q/k/v/o, gate/up/down, full-square attention)."""
    d, qd, kvd = cfg.width, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    proj = dense_flops(seq, d, qd + 2 * kvd) + dense_flops(seq, qd, d)
    mlp = dense_flops(seq, d, 2 * cfg.mlp_dim) + dense_flops(seq, cfg.mlp_dim, d)
    return proj + mlp + attention_flops(seq, seq, qd)


def vision_flops(cfg: VisionConfig, views: int, blocks: int | None = None) -> int:
    """Patch embedding + `blocks` (default: the built ones) ViT blocks, for `views` images."""
    blocks = cfg.blocks_used if blocks is None else blocks
    patch = dense_flops(cfg.num_patches, cfg.patch_size**2 * 3, cfg.width)
    return views * (patch + blocks * vit_block_flops(cfg, cfg.num_patches + 1))


def projector_flops(cfg: ModelConfig, tokens: int) -> int:
    depth = projector_depth(cfg.projector)
    dv, d = cfg.vision.width, cfg.llm.width
    return dense_flops(tokens, dv, d) + (depth - 1) * dense_flops(tokens, d, d)


def compressor_flops(cfg: ModelConfig, m: int, keys: int) -> int:
    """Query compressor (q/k/v/out projections, attention) or average pooling (a pooling matmul).

    Pooled Matryoshka budgets run all M queries, then pool their outputs to m (a pooling matmul)."""
    if not keys:
        return 0
    dv = cfg.vision.width
    if cfg.compressor.kind == "avgpool":
        return dense_flops(m, keys, dv)
    rows = cfg.compressor.query_rows(m)
    pool = dense_flops(m, rows, dv) if rows != m else 0
    return (dense_flops(rows, dv, dv) + 2 * dense_flops(keys, dv, dv) + attention_flops(rows, keys, dv)
            + dense_flops(rows, dv, dv) + pool)


def analytic_flops(cfg: ModelConfig, w: Workload) -> dict[str, int]:
    """Matmul FLOPs per part and their total (see the module docstring for what is counted)."""
    llm = cfg.llm
    out = {
        "vision": vision_flops(cfg.vision, w.views),
        "projector": projector_flops(cfg, w.projected),
        "compressor": compressor_flops(cfg, w.vision_tokens, w.compressor_keys),
        "prefusion": cfg.prefusion_layers * llama_block_flops(llm, w.prefusion_len) if w.prefusion_len else 0,
        "llm": llm.layers * llama_block_flops(llm, w.llm_len)
        + dense_flops(w.lm_head_positions, llm.width, llm.vocab_size),
    }
    out["total"] = sum(out[p] for p in PARTS)
    return out


def paper_rule_flops(cfg: ModelConfig, w: Workload, vision_blocks: int | None = None) -> int:
    """The paper's rule, 2 x (matmul) params x tokens: no attention scores, LM head over every LLM token."""
    llm, v = cfg.llm, cfg.vision
    blocks = v.layers if vision_blocks is None else vision_blocks
    layer = llama_block_flops(llm, 1) - attention_flops(1, 1, llm.heads * llm.head_dim)  # 2 x params
    vit = vit_block_flops(v, 1) - attention_flops(1, 1, v.width)
    vision = w.views * (v.num_patches * dense_flops(1, v.patch_size**2 * 3, v.width)
                        + blocks * (v.num_patches + 1) * vit)
    comp = compressor_flops(cfg, w.vision_tokens, w.compressor_keys)
    if comp and cfg.compressor.kind == "query":
        comp -= attention_flops(cfg.compressor.query_rows(w.vision_tokens), w.compressor_keys, v.width)
    return (vision + projector_flops(cfg, w.projected) + comp
            + cfg.prefusion_layers * w.prefusion_len * layer
            + w.llm_len * (llm.layers * layer + dense_flops(1, llm.width, llm.vocab_size)))




# ----------------------------------------------------------------------------- train step


def _backward(units: Sequence[int], upstream_trains: bool, part_trains: bool) -> int:
    """Backward FLOPs of consecutive layers: activation grads where a trainable parameter lies upstream
    of the layer, weight grads where the layer itself trains (each one forward's worth of matmuls)."""
    total, upstream = 0, upstream_trains
    for flops in units:
        total += flops * (int(upstream) + int(part_trains))
        upstream = upstream or part_trains
    return total


def _head_positions(cfg: ModelConfig, llm_len: int) -> int:
    """Positions the training LM head runs on: all, or at most `model.loss_positions` (the answers)."""
    return min(cfg.loss_positions, llm_len) if cfg.loss_positions > 0 else llm_len


def _sample_step_flops(cfg: ModelConfig, text_len: int, frames: int, m: int,
                       trainable: frozenset[str]) -> dict[str, int]:
    """Forward + backward matmul FLOPs of one training sample at budget m, per part (frames = 0: text only)."""
    if frames == 0:  # a text-only batch: the LLM over the T text tokens
        units = [llama_block_flops(cfg.llm, text_len)] * cfg.llm.layers + [
            dense_flops(_head_positions(cfg, text_len), cfg.llm.width, cfg.llm.vocab_size)]
        out = {p: 0 for p in PARTS}
        out["llm"] = sum(units) + _backward(units, "llm" in trainable, "llm" in trainable)
        return out
    w = make_workload(cfg, text_len - 1, None if cfg.mode == "llava15" else m)
    v, llm = cfg.vision, cfg.llm
    views = frames * w.views
    vision_units = ([views * dense_flops(v.num_patches, v.patch_size**2 * 3, v.width)]
                    + [views * vit_block_flops(v, v.num_patches + 1)] * v.blocks_used)
    if cfg.mode == "llava15":
        proj_comp, proj_feats = 0, frames * projector_flops(cfg, w.projected)
    else:
        proj_comp = frames * projector_flops(cfg, w.vision_tokens)
        proj_feats = frames * projector_flops(cfg, w.projected - w.vision_tokens)
    comp = frames * compressor_flops(cfg, w.vision_tokens, w.compressor_keys)
    pf_units = [frames * llama_block_flops(llm, w.prefusion_len)] * cfg.prefusion_layers if w.prefusion_len else []
    llm_len = w.llm_len + (frames - 1) * w.vision_tokens
    llm_units = ([llama_block_flops(llm, llm_len)] * llm.layers
                 + [dense_flops(_head_positions(cfg, llm_len), llm.width, llm.vocab_size)])
    t = lambda *parts: any(p in trainable for p in parts)
    fwd = {"vision": sum(vision_units), "compressor": comp, "projector": proj_comp + proj_feats,
           "prefusion": sum(pf_units), "llm": sum(llm_units)}
    bwd = {
        "vision": _backward(vision_units, False, t("vision")),
        "compressor": _backward([comp], t("vision"), t("compressor")),
        "projector": (_backward([proj_comp], t("vision", "compressor"), t("projector"))
                      + _backward([proj_feats], t("vision"), t("projector"))),
        # The pre-fusion text comes from the LLM's (trainable) embedding table.
        "prefusion": _backward(pf_units, t("vision", "compressor", "projector", "llm"), t("prefusion")),
        "llm": _backward(llm_units, t(*PARTS), t("llm")),
    }
    return {p: fwd[p] + bwd[p] for p in PARTS}


def train_step_flops(cfg: ModelConfig, *, batch_size: int, text_len: int, frames: int = 1,
                     trainable: Sequence[str] = PARTS, budgets: Sequence[int] | None = None,
                     all_budgets: bool = False, budget_probs: Sequence[float] | None = None,
                     distill: bool = False, with_largest: bool = False) -> dict[str, float]:
    """Model FLOPs of one optimizer step over a global batch of `batch_size` samples.

    text_len: T of `input_ids` (the `<image>` placeholder included); frames: F
    images / video frames per sample (0: a text-only batch). budgets: the Matryoshka budgets the step
    samples (the expectation over the draw is returned: uniform, or `budget_probs`, one weight per budget;
    with `all_budgets`, every budget trains each step: the sum); None = the default budget.
    distill: a step that draws a budget below the largest also runs the largest budget forward (the
    self-distillation teacher: forward matmuls only, no backward).
    Returns the FLOPs per part and their `total`.
    """
    if text_len < 2 or frames < 0 or batch_size < 1:
        raise ValueError(f"need text_len >= 2, frames >= 0, batch_size >= 1; got {text_len}, {frames}, {batch_size}")
    budgets = [cfg.check_budget(None)] if not budgets or cfg.mode == "llava15" else [int(b) for b in budgets]
    per = [_sample_step_flops(cfg, text_len, frames, m, frozenset(trainable)) for m in budgets]
    if distill and len(budgets) > 1:
        teacher = _sample_step_flops(cfg, text_len, frames, max(budgets), frozenset())  # forward only
        per = [r if m == max(budgets) else {p: r[p] + teacher[p] for p in PARTS} for m, r in zip(budgets, per)]
    if with_largest and len(budgets) > 1:
        top = per[budgets.index(max(budgets))]
        per = [r if m == max(budgets) else {p: r[p] + top[p] for p in PARTS} for m, r in zip(budgets, per)]
    if all_budgets:
        weights = [1.0] * len(per)
    elif budget_probs:
        if len(budget_probs) != len(per):
            raise ValueError(f"budget_probs has {len(budget_probs)} weights for the budgets {budgets}")
        weights = [float(w) / sum(budget_probs) for w in budget_probs]
    else:
        weights = [1.0 / len(per)] * len(per)
    out = {p: batch_size * sum(w * r[p] for w, r in zip(weights, per)) for p in PARTS}
    out["total"] = sum(out[p] for p in PARTS)
    return out


def vision_pretrain_step_flops(cfg: ModelConfig, *, batch_size: int, num_classes: int) -> float:
    """Model FLOPs of one ViT pretraining step (`train.vision_pretrain`): the whole ViT forward and
    backward on `batch_size` images, and linear heads with `num_classes` outputs in all on every patch."""
    v = cfg.vision
    units = ([dense_flops(v.num_patches, v.patch_size**2 * 3, v.width)]
             + [vit_block_flops(v, v.num_patches + 1)] * v.blocks_used
             + [dense_flops(v.num_patches, v.width, num_classes)])
    return float(batch_size * (sum(units) + _backward(units, False, True)))
