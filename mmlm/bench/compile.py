"""`mmlm compile` (command line: `mmlm.cli.compile`): compile the train step for a Cloud TPU slice on
this machine, no TPU needed.

    mmlm compile --config llava_mini_vicuna7b --topology v5p-64 [--config.a.b=v ...] [--json]

libtpu (`pip install mmlm[tpu]`) describes the chips of a named slice
(`jax.experimental.topologies.get_topology_desc`) and runs the real TPU
compiler on this host, so a user learns whether a config fits a slice, and
how fast it should run, before renting it.

* Topology: a Cloud TPU name, `<generation>-<count>`. v4 and v5p names count
  TensorCores (2 per chip: v5p-64 = 32 chips); v5litepod (alias v5e) and
  v6e names count chips. `TPU_GENERATIONS` names each generation's chip in
  `mmlm.accelerators`, which holds its peak dense bf16 FLOP/s, HBM capacity,
  HBM bandwidth and ICI bandwidth.
* The train step is the trainer's own (`build_setup` + `make_train_step`,
  `config.mesh` with -1 resolved against the chip count), lowered with
  abstract state and batch (ShapeDtypeStructs carrying NamedShardings:
  nothing is allocated) and compiled. The batch is the pipeline's: global
  `data.batch_size` x `data.max_text_len` tokens, `--frames` images per
  sample (uint8 pixels with `data.pixels_on_device`, the default, else float32:
  what the pipeline yields).
* Memory (per chip, `compiled.memory_analysis()`): arguments (the sharded
  state and batch), temporaries, outputs; `total` = arguments + outputs +
  temporaries - aliased (the donated state is updated in place). `fits`:
  total <= HBM. When the compiler itself stops because the temporaries do
  not fit, the report carries its figure and `fits: false`.
* Speed: `model_flops_per_step` is the analytic count
  (`mmlm.models.flops.train_step_flops`: every sample and every layer,
  forward and backward, no remat recomputation). `estimated_step_seconds` is
  the compiler's `optimal_seconds` when it is positive AND the program has no
  loop (XLA's estimate counts a while/scan body once, measured on a 4-layer
  scan: 0.41 ms vs 1.2 ms of matmul work at peak); otherwise the roofline of
  `mmlm.bench.roofline` over the compiled HLO. `estimator` says which.
  `projected_mfu` = model FLOPs / (step seconds x chips x peak FLOP/s), absent
  when no positive estimate exists.
* Collectives: bytes per chip per step of every all-gather, reduce-scatter,
  all-reduce, all-to-all and collective-permute in the compiled HLO (loop
  bodies times their trip counts; the TPU compiler turns many all-gathers
  into rings of collective-permutes overlapped with the matmuls).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mmlm import sharding as shd
from mmlm.accelerators import Accelerator, Chip, accelerator
from mmlm.bench.common import fmt_bytes, oom_temporaries
from mmlm.bench.roofline import roofline
from mmlm.errors import UserError
from mmlm.models.summary import batch_shapes
from mmlm.safe_io import write_text_atomic


@dataclasses.dataclass(frozen=True)
class Generation:
    """How Cloud TPU names and lays out one generation's slices; the chip's figures are in
    `mmlm.accelerators` (public Cloud TPU specifications, per chip)."""

    accelerator: str  # name in mmlm.accelerators
    topology_prefix: str  # generation in get_topology_desc's topology string
    cores_per_name_unit: int  # TensorCores per chip counted by the slice name (2: v4, v5p), else 1
    dims: int  # torus dimensions (3: v4, v5p; 2: v5e, v6e)

    @property
    def chip_spec(self) -> Accelerator:
        return accelerator(self.accelerator)

    @property
    def peak_tflops(self) -> float:  # dense bf16 TFLOP/s
        return self.chip_spec.peak_tflops

    @property
    def hbm_gib(self) -> float:  # HBM capacity, GiB
        return float(self.chip_spec.hbm_gib)

    @property
    def hbm_gbps(self) -> float:  # HBM bandwidth, GB/s
        return float(self.chip_spec.hbm_gbps)

    @property
    def ici_gbps(self) -> float:  # inter-chip interconnect bandwidth, GB/s
        return float(self.chip_spec.ici_gbps)


TPU_GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", "v4", 2, 3),
    "v5litepod": Generation("v5e", "v5e", 1, 2),
    "v5p": Generation("v5p", "v5p", 2, 3),
    "v6e": Generation("v6e", "v6e", 1, 2),
}
ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given, e.g. "v5p-64"
    generation: str  # key of TPU_GENERATIONS
    chips: int
    topology: str  # get_topology_desc topology string, e.g. "v5p:2x4x4"

    @property
    def spec(self) -> Generation:
        return TPU_GENERATIONS[self.generation]

    @property
    def hbm_bytes(self) -> int:
        return self.spec.chip_spec.hbm_bytes

    @property
    def chip(self) -> Chip:
        return self.spec.chip_spec.chip


def _grid(chips: int, dims: int) -> list[int]:
    """The slice's chip grid: 3-D (v4/v5p) from 2x2x1, doubling the smallest axis (the last on ties):
    4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4; 2-D (v5e/v6e): 1x1, 2x2, 2x4, 4x4, 4x8, ..."""
    if dims == 2:
        if chips == 1:
            return [1, 1]
        grid = [2, 2]
        while math.prod(grid) < chips:
            grid[0 if grid[0] < grid[1] else 1] *= 2
        return grid
    grid = [2, 2, 1]
    while math.prod(grid) < chips:
        small = min(grid)
        grid[max(i for i, g in enumerate(grid) if g == small)] *= 2
    return grid


def parse_topology(name: str) -> Slice:
    """A Cloud TPU slice name (v4-32, v5litepod-16, v5p-64, v6e-16) -> chips and topology string."""
    names = ", ".join(f"{g}-N" for g in TPU_GENERATIONS)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    if not m:
        raise UserError(f"--topology {name!r} is not a Cloud TPU slice name; use one of {names} "
                        "(e.g. v5p-64, v5litepod-16)")
    gen, count = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if gen not in TPU_GENERATIONS:
        raise UserError(f"--topology {name!r}: unknown TPU generation {m.group(1)!r}; known: {names}")
    spec = TPU_GENERATIONS[gen]
    chips, rest = divmod(count, spec.cores_per_name_unit)
    smallest = 4 if spec.dims == 3 else 1
    ok = not rest and chips >= smallest and (chips == 1 or (chips >= 4 and chips & (chips - 1) == 0))
    if not ok:
        unit = "TensorCores (2 per chip)" if spec.cores_per_name_unit == 2 else "chips"
        first = smallest * spec.cores_per_name_unit
        raise UserError(f"--topology {name!r}: {gen} slice names count {unit}; use {gen}-{first}, "
                        f"{gen}-{first * 2}, {gen}-{first * 4}, ... (a power of two)")
    grid = _grid(chips, spec.dims)
    return Slice(name=name, generation=gen, chips=chips,
                 topology=f"{spec.topology_prefix}:" + "x".join(str(g) for g in grid))


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("compiling for a TPU topology needs libtpu, which is not installed: "
                        "pip install 'mmlm[tpu]' (or pip install \"jax[tpu]==%s\")" % jax.__version__)


def topology_devices(s: Slice) -> list[Any]:
    """Compile-only device descriptions of the slice's chips."""
    require_libtpu()
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {}
    if s.spec.dims == 3:
        kwargs["chip_config_name"] = "megacore"  # one device per chip (both TensorCores)
    elif s.chips == 1:
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    try:
        return list(topologies.get_topology_desc(topology_name=s.topology, platform="tpu", **kwargs).devices)
    except Exception as e:  # noqa: BLE001 - libtpu's errors are plain runtime errors
        raise UserError(f"libtpu cannot describe topology {s.topology} ({s.name}): {e}") from e


