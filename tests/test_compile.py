"""`mmlm compile`: slice names, the train-step FLOPs count, and (with libtpu) real TPU compiles.

The tests that compile for a TPU topology run only where libtpu is installed
(`pip install mmlm[tpu]`, as .ci/run does); they need no TPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several test processes may load libtpu

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmlm.accelerators import GIB
from mmlm.bench import compile as C
from mmlm.cli import compile as compile_cli
from mmlm.config_utils import load_config
from mmlm.errors import UserError
from mmlm.models import flops as MF
from mmlm.models.config import model_config_from_dict
from mmlm.models.summary import dummy_batch
from mmlm.train import metrics

REPORT_KEYS = ("topology", "chips", "hbm_bytes_per_chip", "per_chip_bytes", "fits", "hbm_fraction",
               "model_flops_per_step", "estimated_step_seconds", "estimator", "projected_mfu", "compile_seconds",
               "collective_bytes")


# ----------------------------------------------------------------------------- slice names


@pytest.mark.parametrize("name,chips,topology", [
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-64", 32, "v5p:2x4x4"), ("v5p-128", 64, "v5p:4x4x4"),
    ("v4-32", 16, "v4:2x2x4"), ("v5litepod-16", 16, "v5e:4x4"), ("v5e-8", 8, "v5e:2x4"),
    ("v5litepod-1", 1, "v5e:1x1"), ("v6e-16", 16, "v6e:4x4"), ("v6e-64", 64, "v6e:8x8"),
])
def test_slice_names(name, chips, topology):
    s = C.parse_topology(name)
    assert (s.chips, s.topology) == (chips, topology)
    assert s.hbm_bytes == int(C.TPU_GENERATIONS[s.generation].hbm_gib * GIB)


@pytest.mark.parametrize("name,match", [("v7x-8", "unknown TPU generation"), ("tpu-8", "not a Cloud TPU"),
                                        ("v5p-6", "power of two"), ("v5p-4", "count TensorCores"),
                                        ("v5litepod-2", "power of two")])
def test_bad_slice_names(name, match):
    with pytest.raises(UserError, match=match):
        C.parse_topology(name)


def test_missing_libtpu_is_a_user_error(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    with pytest.raises(UserError, match=r"pip install 'mmlm\[tpu\]'"):
        C.require_libtpu()
    assert compile_cli.main(["--config", "tiny", "--topology", "v5p-8"]) == 2
    assert "mmlm[tpu]" in capsys.readouterr().err


def test_unknown_topology_exits_2(capsys):
    assert compile_cli.main(["--config", "tiny", "--topology", "v9-8"]) == 2
    assert "unknown TPU generation" in capsys.readouterr().err


# ----------------------------------------------------------------------------- train-step FLOPs


def _cfg(*overrides):
    return model_config_from_dict(load_config("configs/tiny.py", list(overrides)).model)


def test_train_step_flops_forward_matches_bench_count():
    cfg = _cfg()
    t = 20
    fwd = MF.analytic_flops(cfg, MF.make_workload(cfg, t - 1, 4))["total"]
    got = MF.train_step_flops(cfg, batch_size=3, text_len=t, trainable=(), budgets=(4,))
    assert got["total"] == 3 * fwd


def test_train_step_flops_backward_follows_what_trains():
    cfg = _cfg()
    t, m = 20, 4
    fwd = MF.analytic_flops(cfg, MF.make_workload(cfg, t - 1, m))
    llm_only = MF.train_step_flops(cfg, batch_size=1, text_len=t, trainable=("llm",), budgets=(m,))
    # LLM: forward + activation grads (its embedding table trains) + weight grads; pre-fusion reads the
    # trainable embeddings, so it needs activation grads; vision, compressor, projector only run forward.
    assert llm_only["llm"] == 3 * fwd["llm"]
    assert llm_only["prefusion"] == 2 * fwd["prefusion"]
    for part in ("vision", "compressor", "projector"):
        assert llm_only[part] == fwd[part]
    stage1 = MF.train_step_flops(cfg, batch_size=1, text_len=t, trainable=("projector",), budgets=(m,))
    assert stage1["llm"] == 2 * fwd["llm"] and stage1["prefusion"] == 2 * fwd["prefusion"]
    assert fwd["projector"] < stage1["projector"] <= 3 * fwd["projector"]


def test_train_step_flops_counts_every_layer_budget_and_frame():
    cfg = _cfg()
    deeper = _cfg("--config.model.llm.layers=4")
    a = MF.train_step_flops(cfg, batch_size=2, text_len=16, budgets=(1,))
    b = MF.train_step_flops(deeper, batch_size=2, text_len=16, budgets=(1,))
    block = MF.llama_block_flops(cfg.llm, 16 - 1 + 1)
    assert b["llm"] - a["llm"] == 2 * 2 * 3 * block  # two more layers, batch 2, fwd + 2 x bwd
    mean = MF.train_step_flops(cfg, batch_size=2, text_len=16, budgets=(1, 4))["total"]
    ends = [MF.train_step_flops(cfg, batch_size=2, text_len=16, budgets=(m,))["total"] for m in (1, 4)]
    assert mean == pytest.approx(sum(ends) / 2)
    one = MF.train_step_flops(cfg, batch_size=1, text_len=16, frames=1, budgets=(1,))
    four = MF.train_step_flops(cfg, batch_size=1, text_len=16, frames=4, budgets=(1,))
    assert four["vision"] == 4 * one["vision"] and four["llm"] > one["llm"]


def test_train_step_flops_lm_head_on_the_supervised_positions_only():
    """`model.loss_positions`: the head's forward + 2 x backward run on that many positions, not all L."""
    full, head8 = _cfg(), _cfg("--config.model.loss_positions=8")
    t, m = 20, 1
    length = MF.make_workload(full, t - 1, m).llm_len
    a = MF.train_step_flops(full, batch_size=2, text_len=t, budgets=(m,))
    b = MF.train_step_flops(head8, batch_size=2, text_len=t, budgets=(m,))
    head = lambda n: MF.dense_flops(n, full.llm.width, full.llm.vocab_size)
    assert a["llm"] - b["llm"] == 2 * 3 * (head(length) - head(8))
    assert all(a[p] == b[p] for p in MF.PARTS if p != "llm")


