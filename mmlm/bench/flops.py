"""`mmlm bench flops`: FLOPs per part for ONE image-question, analytic and XLA.

Parts: vision (CLIP tower), projector, compressor, prefusion, llm. Both counts
describe the prefill of one image-question (batch 1, one image, ``t`` text
tokens) up to the logits, i.e. the compute before the first generated token.

**Analytic count** (FLOPs = 2 x multiply-adds), matmuls only:

* every dense layer: ``2 * tokens * d_in * d_out`` (biases, norms, activations,
  RoPE, softmax, residual adds and other elementwise work are NOT counted);
* attention scores ``Q K^T`` and ``A V``: ``2 * q_len * k_len * heads *
  head_dim`` each, over the FULL square (``q_len = k_len = S``), both in the
  bidirectional ViT and in the causal LLaMA blocks: mmlm's XLA attention
  computes every score and masks afterwards, so that is the work done (a
  causal-aware kernel would do about half of the causal part);
* the patch-embedding convolution: ``2 * patches * (p * p * 3) * Dv``;
* the compressor: query projection (m queries), key and value projections of
  every patch, scores and ``A V`` over ``m x N_keys``, output projection;
* the LM head over every LLM position by default (``--lm_head all``, what the
  model's forward computes and what the paper's "2 x params x tokens" rule
  implies); ``--lm_head last`` counts only the position that predicts the
  first answer token;
* the token-embedding lookup is a gather, not a matmul: 0 FLOPs.

The vision tower is counted as mmlm builds it: ``vision.blocks_used`` blocks
(23 of CLIP ViT-L's 24: the features are the output of block 23, so block 24
and the post-LayerNorm never run). The full-tower figure is reported under
``assumptions`` for comparison with papers that count all 24 blocks.

**XLA count**: each part is lowered on its own with abstract inputs and
abstract parameters (``jax.eval_shape`` of the module's init, nothing is
allocated), compiled, and ``compiled.cost_analysis()["flops"]`` is read. XLA
also counts elementwise work (norms, softmax, activations, RoPE, masks, and on
CPU the fp32 converts of bf16 matmul operands, weights included): that is the
systematic excess of ``xla`` over ``analytic``; it shrinks as widths grow
(0.3-1.8% for the bf16 7B configs, ~0 with fp32 compute). ``xla_matmul`` sums
only the dot and convolution instructions of the same compiled programs and
equals the analytic count. A scanned layer stack (``model.scan_layers=True``)
compiles to a while loop whose body XLA's cost analysis counts once; when
that is detected (a one-off calibration on a tiny scan), ``(layers - 1)``
times the cost of one separately compiled block is added, so scanned and
unrolled (``--config.model.scan_layers=False``) programs give the same
numbers. The whole-model forward (``LlavaMini`` up to the logits) is also
compiled as a cross-check of the sum of the parts (``xla_whole_model``).

**Text length.** ``--text_tokens`` (default ``DEFAULT_TEXT_TOKENS`` = 43)
counts the instruction's text tokens, not the ``<image>`` placeholder. The
default is derived from the paper's Table 14 (LLaVA-Mini, arXiv 2501.03895),
whose totals follow "2 x params x tokens" (``paper_rule_flops``): matmul
parameters only (every layer and the LM head; the embedding table is a
lookup), the full 24-block CLIP tower over 577 tokens, no attention scores.
That rule is linear in ``t``; solving it for the ``t`` that hits each
trustworthy figure gives LLaVA-1.5 8.55 T: 42.8; LLaVA-Mini 0/1/2/4
pre-fusion layers 0.96/1.21/1.46/1.96 T: 45.0/43.1/43.0/42.8. Their mean,
43.3, rounded, is the one length used for every row. (E.g. the 0-layer row:
0.96 T - 0.35 T of vision = 2 x 6.61 B x (1 + t), t = 45; the per-layer step
0.25 T = 2 x 0.2024 B x (576 + 1 + t + 1), t = 40.) With it, the paper rule
reproduces the table to 0.3% (0-layer row: -2.8%), and mmlm's analytic count,
which adds the attention scores, is within -1%..+3% (``experiments/efficiency``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmlm.config_utils import load_config
from mmlm.configs import resolve_config_path
from mmlm.models.compressor import make_compressor
from mmlm.models.config import ModelConfig, model_config_from_dict
from mmlm.models.flops import (  # noqa: F401 - the analytic count, re-exported for callers of this module
    LM_HEAD_CHOICES, PARTS, Workload, analytic_flops, attention_flops, compressor_flops, dense_flops,
    llama_block_flops, make_workload, paper_rule_flops, projector_flops, vision_flops, vit_block_flops)
from mmlm.models.llama import LlamaBlock, LlamaModel
from mmlm.models.llava_mini import LlavaMini
from mmlm.models.prefusion import PreFusion
from mmlm.models.projector import Projector
from mmlm.models.summary import abstract_params, dummy_batch, split_static
from mmlm.models.vit import VisionTower, VitBlock

DEFAULT_TEXT_TOKENS = 43


# ----------------------------------------------------------------------------- XLA


@dataclasses.dataclass
class Program:
    """A function to compile and its abstract arguments."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float  # cost_analysis()["flops"]
    matmul: float  # dot + convolution FLOPs of the compiled HLO

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.matmul + other.matmul)

    def scale(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.matmul * k)


