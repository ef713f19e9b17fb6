"""Fused compression attention (LLaVA-Mini compressor core) in Pallas.

The compressor attends ``m`` (1 <= m <= M) learned queries over the ``N``
patch features of every image / video frame. Per batch element ``b``::

    xn  = LayerNorm(x[b])                      # (N, Dv), fp32, biased variance
    k   = (xn + pe_k) @ wk + bk                # (N, Dv)
    v   = xn @ wv + bv                         # (N, Dv)
    out = MHA(q, k, v, heads=H)                # (m, Dv), heads concatenated

``q`` arrives already projected (the caller applies LN_q, PE_q, wq, bq) and
the output projection is the caller's too.

The XLA path materialises ``k`` and ``v`` for every patch: 2 x B x N x Dv
values in HBM (for 64 video frames of 576 patches at Dv=1024 in bf16, 150 MB)
to produce only B x m x Dv outputs. The Pallas path fuses LayerNorm, the K/V
projections and a flash-attention style online softmax into one pass over
``x`` in blocks of ``block_n`` patches, so ``k``/``v`` only ever exist one
block at a time in on-chip memory. The backward pass is a second Pallas
kernel that recomputes LN/K/V per block from ``x`` and the saved per-row
logsumexp, and accumulates the gradients of every weight over blocks and
batch.

Two schedules share all the per-block math: ``"tpu"`` (Mosaic; also what
interpret mode on CPU runs by default) and ``"gpu"`` (Triton). Every
``pallas_call`` carries a ``pl.CostEstimate`` (FLOPs, exp count, HBM bytes),
so XLA's cost analysis and ``mmlm compile``'s roofline see the kernel's work
instead of zero.

Numerics: LayerNorm, softmax and every accumulation are fp32; matmul operands
are in the compute dtype (fp32 for fp32 inputs, else the input dtype, e.g.
bf16 on the MXU / tensor cores). ``pe_k`` is rounded to the compute dtype in
both paths (halves its HBM traffic in bf16). The gradient w.r.t. ``pe_k`` is
returned as zeros by the Pallas path: it is a fixed sin-cos table in the
compressor, and computing it would need one more N x Dv accumulator per batch.

Modules:

* ``reference``: the XLA reference (``compress_attention_xla``).
* ``plan``: target platform, block sizes, padded shapes, operand layout.
* ``blocks``: the per-tile kernel math both schedules share, forward and backward.
* ``cost``: the ``pl.CostEstimate`` of a kernel call.
* ``tpu`` / ``gpu``: the Mosaic / Triton schedules (kernels and pallas_calls).
* ``op``: the custom VJP, shape checks, batch sharding and the public entry points.
"""

from mmlm.kernels.compression.op import compress_attention, pallas_compress_attention, resolve_impl
from mmlm.kernels.compression.plan import compile_platform, default_tpu_block_n, make_plan, target_platform
from mmlm.kernels.compression.reference import compress_attention_xla

__all__ = [
    "compile_platform",
    "compress_attention",
    "compress_attention_xla",
    "default_tpu_block_n",
    "make_plan",
    "pallas_compress_attention",
    "resolve_impl",
    "target_platform",
]