def test_trainer_mfu_flops_are_analytic_and_scan_independent():
    """The trainer's MFU numerator: the analytic count, equal for scanned and unrolled layers."""
    scanned, unrolled = _cfg(), _cfg("--config.model.scan_layers=False")
    batch = dummy_batch(scanned, batch=8, text_len=32, abstract=False)
    parts, budgets = ("projector", "compressor", "prefusion", "llm"), (1, 4)
    got = metrics.model_flops_per_step(scanned, batch, parts, budgets)
    assert got == metrics.model_flops_per_step(unrolled, batch, parts, budgets)
    assert got == MF.train_step_flops(scanned, batch_size=8, text_len=32, frames=1, trainable=parts,
                                      budgets=budgets)["total"]
    text = {k: v for k, v in batch.items() if k not in ("images", "frame_mask")}
    only_text = metrics.model_flops_per_step(scanned, text, ("llm",), (1,))
    assert only_text == MF.train_step_flops(scanned, batch_size=8, text_len=32, frames=0, trainable=("llm",))["total"]


# ----------------------------------------------------------------------------- with libtpu

needs_libtpu = pytest.mark.skipif(C.importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install mmlm[tpu])")


def _one_chip(name: str = "v5litepod-1"):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    dev = C.topology_devices(C.parse_topology(name))[0]
    return NamedSharding(Mesh(np.array([dev]), ("x",)), P())


