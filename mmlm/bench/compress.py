"""`mmlm bench compress`: the fused Pallas compression kernel vs the XLA path.

For every (frames, N, m) of the grid, with Dv / H / dtype from the flags, it
builds random inputs (B = frames images or video frames of N patches, m
queries) and measures, for each path (``xla``: plain jnp, ``pallas``: the
fused kernel of :mod:`mmlm.kernels.compression`):

* **time**: the forward, and forward+backward (gradients w.r.t. x, q and
  every weight), each jitted, run ``--warmup`` times, then timed ``--repeats``
  times with ``block_until_ready``; the median is reported (ms);
* **compiled memory**: ``compiled.memory_analysis()`` of each jitted program:
  temp + argument + output bytes (what XLA allocates for that program; the
  temp part is where the XLA path's K / V live);
* **device peak**: ``device.memory_stats()["peak_bytes_in_use"]`` when the
  backend reports it (GPU, TPU). It is the process-wide high-water mark so
  far, so it only grows over the grid: read it in grid order.

``kv_mb`` is the size of the K and V tensors the XLA path materialises
(2 x B x N x Dv elements), i.e. what the kernel avoids.

On CPU the Pallas kernel only runs in interpret mode, which emulates the
kernel for correctness and says nothing about speed: the Pallas path is then
skipped (``--interpret`` forces it, labelled as such) and only the XLA path is
timed, with its compiled memory reported.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmlm.kernels.compression import compress_attention

_MB = 1 << 20
_CPU_NOTE = ("CPU backend: only the XLA path is timed. The Pallas kernel runs on CPU only in interpret "
             "mode (a correctness emulator, not a performance figure); use a GPU/TPU to time it.")


def _inputs(frames: int, n: int, m: int, dv: int, dtype: jnp.dtype, seed: int) -> tuple[jax.Array, ...]:
    """(x, q, ln_scale, ln_bias, wk, bk, wv, bv, pe_k) at moderate scale, on the default device."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    w = 1.0 / np.sqrt(dv)
    arrays = (
        jax.random.normal(ks[0], (frames, n, dv)),
        jax.random.normal(ks[1], (m, dv)),
        1.0 + 0.1 * jax.random.normal(ks[2], (dv,)),
        0.1 * jax.random.normal(ks[3], (dv,)),
        w * jax.random.normal(ks[4], (dv, dv)),
        0.1 * jax.random.normal(ks[5], (dv,)),
        w * jax.random.normal(ks[6], (dv, dv)),
        0.1 * jax.random.normal(ks[7], (dv,)),
        0.5 * jax.random.normal(ks[8], (n, dv)),
    )
    return jax.block_until_ready(tuple(a.astype(dtype) for a in arrays))


def _programs(impl: str, heads: int, block_n: int | None, interpret: bool | None) -> tuple[Callable, Callable]:
    """(forward, forward+backward) jitted functions of the 9 inputs."""

    def fwd(*args):
        return compress_attention(*args, num_heads=heads, impl=impl, block_n=block_n, interpret=interpret)

    def loss(*args):
        return jnp.sum(fwd(*args).astype(jnp.float32))

    # Gradients w.r.t. x, q and the weights (pe_k is a fixed table).
    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=tuple(range(8))))


def _compiled_memory(fn: Callable, args: tuple) -> tuple[Callable, dict[str, float] | None]:
    """Compiles fn for args; returns the executable and its memory analysis in MB."""
    compiled = fn.lower(*args).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return compiled, None
    mem = {
        "temp_mb": stats.temp_size_in_bytes / _MB,
        "arg_mb": stats.argument_size_in_bytes / _MB,
        "out_mb": stats.output_size_in_bytes / _MB,
    }
    mem["total_mb"] = mem["temp_mb"] + mem["arg_mb"] + mem["out_mb"]
    return compiled, mem


def _median_ms(fn: Callable, args: tuple, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _device_peak_mb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / _MB


def bench_point(frames: int, n: int, m: int, impl: str, args: Any) -> dict:
    """Times one path at one grid point; returns a JSON-able record."""
    dtype = jnp.dtype(args.dtype)
    inputs = _inputs(frames, n, m, args.dv, dtype, args.seed)
    interpret = True if impl == "pallas" and jax.default_backend() == "cpu" else None
    fwd, fwd_bwd = _programs(impl, args.heads, args.block_n, interpret)
    record = {
        "frames": frames, "n": n, "m": m, "dv": args.dv, "heads": args.heads, "dtype": dtype.name,
        "impl": impl, "interpret": bool(interpret),
        "kv_mb": 2 * frames * n * args.dv * dtype.itemsize / _MB,
    }
    passes = [("fwd", fwd)] + ([] if args.no_backward else [("fwd_bwd", fwd_bwd)])
    for name, fn in passes:
        compiled, mem = _compiled_memory(fn, inputs)
        record[f"{name}_ms"] = _median_ms(compiled, inputs, args.warmup, args.repeats)
        record[f"{name}_memory"] = mem
        record[f"{name}_device_peak_mb"] = _device_peak_mb()
    return record


def _impls(args: Any) -> list[str]:
    wanted = ["xla", "pallas"] if args.impl == "both" else [args.impl]
    if jax.default_backend() == "cpu" and not args.interpret:
        wanted = [i for i in wanted if i != "pallas"]
    return wanted


def run(args: Any) -> dict:
    """Runs the whole grid (with a progress bar on stderr); `args`: the options of `mmlm.cli.bench_compress`."""
    from tqdm import tqdm

    impls = _impls(args)
    grid = list(itertools.product(args.frames, args.n, args.m, impls))
    records = []
    for frames, n, m, impl in tqdm(grid, desc="bench compress", unit="run", file=sys.stderr):
        records.append(bench_point(frames, n, m, impl, args))
    _add_speedups(records)
    device = jax.devices()[0]
    notes = []
    if jax.default_backend() == "cpu":
        notes.append(_CPU_NOTE if not args.interpret else
                     "CPU backend with --interpret: the Pallas timings are of the interpret-mode emulator, "
                     "NOT a performance figure.")
    return {
        "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__, "warmup": args.warmup, "repeats": args.repeats, "notes": notes,
        "results": records,
    }


def _add_speedups(records: list[dict]) -> None:
    """Adds xla_ms / pallas_ms ratios to the Pallas records (> 1: the kernel is faster)."""
    xla = {(r["frames"], r["n"], r["m"]): r for r in records if r["impl"] == "xla"}
    for r in records:
        ref = xla.get((r["frames"], r["n"], r["m"]))
        if r["impl"] != "pallas" or ref is None:
            continue
        for name in ("fwd", "fwd_bwd"):
            if f"{name}_ms" in r:
                r[f"{name}_speedup_vs_xla"] = ref[f"{name}_ms"] / r[f"{name}_ms"]
