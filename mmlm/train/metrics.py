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
recomputation. The peak comes from `train.peak_tflops_per_device`, the table of
accelerators (`mmlm.accelerators`), or (CPU) a rough cores x clock x 32 FLOP/cycle (AVX2 FMA)
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

from mmlm.accelerators import for_device_kind

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


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
    if dev.platform == "cpu":
        return cpu_peak_tflops(jax.local_device_count())
    acc = for_device_kind(dev.device_kind)
    return acc.peak_tflops if acc is not None else 0.0


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


def train_row(host: list[dict[str, Any]], elapsed: float, flops: float, peak: float,
               parts: tuple[str, ...]) -> dict[str, Any]:
    """The log row of the last step, with throughput averaged since the previous row (`flops`: the
    analytic model FLOPs of those steps)."""
    last = host[-1]
    n = len(host)
    tokens = float(sum(float(m["tokens"]) for m in host))
    row = {
        "loss": float(last["loss"]),
        "token_accuracy": float(last["token_accuracy"]),
        "grad_norm": float(last["grad_norm"]),
        "lr": float(last[f"lr/{main_part(parts)}"]),
        "budget": int(last["budget"]),
        "supervised_tokens": int(last["supervised_tokens"]),
        "step_time": elapsed / n,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
    }
    for part in parts:
        row[f"lr/{part}"] = float(last[f"lr/{part}"])
    if flops > 0:
        row["tflops_per_s"] = flops / max(elapsed, 1e-9) / 1e12
        if peak > 0:
            row["mfu"] = flops / max(elapsed, 1e-9) / peak
    return row


def main_part(parts: tuple[str, ...]) -> str:
    """The part whose learning rate is reported as `lr` (the LLM when it trains)."""
    for p in ("llm", "prefusion", "compressor", "projector", "vision"):
        if p in parts:
            return p
    return parts[0]


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
