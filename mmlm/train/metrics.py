"""Training metrics: console progress bar, TensorBoard events, `WORKDIR/metrics.jsonl`.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged
step (`{"step": 10, "loss": ..., "token_accuracy": ..., "lr": ..., ...}`)
and one per evaluation (`{"step": 100, "eval/loss": ..., "eval/accuracy":
...}`). When a run resumes from a checkpoint at step s, rows after s (logged
by the interrupted run after its last checkpoint) are dropped first, so the
file of a resumed run reads as that of an uninterrupted one.

MFU = model FLOPs per step / (step time x peak FLOP/s of all devices). The
model FLOPs per step are the analytic count of `mmlm.models.flops`
(`model_flops_per_step`: every sample of the global batch, every layer of a
scanned stack, forward and backward of what trains; what `mmlm bench flops`
and `mmlm compile` count). XLA's cost analysis of the compiled step is not
used: it counts a scanned layer stack's body once and includes remat
recomputation. The peak comes from `train.peak_tflops_per_device`, a table of
accelerators, or (CPU) a rough cores x clock x 32 FLOP/cycle (AVX2 FMA)
estimate.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak TFLOP/s per device (chip), by substring of `device.device_kind` (lower case).
PEAK_TFLOPS = (
    ("v6 lite", 918.0), ("v6e", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0),
    ("v4", 275.0), ("v3", 123.0), ("v2", 45.0),
    ("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("l4", 121.0), ("a10", 125.0), ("v100", 125.0),
    ("t4", 65.0),
)


def cpu_peak_tflops(num_devices: int) -> float:
    """Rough fp32 peak of this host's cores shared by its CPU devices (AVX2: 2 FMA x 8 lanes x 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    mhz = 2500.0
    try:
        with open("/proc/cpuinfo") as f:
            found = re.findall(r"cpu MHz\s*:\s*([\d.]+)", f.read())
        if found:
            mhz = float(found[0])
    except OSError:
        pass
    return cores * mhz * 1e6 * 32 / 1e12 / max(num_devices, 1)


def peak_tflops_per_device(configured: float = 0.0) -> float:
    """Configured value, else the accelerator table, else the CPU estimate; 0 if unknown."""
    if configured > 0:
        return float(configured)
    dev = jax.devices()[0]
    kind = dev.device_kind.lower()
    if dev.platform == "cpu":
        return cpu_peak_tflops(jax.local_device_count())
    for key, value in PEAK_TFLOPS:
        if key in kind:
            return value
    return 0.0


def model_flops_per_step(cfg: Any, batch: Mapping[str, Any], parts: Sequence[str],
                         budgets: Sequence[int], all_budgets: bool = False, recipe: Any = None) -> float:
    """Analytic model FLOPs of one train step on the global `batch` (see the module docstring); `recipe`:
    the run's `mmlm.train.recipe.MatryoshkaRecipe` (weighted draws and distillation teachers count)."""
    from mmlm.models.flops import train_step_flops

    b, t = batch["input_ids"].shape
    frames = batch["images"].shape[1] if "images" in batch else 0
    return float(train_step_flops(cfg, batch_size=int(b), text_len=int(t), frames=int(frames),
                                  trainable=tuple(parts), budgets=tuple(budgets),
                                  all_budgets=all_budgets or bool(recipe and recipe.all_budgets),
                                  budget_probs=(recipe.probs or None) if recipe else None,
                                  distill=bool(recipe and recipe.distill),
                                  with_largest=bool(recipe and recipe.with_largest))["total"])


def compiled_flops(compiled: Any) -> float:
    """FLOPs of a compiled XLA program (0 when the backend reports none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements cost analysis
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _scalar(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    a = np.asarray(v)
    if a.dtype.kind in "iu":
        return int(a)
    if a.dtype.kind == "b":
        return bool(a)
    f = float(a)
    return f if math.isfinite(f) else str(f)  # JSON has no NaN / inf


class MetricWriter:
    """Writes metric rows (process 0 only) and drives the tqdm bar."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress_bar: bool = True,
                 enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_rows_after(self.path, start_step)
        from tensorboardX import SummaryWriter

        # purge_step hides events an interrupted run wrote after its last checkpoint.
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                 purge_step=start_step + 1 if start_step > 0 else None)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, smoothing=0.1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)
        return row

    def progress(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)
        self._bar.refresh()

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def truncate_rows_after(path: str, step: int) -> None:
    """Keeps only the rows of `path` (JSONL) whose step is <= `step`."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