ZERO = Cost(0.0, 0.0)


def _sds(shape: Sequence[int], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def module_program(module: nn.Module, *args, method: Callable | str | None = None, **kwargs) -> Program:
    """`module.apply({'params': p}, *args)` as a Program with abstract params (non-array args static)."""
    params = abstract_params(module, *args, method=method, **kwargs)
    dynamic, rebuild = split_static(args)
    fn = lambda p, *a: module.apply({"params": p}, *rebuild(a), method=method, **kwargs)
    return Program(fn, (params,) + tuple(args[i] for i in dynamic))


_SHAPE_RE = re.compile(r"\b(?:pred|[sfu]\d+|bf16|f8\w*|c64|c128)\[([\d,]*)\]")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+(dot|convolution|[\w\-]+)\((.*)$")


def _dims(shape_text: str) -> list[int]:
    return [int(d) for d in shape_text.split(",") if d]


def hlo_matmul_flops(hlo_text: str) -> float:
    """2 x multiply-adds of every `dot` and `convolution` in an HLO module's text (each counted once).

    Operand shapes are looked up from the instructions defining them (HLO
    instruction names are unique in a module).
    """
    shapes: dict[str, list[int]] = {}
    pending: list[tuple[str, list[int], str]] = []
    for line in hlo_text.splitlines():
        match = _INSTR_RE.match(line)
        if not match:
            continue
        name, type_text, op, rest = match.groups()
        shape = _SHAPE_RE.search(type_text)
        if shape and not type_text.startswith("("):
            shapes[name] = _dims(shape.group(1))
        if op in ("dot", "convolution"):
            pending.append((op, _dims(shape.group(1)) if shape else [], rest))
    total = 0.0
    for op, out, rest in pending:
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        lhs, rhs = (shapes.get(o) for o in operands[:2])
        if op == "dot":
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            ok = contracting is not None and lhs is not None
            k = math.prod(lhs[i] for i in _dims(contracting.group(1))) if ok else 0
        else:  # convolution: multiply-adds per output element = kernel volume / output features
            labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
            ok = labels is not None and rhs is not None
            k = math.prod(rhs) // rhs[labels.group(1).index("o")] if ok else 0
        if not ok or not out:
            raise ValueError(f"cannot read the shapes of an HLO {op}: {rest[:200]}")
        total += 2.0 * math.prod(out) * k
    return total


def compile_cost(program: Program) -> Cost:
    """Compiles `program` (abstract shapes only) and reads its cost."""
    compiled = jax.jit(program.fn).lower(*program.args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device
        analysis = analysis[0]
    return Cost(float(analysis.get("flops", 0.0)), hlo_matmul_flops(compiled.as_text()))


@functools.lru_cache(maxsize=None)
def scan_body_counted_once() -> bool:
    """Whether XLA's cost analysis counts a while-loop (scan) body once instead of per iteration.

    Calibrated on a 4-step scan of a matmul against the unrolled loop.
    """
    x = _sds((8, 8), jnp.float32)
    w = _sds((4, 8, 8), jnp.float32)

    def scanned(x, w):
        return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]

    def unrolled(x, w):
        for i in range(4):
            x = x @ w[i]
        return x

    s = compile_cost(Program(scanned, (x, w))).flops
    u = compile_cost(Program(unrolled, (x, w))).flops
    return s < 0.5 * u


@dataclasses.dataclass(frozen=True)
class Stack:
    """A scanned stack inside a program: `layers` copies of one `kind` block ("vit" or "llama")."""

    kind: str
    rows: int  # views (ViT: batch of images) or sequence length (LLaMA, batch 1)
    layers: int


def _llama_block_program(cfg: ModelConfig, seq: int) -> Program:
    """One LLaMA block (LLM or pre-fusion) on a sequence of `seq` tokens (batch 1)."""
    block = LlamaBlock(cfg.llm, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    x = _sds((1, seq, cfg.llm.width), cfg.compute_dtype)
    return module_program(block, x, None, _sds((1, seq), jnp.int32), None, _sds((1, seq), jnp.bool_))


def _vit_block_program(cfg: ModelConfig, views: int) -> Program:
    """One CLIP block on `views` images of N + 1 tokens."""
    block = VitBlock(cfg.vision, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    x = _sds((views, cfg.vision.num_patches + 1, cfg.vision.width), cfg.compute_dtype)
    return module_program(block, x, None)


@functools.lru_cache(maxsize=64)
def block_cost(cfg: ModelConfig, kind: str, rows: int) -> Cost:
    """Cost of one separately compiled block (cached: parts and the whole model share them)."""
    program = _vit_block_program(cfg, rows) if kind == "vit" else _llama_block_program(cfg, rows)
    return compile_cost(program)


def stack_correction(cfg: ModelConfig, stack: Stack) -> Cost:
    """Cost to add to a program holding `stack`: (layers - 1) blocks if XLA counted a scanned body once."""
    if not cfg.scan_layers or stack.layers <= 1 or not scan_body_counted_once():
        return ZERO
    return block_cost(cfg, stack.kind, stack.rows).scale(stack.layers - 1)


def _llm_forward(module: LlamaModel, embeds, positions, valid, last_only: bool):
    hidden, _ = module(embeds, positions, valid, return_hidden=True)
    if last_only:
        hidden = hidden[:, -1:]
    return module.logits(hidden).astype(jnp.float32)


def part_programs(cfg: ModelConfig, w: Workload) -> dict[str, tuple[Program, list[Stack]]]:
    """Per part: its Program and the layer stacks it contains."""
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    stack = dict(scan_layers=cfg.scan_layers, remat=cfg.remat_policy)
    v, llm = cfg.vision, cfg.llm
    out: dict[str, tuple[Program, list[Stack]]] = {}
    images = _sds((w.views, cfg.image_size, cfg.image_size, 3), jnp.float32)
    out["vision"] = (module_program(VisionTower(v, **kw, **stack), images),
                     [Stack("vit", w.views, v.blocks_used)])
    feats = lambda n: _sds((1, n, v.width), cfg.compute_dtype)
    out["projector"] = (module_program(Projector(cfg.projector, llm.width, **kw), feats(w.projected)), [])
    if w.compressor_keys:
        comp = make_compressor(cfg.compressor, cfg.compute_dtype, cfg.params_dtype)
        out["compressor"] = (module_program(comp, feats(w.compressor_keys), w.vision_tokens), [])
    if w.prefusion_len:
        text = w.prefusion_len - w.prefusion_vision
        pf = PreFusion(llm, cfg.prefusion_layers, **kw, **stack)
        prog = module_program(pf, _sds((1, w.prefusion_vision, llm.width), cfg.compute_dtype),
                              _sds((1, text, llm.width), cfg.compute_dtype), _sds((1, text), jnp.bool_))
        out["prefusion"] = (prog, [Stack("llama", w.prefusion_len, cfg.prefusion_layers)])
    model = LlamaModel(llm, **kw, scan_layers=cfg.scan_layers, remat=cfg.remat_policy)
    seq = w.llm_len
    prog = module_program(model, _sds((1, seq, llm.width), cfg.compute_dtype), _sds((1, seq), jnp.int32),
                          _sds((1, seq), jnp.bool_), method=_llm_forward,
                          last_only=w.lm_head_positions == 1 and seq > 1)
    out["llm"] = (prog, [Stack("llama", seq, llm.layers)])
    return out


def program_cost(cfg: ModelConfig, program: Program, stacks: Sequence[Stack]) -> Cost:
    """Compiled cost of `program`, corrected for the scanned stacks it contains."""
    cost = compile_cost(program)
    for stack in stacks:
        cost = cost + stack_correction(cfg, stack)
    return cost


def xla_flops(cfg: ModelConfig, w: Workload) -> tuple[dict[str, float], dict[str, float]]:
    """(cost_analysis FLOPs, dot+conv FLOPs) per part and total, scan-corrected."""
    programs = part_programs(cfg, w)
    costs = {p: program_cost(cfg, *programs[p]) if p in programs else ZERO for p in PARTS}
    flops = {p: costs[p].flops for p in PARTS}
    matmul = {p: costs[p].matmul for p in PARTS}
    flops["total"], matmul["total"] = sum(flops.values()), sum(matmul.values())
    return flops, matmul


def whole_forward(module: LlavaMini, batch, num_vision_tokens: int, last_only: bool):
    """LlavaMini up to the logits (all positions, or only the last: the prefill before the first token)."""
    inputs = module.build_llm_inputs(batch, num_vision_tokens)
    hidden, _ = module.llm(inputs["embeds"], inputs["positions"], inputs["valid"], return_hidden=True)
    if last_only:
        hidden = hidden[:, -1:]
    return module.llm.logits(hidden).astype(jnp.float32)


def whole_model_cost(cfg: ModelConfig, w: Workload) -> Cost:
    """The whole LlavaMini forward up to the logits, compiled as one program (scan-corrected).

    Compiled with one block per loop iteration whatever `model.scan_unroll` says, as the parts are, so
    that the scan correction (XLA counts a loop body once) applies to both alike.
    """
    cfg = dataclasses.replace(cfg, scan_unroll=1)
    model = LlavaMini(cfg)
    batch = dummy_batch(cfg, batch=1, text_len=w.text_tokens + 1)
    last_only = w.lm_head_positions == 1 and w.llm_len > 1
    stacks = [Stack("vit", w.views, cfg.vision.blocks_used), Stack("llama", w.llm_len, cfg.llm.layers)]
    if w.prefusion_len:
        stacks.append(Stack("llama", w.prefusion_len, cfg.prefusion_layers))
    return program_cost(cfg, module_program(model, batch, w.vision_tokens, last_only, method=whole_forward), stacks)


# ----------------------------------------------------------------------------- report


def assumptions(cfg: ModelConfig, w: Workload) -> dict[str, Any]:
    """What the counts include, in words and numbers."""
    full = vision_flops(cfg.vision, w.views, cfg.vision.layers)
    return {
        "text_tokens": f"{w.text_tokens} instruction text tokens (the <image> placeholder not included); "
                       f"default {DEFAULT_TEXT_TOKENS}, derived from the paper's Table 14 (see --help)",
        "counted": "2 x multiply-adds of every matmul: dense layers, attention QK^T and AV over the full "
                   "S x S square (computed then masked), patch-embedding conv; norms, softmax, activations, "
                   "RoPE, biases and residual adds are not counted analytically (XLA counts them)",
        "lm_head": f"LM head applied to {w.lm_head_positions} of {w.llm_len} LLM positions",
        "vision_blocks": f"{cfg.vision.blocks_used} of {cfg.vision.layers} CLIP blocks (the ones mmlm builds); "
                         f"the full tower would be {full:.4g} FLOPs for vision",
        "vision_full_tower_flops": full,
        "scan_correction": bool(cfg.scan_layers and scan_body_counted_once()),
        "sequence": dataclasses.asdict(w),
        "paper_rule_total": paper_rule_flops(cfg, w),
    }


def flops_report(cfg: ModelConfig, text_tokens: int = DEFAULT_TEXT_TOKENS, num_vision_tokens: int | None = None,
                 lm_head: str = "all", xla: bool = True, whole_model: bool = True) -> dict[str, Any]:
    """The JSON report: analytic and XLA FLOPs per part (values in FLOPs)."""
    w = make_workload(cfg, text_tokens, num_vision_tokens, lm_head)
    report: dict[str, Any] = {"text_tokens": text_tokens, "num_vision_tokens": w.vision_tokens,
                              "analytic": analytic_flops(cfg, w)}
    if xla:
        report["xla"], report["xla_matmul"] = xla_flops(cfg, w)
        if whole_model:
            whole = whole_model_cost(cfg, w)
            report["xla_whole_model"] = {"flops": whole.flops, "matmul": whole.matmul}
    report["assumptions"] = assumptions(cfg, w)
    return report


def load_model_config(name: str, overrides: Sequence[str] = ()) -> ModelConfig:
    return model_config_from_dict(load_config(resolve_config_path(name), overrides).model)