@needs_libtpu
def test_roofline_agrees_with_optimal_seconds():
    """Where XLA gives a step-time estimate (no loops), the roofline is within 30% of it; a scan's
    roofline matches XLA's estimate of the same layers unrolled (XLA's own counts the body once)."""
    sh = _one_chip()
    s = C.parse_topology("v5litepod-1")
    sds = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)

    def scanned(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    def unrolled(x, w):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return x

    programs = {"matmul": (lambda a, b: a @ b, (sds((4096, 4096)), sds((4096, 4096)))),
                "elementwise": (lambda x: jnp.sin(x) * 2 + 1, (sds((4096, 4096), jnp.float32),))}
    for name, (fn, args) in programs.items():
        compiled = jax.jit(fn).lower(*args).compile()
        optimal = compiled.cost_analysis()["optimal_seconds"]
        est = C.step_time(compiled, s, 1.0)
        assert optimal > 0 and est["estimator"] == "optimal_seconds", name
        assert 0.7 < est["roofline"]["seconds"] / optimal < 1.3, (name, est["roofline"]["seconds"], optimal)
    x, w = sds((4096, 4096)), sds((4, 4096, 4096))
    scan = jax.jit(scanned).lower(x, w).compile()
    flat = jax.jit(unrolled).lower(x, w).compile()
    est = C.step_time(scan, s, 1.0)
    assert est["estimator"] == "roofline" and est["roofline"]["unknown_trip_counts"] == 0
    assert est["roofline"]["flops"] == pytest.approx(4 * 2 * 4096**3)
    assert 0.7 < est["estimated_step_seconds"] / flat.cost_analysis()["optimal_seconds"] < 1.3
    assert scan.cost_analysis()["optimal_seconds"] < 0.5 * flat.cost_analysis()["optimal_seconds"]


@needs_libtpu
def test_pallas_compressor_compiles_for_tpu_with_cost_estimate():
    """The fused kernel compiles with Mosaic (forward and backward) for a v5e chip at N = 576 patches,
    with no padding copy of the features and its CostEstimate visible to the cost analysis."""
    from mmlm.kernels.compression import pallas_compress_attention

    sh = _one_chip()
    b, n, dv, m = 4, 576, 256, 16
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sh)
    args = (s(b, n, dv), s(m, dv), s(dv), s(dv), s(dv, dv), s(dv), s(dv, dv), s(dv), s(n, dv))
    fwd = lambda *a: pallas_compress_attention(*a, num_heads=2, target="tpu", interpret=False)
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=tuple(range(8)))
    for fn in (fwd, grad):
        compiled = jax.jit(fn).lower(*args).compile()
        text = compiled.as_text()
        assert "tpu_custom_call" in text and '"cost_estimate"' in text
        assert " pad(" not in text  # block_n = 288 divides 576
        assert compiled.cost_analysis()["flops"] >= 2 * 2 * b * n * dv * dv  # at least the K, V projections