# ----------------------------------------------------------------------------- compile


def _shard_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(config: ml_collections.ConfigDict, cfg: Any, mesh: Mesh, frames: int) -> dict[str, Any]:
    """The pipeline's global batch as sharded ShapeDtypeStructs (see mmlm.data.pipeline)."""
    from mmlm.data.pipeline import images_dtype

    shapes = batch_shapes(cfg, int(config.data.batch_size), int(config.data.max_text_len), frames, labels=True,
                          images_dtype=images_dtype(config.data))
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=shd.batch_sharding(mesh, len(shape)))
            for k, (shape, dt) in shapes.items()}


def tpu_compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.tpu_compiler_options` as `jax.jit(compiler_options=...)` takes them (absent in old configs)."""
    return dict(config.get("tpu_compiler_options") or {})


def _check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    b, k = int(config.data.batch_size), int(config.train.grad_accum_steps)
    dp = shd.data_parallel_size(mesh)
    if k < 1 or b % k or (b // k) % dp:
        raise UserError(f"data.batch_size={b} / train.grad_accum_steps={k} must be a whole micro-batch that is "
                        f"a multiple of the data-parallel size {dp} ({shd.describe(mesh)}); change "
                        "--config.data.batch_size, --config.train.grad_accum_steps or --config.mesh.*")


def _has_loops(hlo_text: str) -> bool:
    return re.search(r"\swhile\(", hlo_text) is not None


def compile_train_step(config: ml_collections.ConfigDict, s: Slice, frames: int = 1,
                       dump_hlo: str = "") -> dict[str, Any]:
    """Compiles the train step for slice `s`; returns the report (see the module docstring)."""
    from mmlm.kernels.compression import compile_platform
    from mmlm.models.flops import train_step_flops
    from mmlm.train.step import make_train_step
    from mmlm.train.trainer import build_setup

    devices = topology_devices(s)
    try:
        mesh = shd.make_mesh(shd.mesh_config_from(config), devices=devices)
    except ValueError as e:
        raise UserError(f"config.mesh does not fit {s.name} ({s.chips} chips): {e}") from e
    _check_batch(config, mesh)
    if frames < 1:
        raise UserError(f"--frames must be >= 1, got {frames}")
    steps = int(config.train.steps) if int(config.train.steps) > 0 else 1000  # only LR-schedule constants
    setup = build_setup(config, steps, mesh)
    batch = abstract_batch(config, setup.cfg, mesh, frames)
    step = make_train_step(setup.model, setup.tx, setup.parts, setup.budgets, int(config.train.grad_accum_steps),
                           setup.schedules, mesh, config.sharding_rules, all_budgets=setup.all_budgets)
    batch_sh = jax.tree.map(lambda a: a.sharding, batch)
    fn = jax.jit(step, in_shardings=(setup.state_shardings, batch_sh), out_shardings=(setup.state_shardings, None),
                 donate_argnums=(0,), compiler_options=tpu_compiler_options(config))
    b, t = int(config.data.batch_size), int(config.data.max_text_len)
    model_flops = train_step_flops(setup.cfg, batch_size=b, text_len=t, frames=frames, trainable=setup.parts,
                                   budgets=setup.budgets, all_budgets=setup.all_budgets)["total"]
    report: dict[str, Any] = {
        "topology": s.name,
        "topology_string": s.topology,
        "device_kind": devices[0].device_kind,
        "chips": s.chips,
        "hbm_bytes_per_chip": s.hbm_bytes,
        "peak_tflops_per_chip": s.spec.peak_tflops,
        "mesh": shd.describe(mesh),
        "batch": {"global_batch": b, "text_len": t, "frames": frames,
                  "grad_accum_steps": int(config.train.grad_accum_steps)},
        "remat_policy": setup.cfg.remat_policy,
        "model_flops_per_step": model_flops,
    }
    arguments = _shard_bytes(setup.abstract_state) + _shard_bytes(batch)
    t0 = time.perf_counter()
    with compile_platform("tpu"):
        lowered = fn.lower(setup.abstract_state, batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - XlaRuntimeError: the compiler's own verdict
            temps = oom_temporaries(str(e))
            if temps is None:
                raise
            report.update({
                "compile_seconds": time.perf_counter() - t0,
                "per_chip_bytes": {"arguments": arguments, "temporaries": temps, "outputs": None,
                                   "total": arguments + temps},
                "fits": False, "hbm_fraction": (arguments + temps) / s.hbm_bytes,
                "estimated_step_seconds": None, "estimator": None, "projected_mfu": None,
                "collective_bytes": None,
                "compile_error": str(e).strip().splitlines()[0][:500],
            })
            return report
    report["compile_seconds"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    args_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temp_b, alias_b = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    total = args_b + out_b + temp_b - alias_b
    report["per_chip_bytes"] = {"arguments": args_b, "temporaries": temp_b, "outputs": out_b, "aliased": alias_b,
                                "total": total}
    report["fits"] = total <= s.hbm_bytes
    report["hbm_fraction"] = total / s.hbm_bytes
    report.update(step_time(compiled, s, model_flops, dump_hlo))
    return report


def step_time(compiled: Any, s: Slice, model_flops: float, dump_hlo: str = "") -> dict[str, Any]:
    """Estimated step time (optimal_seconds or roofline), projected MFU and collective bytes.

    dump_hlo: a path to write the compiled HLO text to (for `mmlm.bench.roofline` or a closer look).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    optimal = float((cost or {}).get("optimal_seconds", -1.0))
    text = compiled.as_text()
    if dump_hlo:
        write_text_atomic(dump_hlo, text)
    roof = roofline(text, s.chip)
    if optimal > 0 and not _has_loops(text):
        seconds, estimator = optimal, "optimal_seconds"
    else:
        seconds, estimator = roof["seconds"], "roofline"
    mfu = model_flops / (seconds * s.chips * s.spec.peak_tflops * 1e12) if seconds > 0 else None
    return {
        "optimal_seconds": optimal,
        "estimated_step_seconds": seconds if seconds > 0 else None,
        "estimator": estimator if seconds > 0 else None,
        "projected_mfu": mfu,
        # Every kind: the TPU compiler decomposes many all-gathers into rings of collective-permutes.
        "collective_bytes": dict(roof["collective_bytes"]),
        "roofline": roof,
    }



def _fmt_flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f} FLOP"


def format_report(r: dict[str, Any]) -> str:
    pb = r["per_chip_bytes"]
    rows = [
        ("topology", f"{r['topology']} = {r['chips']} x {r['device_kind']} ({r['topology_string']}), "
                     f"{fmt_bytes(r['hbm_bytes_per_chip'])} HBM and {r['peak_tflops_per_chip']:.0f} TFLOP/s "
                     "per chip"),
        ("mesh", r["mesh"]),
        ("batch", f"{r['batch']['global_batch']} x {r['batch']['text_len']} tokens, {r['batch']['frames']} "
                  f"frame(s), {r['batch']['grad_accum_steps']} micro-batch(es); remat {r['remat_policy']}"),
        ("per-chip memory", f"arguments {fmt_bytes(pb['arguments'])} + temporaries {fmt_bytes(pb['temporaries'])}"
                            f" + outputs {fmt_bytes(pb['outputs'])} = {fmt_bytes(pb['total'])}"),
        ("fits", f"{'yes' if r['fits'] else 'NO'} ({100 * r['hbm_fraction']:.1f}% of HBM)"),
        ("model FLOPs / step", _fmt_flops(r["model_flops_per_step"])),
    ]
    if r.get("estimated_step_seconds"):
        sec = r["estimated_step_seconds"]
        rows.append(("estimated step", (f"{sec:.3f} s" if sec >= 0.1 else f"{sec * 1e3:.3f} ms")
                     + f" ({r['estimator']})"))
        rows.append(("projected MFU", f"{100 * r['projected_mfu']:.1f}%"))
    else:
        rows.append(("estimated step", "none (no positive estimate)"))
    if r.get("collective_bytes"):
        rows.append(("collectives / chip", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r["collective_bytes"].items())))
    rows.append(("compile time", f"{r['compile_seconds']:.1f} s"))
    if r.get("compile_error"):
        rows.append(("compiler", r["compile_error"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
