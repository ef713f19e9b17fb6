"""The end of a run: `WORKDIR/results.json` and the table printed on the console.

`results.json` holds the run's status ("completed", "preempted",
"interrupted"), steps, wall and training time, parameter counts, the mesh,
the last train metrics row, the last evaluation row and sample answers (and
the ViT pretraining summary of a run that did one).
"""

from __future__ import annotations

import json
import os
from typing import Any

from mmlm.safe_io import write_text_atomic

RESULTS_FILE = "results.json"


def write_results(workdir: str, results: dict[str, Any]) -> None:
    """Writes `WORKDIR/results.json` atomically."""
    write_text_atomic(os.path.join(workdir, RESULTS_FILE), json.dumps(results, indent=2))


def format_results(results: dict[str, Any]) -> str:
    """The end-of-run table (and sample answers) printed on the console."""
    tr, ev = results.get("train", {}), results.get("eval", {})
    rows = [
        ("steps", f"{results['steps']}"),
        ("wall time", f"{results['wall_time_s']:.1f} s (training {results['train_time_s']:.1f} s)"),
        ("parameters", f"{results['params']:,} ({results['trainable_params']:,} trainable)"),
        ("mesh", results["mesh"]),
    ]
    vp = results.get("vision_pretrain")
    if vp:
        position = vp.get("held_out_position_accuracy")
        rows.append(("vision pretraining", f"{vp['steps']} steps, {vp['seconds']:.1f} s; held-out objects: colour "
                     f"{100 * vp['held_out_color_accuracy']:.1f}%, shape {100 * vp['held_out_shape_accuracy']:.1f}%"
                     + ("" if position is None else f"; patch row / column {100 * position:.1f}%")))
    if tr:
        rows += [("final train loss", f"{tr['loss']:.4f}"),
                 ("final train token accuracy", f"{tr['token_accuracy']:.4f}"),
                 ("throughput", f"{tr['tokens_per_s']:.0f} tokens/s, {tr['step_time'] * 1e3:.0f} ms/step")]
        if "mfu" in tr:
            rows.append(("MFU (estimate)", f"{100 * tr['mfu']:.1f}%"))
    if "eval/loss" in ev:
        rows.append(("eval loss", f"{ev['eval/loss']:.4f}"))
    n = ev.get("eval/num_questions", "?")
    for k, v in ev.items():
        if k.startswith("eval/accuracy") and "/" not in k[len("eval/accuracy"):]:
            rows.append((f"held-out exact match{k[len('eval/accuracy'):]}", f"{100 * v:.1f}% of {n} questions"))
    for k, v in ev.items():
        if k.startswith("eval/accuracy/"):
            rows.append((f"  {k[len('eval/accuracy/'):]}", f"{100 * v:.1f}%"))
    width = max(len(k) for k, _ in rows)
    lines = ["", "results", "-" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in rows]
    if results.get("samples"):
        lines += ["", "sample held-out questions:"]
        for s in results["samples"]:
            mark = "ok" if s["correct"] == "yes" else "XX"
            lines.append(f"  {mark}  Q: {s['question']}  model: {s['answer']!r}  reference: {s['reference']!r}")
    return "\n".join(lines)