@needs_libtpu
def test_compile_tiny_train_step_json():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = compile_cli.main(["--config", "tiny", "--topology", "v5litepod-4", "--json"])
    assert rc == 0
    r = json.loads(out.getvalue())
    for key in REPORT_KEYS:
        assert key in r, key
    assert r["topology"] == "v5litepod-4" and r["chips"] == 4 and r["hbm_bytes_per_chip"] == 16 * GIB
    pb = r["per_chip_bytes"]
    assert all(pb[k] > 0 for k in ("arguments", "temporaries", "outputs", "total"))
    assert pb["total"] == pb["arguments"] + pb["temporaries"] + pb["outputs"] - pb["aliased"]
    assert r["fits"] is True and 0 < r["hbm_fraction"] < 0.05
    config = load_config("configs/tiny.py")
    cfg = model_config_from_dict(config.model)
    assert r["model_flops_per_step"] == MF.train_step_flops(
        cfg, batch_size=8, text_len=32, trainable=tuple(config.train.trainable), budgets=(1, 4))["total"]
    assert r["estimator"] in ("optimal_seconds", "roofline") and r["estimated_step_seconds"] > 0
    assert r["projected_mfu"] == pytest.approx(
        r["model_flops_per_step"] / (r["estimated_step_seconds"] * 4 * 197e12))
    assert set(r["collective_bytes"]) == {"all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                          "collective-permute"}
    assert r["collective_bytes"]["all-reduce"] > 0  # data parallel: gradients are summed over 4 chips
    assert r["roofline"]["pallas_calls"] > 0 and r["roofline"]["pallas_calls_without_estimate"] == 0
    assert r["compile_seconds"] > 0


# ----------------------------------------------------------------------------- roofline parser (no libtpu)

_HLO = """HloModule m

%body (p: (s32[], f32[64,128], bf16[4,128,128])) -> (s32[], f32[64,128], bf16[4,128,128]) {
  %p = (s32[], f32[64,128]{1,0}, bf16[4,128,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,128]{1,0} get-tuple-element(%p), index=1
  %w = bf16[4,128,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%p), index=2
  %slice = bf16[128,128]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_comp
  %ag = bf16[128,128]{1,0} all-gather(%slice), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %mm = f32[64,128]{1,0} fusion(%x, %ag), kind=kOutput, calls=%mm_comp
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64,128]{1,0}, bf16[4,128,128]{2,1,0}) tuple(%next, %mm, %w)
}

%cond (q: (s32[], f32[64,128], bf16[4,128,128])) -> pred[] {
  %q = (s32[], f32[64,128]{1,0}, bf16[4,128,128]{2,1,0}) parameter(0)
  %c = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%c, %n), direction=LT
}

%slice_comp (a: bf16[4,128,128], b: s32[]) -> bf16[128,128] {
  %a = bf16[4,128,128]{2,1,0} parameter(0)
  %b = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[1,128,128]{2,1,0} dynamic-slice(%a, %b, %z, %z), dynamic_slice_sizes={1,128,128}
  ROOT %r = bf16[128,128]{1,0} bitcast(%ds)
}

%mm_comp (u: f32[64,128], v: bf16[128,128]) -> f32[64,128] {
  %u = f32[64,128]{1,0} parameter(0)
  %v = bf16[128,128]{1,0} parameter(1)
  %cv = f32[128,128]{1,0} convert(%v)
  ROOT %d = f32[64,128]{1,0} dot(%u, %cv), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x0: f32[64,128], w0: bf16[4,128,128]) -> f32[64,128] {
  %x0 = f32[64,128]{1,0} parameter(0)
  %w0 = bf16[4,128,128]{2,1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,128]{1,0}, bf16[4,128,128]{2,1,0}) tuple(%zero, %x0, %w0)
  %loop = (s32[], f32[64,128]{1,0}, bf16[4,128,128]{2,1,0}) while(%init), condition=%cond, body=%body
  %res = f32[64,128]{1,0} get-tuple-element(%loop), index=1
  %lhs = f32[2,2,8,2,1]{4,3,2,1,0} parameter(2)
  %rhs = f32[2,52,2,2,8]{4,3,2,1,0} parameter(3)
  %bmm = f32[2,2,52,52,2]{4,3,2,1,0} convolution(%lhs, %rhs), window={size=2x2x2 pad=0_0x0_0x1_1 lhs_dilate=2x2x1}, dim_labels=0b1f2_0o12i->01bf2
  %ss = ((bf16[4,128,128]{2,1,0}), bf16[1,128,128]{2,1,0:S(1)}, s32[]{:S(2)}) slice-start(%w0), slice={[1:2], [0:128], [0:128]}
  %sd = bf16[1,128,128]{2,1,0:S(1)} slice-done(%ss)
  %cb = bf16[1,128,128]{2,1,0:S(1)} custom-call(%sd), custom_call_target="ConcatBitcast"
  ROOT %ar = f32[64,128]{1,0} all-reduce(%res), channel_id=2, replica_groups=[1,4]<=[4], to_apply=%add
}
"""


def test_roofline_reads_loops_slices_collectives_and_batched_convolutions():
    from mmlm.bench.roofline import Chip, roofline

    chip = Chip(peak_flops=1e12, hbm_bytes_per_s=1e9, ici_bytes_per_s=1e8)
    r = roofline(_HLO, chip)
    assert r["unknown_trip_counts"] == 0
    dot = 2 * 64 * 128 * 128
    bmm = 2 * (2 * 2 * 52 * 52 * 2) * 8  # a dot over the 8 input features per output, not the 2x2x2 window
    assert r["flops"] == 4 * dot + bmm
    # The scan reads one (128, 128) bf16 layer per iteration, not the whole (4, 128, 128) stack.
    slice_bytes = 2 * 128 * 128 * 2  # read the slice, write it
    mm_bytes = 64 * 128 * 4 + 128 * 128 * 2 + 64 * 128 * 4
    bmm_bytes = 4 * (2 * 2 * 8 * 2 + 2 * 52 * 2 * 2 * 8 + 2 * 2 * 52 * 52 * 2)
    scalars = 4 + 3 * 4  # the slice index read by the slice fusion; the counter's add
    # The asynchronous static slice (a weight chunk streamed on chip) reads its slice once, not the stack;
    # joining chunks in place on chip (ConcatBitcast) is free.
    assert r["bytes"] == 4 * (slice_bytes + mm_bytes + scalars) + bmm_bytes + slice_bytes // 2
    assert r["collective_bytes"]["all-gather"] == 4 * 128 * 128 * 2
    assert r["collective_bytes"]["all-reduce"] == 64 * 128 * 4
    assert r["collective_seconds"] == pytest.approx((4 * 128 * 128 * 2 + 2 * 64 * 128 * 4) / 1e8)
    assert r["seconds"] == max(r["compute_memory_seconds"], r["collective_seconds"])


_HLO_TAGGED = """HloModule m

ENTRY %main (q: bf16[2,4,256,32], k: bf16[2,4,256,32]) -> bf16[2,4,256,32] {
  %q = bf16[2,4,256,32]{3,2,1,0} parameter(0)
  %k = bf16[2,4,256,32]{3,2,1,0} parameter(1)
  %splash_mqa_fwd_segmented.1 = bf16[2,4,256,32]{3,2,1,0} custom-call(%q, %k), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "abc", "xprof_metadata":"{\\"block_q\\": 256,
\\"block_kv\\": 256}"
}}, metadata={op_name="jit(f)/mmlm_pallas_flops_fwd_1000_dq_1500_dkv_2000/splash"}
  %after = bf16[2,4,256,32]{3,2,1,0} add(%splash_mqa_fwd_segmented.1, %q)
  ROOT %ar = bf16[2,4,256,32]{3,2,1,0} all-reduce(%after), channel_id=2, replica_groups=[1,4]<=[4], to_apply=%add
}
"""


def test_roofline_joins_multiline_kernel_configs_and_reads_tagged_kernel_flops():
    """A splash kernel's backend_config spans lines (its continuation starts with "}}"): the rest of the
    computation is still read, and the kernel's FLOPs come from the scope tag of mmlm.kernels.attention."""
    from mmlm.bench.roofline import Chip, roofline

    r = roofline(_HLO_TAGGED, Chip(peak_flops=1e12, hbm_bytes_per_s=1e9, ici_bytes_per_s=1e8))
    assert r["flops"] == 1000
    assert r["pallas_calls"] == 1 and r["pallas_calls_without_estimate"] == 0
    assert r["collective_bytes"]["all-reduce"] == 2 * 4 * 256 * 32 * 2  # the instruction after the kernel


@needs_libtpu
def test_compile_inference_json_for_one_chip():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = compile_cli.main(["--config", "tiny", "--topology", "v5litepod-1", "--what", "infer", "--json", "--new_tokens", "8"])
    assert rc == 0
    r = json.loads(out.getvalue())
    assert r["what"] == "infer" and r["chips_used"] == 1 and r["fits"] is True
    mini, base = r["models"]
    assert (mini["mode"], base["mode"]) == ("llava_mini", "llava15")
    assert base["llm_prompt_tokens"] - mini["llm_prompt_tokens"] == base["vision_tokens_per_image"] - \
        mini["vision_tokens_per_image"]
    for m in r["models"]:
        assert m["serving_bytes"] >= m["params_bytes"] > 0
        assert m["prefill"]["seconds"] > 0 and m["decode_step"]["seconds"] > 0
