"""The learned budget head (`mmlm.infer.budget_head`) against the confidence cascade, on the budget study's runs.

    python experiments/paper_trends/budget_head.py                       # every finished budget run kept in runs/
    python experiments/paper_trends/budget_head.py --rows largest_b --out OUT

For each finished Matryoshka run of the budget study whose checkpoint is still in OUT/runs (run.py keeps
them; a fresh checkout has none: train them with `run.py --study budget`), from the training split's
questions (never the scored val questions; checked):
  * the heads are fitted on questions FIT_FROM .. FIT_FROM + --fit_questions,
  * the head's margin and the cascade's threshold are both calibrated on the first 600 (the questions
    run.py calibrates the cascade on; the heads never saw them),
and both policies answer the val questions: accuracy, mean LLM vision tokens, the budget histogram and
the prefill FLOPs (every budget tried), plus each policy swept over its knob. Writes OUT/budget_head.md,
OUT/budget_head.json and OUT/budget_head.png; each run's record is kept in OUT/runs/RUN/budget_head.json,
so a rerun only scores what is new (--force scores again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as runner  # noqa: E402  (the study's runner: its layout, helpers and reference points)

STUDY = "budget"
RECORD = "budget_head.json"
FIT_FROM = runner.AUTO_CALIBRATION_QUESTIONS  # the heads are fitted after the calibration questions
TARGET_TOKENS = 4.0  # the goal's budget: at most 4 LLM vision tokens per question on average
AT = str(int(TARGET_TOKENS))  # the fixed budget the policies are compared with at that cost


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=str(runner.DEFAULT_OUT),
                   help="the study's output directory (its runs/ and results.json; default %(default)s)")
    p.add_argument("--rows", default="", help="comma-separated budget-study rows (default: every Matryoshka row)")
    p.add_argument("--fit_questions", type=int, default=3000,
                   help="training-split questions the heads are fitted on (default %(default)s)")
    p.add_argument("--force", action="store_true", help="score runs again even when their record exists")
    return p


def candidate_runs(out: Path, rows: Sequence[str]) -> list[tuple[str, int, Path]]:
    """(row, seed, run dir) of every finished budget-study run of `rows` with its final checkpoint."""
    found = []
    for row in rows:
        for d in sorted((out / "runs").glob(f"{STUDY}-{row}-s*")):
            rec = d / runner.RUN_FILE
            if rec.is_file() and any((d / "checkpoints").glob("*/params")):
                found.append((row, int(json.loads(rec.read_text())["seed"]), d))
    return found


def score_run(workdir: Path, fit_questions: int) -> dict[str, Any]:
    """The heads and the cascade of one run, calibrated on training questions, scored on the val questions."""
    import ml_collections
    import numpy as np

    from mmlm.eval.auto import score_budgets
    from mmlm.eval.evaluate import prepare_questions, read_jsonl
    from mmlm.infer import budget_head, cascade
    from mmlm.infer.loading import load_inference_model

    t0 = time.time()
    im = load_inference_model(workdir=str(workdir))
    budgets = cascade.cascade_budgets(im.cfg)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    val_file = runner.questions_file(config)
    raw = val_file.parent
    train_lines = read_jsonl(str(raw / f"{config['data']['train_split']}_questions.jsonl"))
    splits = {"calibration": train_lines[:FIT_FROM], "fit": train_lines[FIT_FROM: FIT_FROM + fit_questions],
              "val": read_jsonl(str(val_file))}
    cascade.check_disjoint(splits["calibration"] + splits["fit"], splits["val"])
    kw = {"batch_size": int(config["data"]["eval_batch_size"]), "max_new_tokens": int(config["eval"]["max_new_tokens"])}
    s = {name: score_budgets(im, prepare_questions(im, lines, raw), budgets, with_features=True, **kw)
         for name, lines in splits.items()}
    heads = budget_head.fit_heads(s["fit"].features, s["fit"].correct, budgets)
    margin = budget_head.calibrate_margin(heads.predict(s["calibration"].features), s["calibration"].correct, budgets)
    threshold = cascade.calibrate_threshold(s["calibration"].conf, s["calibration"].correct, budgets)
    val = s["val"]
    predicted = heads.predict(val.features)
    width = val.features.shape[-1]

    def outcome(stop: np.ndarray, head: bool) -> dict[str, Any]:
        flops = [f[k] + (budget_head.head_flops(budgets, width, k) if head else 0.0)
                 for f, k in zip(val.flops_at_stop, stop)]
        r = cascade.summarize_stops(stop, val.correct, budgets, [0.0] * len(budgets))
        return {"accuracy": r.accuracy, "llm_vision_tokens": r.mean_vision_tokens,
                "histogram": {str(m): k for m, k in r.histogram.items()}, "flops": float(np.mean(flops))}

    return {
        "run": workdir.name, "budgets": list(budgets), "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "questions": {name: len(x.questions) for name, x in s.items()},
        "fixed": {str(m): float(val.correct[:, k].mean()) for k, m in enumerate(budgets)},
        "head": {"margin": margin, **outcome(budget_head.stop_index(predicted, margin), True),
                 "sweep": [{"knob": m, **outcome(budget_head.stop_index(predicted, m), True)}
                           for m in budget_head.MARGIN_GRID]},
        "cascade": {"threshold": threshold, **outcome(cascade.stop_index(val.conf, threshold), False),
                    "sweep": [{"knob": t, **outcome(cascade.stop_index(val.conf, t), False)}
                              for t in cascade.THRESHOLD_GRID]},
    }


def _without_sweeps(record: dict[str, Any]) -> dict[str, Any]:
    """A run's record with its calibrated points only (the summary keeps the sweeps, averaged over seeds)."""
    return {k: ({f: x for f, x in v.items() if f != "sweep"} if k in ("head", "cascade") else v)
            for k, v in record.items()}


def best_within(sweep: Sequence[dict[str, Any]], tokens: float) -> dict[str, Any] | None:
    """The most accurate swept point with at most `tokens` mean vision tokens (None when none is)."""
    ok = [p for p in sweep if p["llm_vision_tokens"] <= tokens + 1e-9]
    return max(ok, key=lambda p: (p["accuracy"], -p["llm_vision_tokens"])) if ok else None


def summarize(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per row, per policy: the calibrated point over seeds, and the sweep averaged over seeds per knob."""
    out: dict[str, Any] = {}
    for row, recs in records.items():
        out[row] = {"seeds": len(recs), "fixed": {m: runner.mean_std([r["fixed"][m] for r in recs])
                                                  for m in recs[0]["fixed"]}}
        for policy in ("head", "cascade"):
            pts = [r[policy] for r in recs]
            hist: dict[str, int] = {}
            for p in pts:
                for m, k in p["histogram"].items():
                    hist[m] = hist.get(m, 0) + k
            by_knob: dict[float, list[dict[str, Any]]] = {}
            for p in pts:
                for q in p["sweep"]:
                    by_knob.setdefault(q["knob"], []).append(q)
            sweep = [{"knob": k, **{f: sum(q[f] for q in qs) / len(qs) for f in ("accuracy", "llm_vision_tokens",
                                                                                "flops")}}
                     for k, qs in sorted(by_knob.items()) if len(qs) == len(pts)]
            out[row][policy] = {
                "knobs": [p["margin" if policy == "head" else "threshold"] for p in pts],
                "accuracy": runner.mean_std([p["accuracy"] for p in pts]),
                "llm_vision_tokens": sum(p["llm_vision_tokens"] for p in pts) / len(pts),
                "flops": sum(p["flops"] for p in pts) / len(pts), "histogram": hist, "sweep": sweep,
                "best_within_target": best_within(sweep, TARGET_TOKENS)}
    return out


def reference_points(out: Path) -> dict[str, dict[str, float]]:
    """The study's fixed-budget rows and oracle from OUT/results.json (accuracy mean/std, tokens)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    points = json.loads(path.read_text())["studies"].get(STUDY, {}).get("points", [])
    return {p["row"]: {"mean": p["mean"], "std": p["std"], "tokens": p["llm_vision_tokens"]} for p in points
            if p["row"].startswith("fixed") or p["row"] == runner.ORACLE}


def plot(summary: dict[str, Any], refs: dict[str, dict[str, float]], out: Path) -> str:
    """budget_head.png: accuracy vs mean LLM vision tokens, head (solid) and cascade (dashed) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = runner._colors(plt, list(summary))
    for row, s in summary.items():
        for policy, style in (("head", "-"), ("cascade", "--")):
            sw = s[policy]["sweep"]
            ax.plot([p["llm_vision_tokens"] for p in sw], [100 * p["accuracy"] for p in sw], style, marker=".",
                    markersize=3, color=colors[row], label=f"{row}: {policy}")
            ax.plot([s[policy]["llm_vision_tokens"]], [100 * s[policy]["accuracy"][0]],
                    marker="*" if policy == "head" else "^", markersize=11, color=colors[row], linestyle="none")
    for name, r in refs.items():
        ax.errorbar([r["tokens"]], [100 * r["mean"]], yerr=[100 * r["std"]], capsize=3, linestyle="none",
                    marker="D" if name == runner.ORACLE else "s", color="gray" if name == runner.ORACLE else "black")
        ax.annotate(name, (r["tokens"], 100 * r["mean"]), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.axvline(TARGET_TOKENS, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean LLM vision tokens per question")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("num_vision_tokens=auto: learned head (solid, stars) vs confidence cascade (dashed, triangles)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    runner._legend(ax, 2 * len(summary) + len(refs))
    name = "budget_head.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def markdown(summary: dict[str, Any], refs: dict[str, dict[str, float]], fit_questions: int, command: str,
             plot_name: str, machines: Sequence[str]) -> str:
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"
    fixed16 = refs.get("fixed16")
    lines = [
        "# `num_vision_tokens=auto`: a learned budget head against the confidence cascade", "",
        "The budget study's Matryoshka runs whose checkpoints were kept, each answered by two policies over its "
        "{1, 4, 16} budgets (`mmlm.infer.budget_head`, `mmlm.infer.cascade`). The **cascade** escalates while "
        "the first answer token's probability is below a threshold. The **head** (one logistic output per "
        "budget on the LLM's last-prompt hidden state and the first token's top-2 probabilities and entropy, "
        "one head at 1 token and one at 4) stops where its predicted accuracy is within a margin of its "
        "prediction at 16 tokens. Both cost a prefill per budget tried, the vision tower once. The heads are "
        f"fitted on {fit_questions} questions of the training split ({FIT_FROM} onwards); the margin and the "
        f"threshold are calibrated on its first {FIT_FROM} questions (which the heads did not see), with the "
        "same rule (the fewest mean tokens within 1 point of the best calibration accuracy); the scored val "
        "questions are checked disjoint from both. Rows with 2 seeds lack seed 0's checkpoint; which foundation "
        "each run started from is in results.md's budget section. Scored on: " + "; ".join(machines) + ".", "",
        "Reproduce (after `run.py --study budget`, which keeps each run's checkpoint):", "", "```", command, "```",
        "",
        "| row | seeds | policy | calibrated knob (per seed) | accuracy (%) | mean LLM vision tokens | questions at "
        f"1 / 4 / 16 | MFLOPs / question | best swept point at <= {AT} tokens | the row at {AT} tokens, every "
        "question |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        for policy in ("head", "cascade"):
            p = s[policy]
            best = p["best_within_target"]
            hist = " / ".join(str(p["histogram"].get(str(m), 0)) for m in (1, 4, 16))
            lines.append(f"| {row} | {s['seeds']} | {policy} | {', '.join(f'{k:g}' for k in p['knobs'])} | "
                         f"{pct(p['accuracy'])} | {p['llm_vision_tokens']:.2f} | {hist} | {p['flops'] / 1e6:.2f} | "
                         + (f"{100 * best['accuracy']:.1f}% at {best['llm_vision_tokens']:.2f} tokens "
                            f"(knob {best['knob']:g})" if best else "none")
                         + f" | {pct(s['fixed'][AT]) if AT in s['fixed'] else '-'} |")
    lines += ["", "The best swept point picks the knob on the scored questions themselves (seed means of the sweep): "
              "an upper bound for each policy, not a calibrated result.", ""]
    if fixed16:
        target = fixed16["mean"]
        met = [row for row, s in summary.items() if s["head"]["accuracy"][0] >= target
               and s["head"]["llm_vision_tokens"] <= TARGET_TOKENS]
        best_head = max((s["head"]["best_within_target"] or {"accuracy": 0.0})["accuracy"] for s in summary.values())
        best_casc = max((s["cascade"]["best_within_target"] or {"accuracy": 0.0})["accuracy"]
                        for s in summary.values())
        lines += [f"The goal: `auto` at least as accurate as fixed16 ({100 * target:.1f}%) with at most "
                  f"{TARGET_TOKENS:g} vision tokens per question on average. "
                  + (f"Met by {', '.join(met)}." if met else
                     f"**Not met** by either policy: the best point at <= {TARGET_TOKENS:g} tokens, even with "
                     f"the knob picked on the scored questions, is {100 * best_head:.1f}% for the head and "
                     f"{100 * best_casc:.1f}% for the cascade."), ""]
        gains = {row: (s["head"]["best_within_target"] or {"accuracy": 0.0})["accuracy"] - s["fixed"][AT][0]
                 for row, s in summary.items() if AT in s["fixed"]} or {"": float("nan")}
        saved = [s["cascade"]["llm_vision_tokens"] - s["head"]["llm_vision_tokens"] for s in summary.values()]
        delta = [100 * (s["head"]["accuracy"][0] - s["cascade"]["accuracy"][0]) for s in summary.values()]
        better = sum((s["head"]["best_within_target"] or {"accuracy": 0.0})["accuracy"]
                     > (s["cascade"]["best_within_target"] or {"accuracy": 0.0})["accuracy"] for s in summary.values())
        oracle = refs.get("oracle")
        lines += [f"Calibrated, the head spends {min(saved):.1f} to {max(saved):.1f} fewer vision tokens per question "
                  f"than the cascade (per row, seed means) at {min(delta):+.1f} to {max(delta):+.1f} points of its "
                  f"accuracy; swept to at most {TARGET_TOKENS:g} tokens it is the more accurate policy in {better} "
                  f"of {len(summary)} rows. Against answering every question at {AT} tokens, the head's best point "
                  f"at that budget is {100 * min(gains.values()):+.1f} to {100 * max(gains.values()):+.1f} points "
                  "(per row)"
                  + (": the LLM's state after 1 or 4 tokens hardly tells which questions 16 tokens would answer."
                     if max(gains.values()) < 0.02 else ".")
                  + (f" The oracle, which knows which budget answers each question, reaches "
                     f"{100 * oracle['mean']:.1f}% at {oracle['tokens']:.2f} tokens." if oracle else ""), ""]
    lines += [f"![head vs cascade]({plot_name})", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mmlm.errors import UserError
    from mmlm.safe_io import write_text_atomic

    try:
        out = Path(args.out)
        rows = [r for r in args.rows.split(",") if r] or [r for r in runner.study_module(STUDY).ROWS
                                                          if not r.startswith("fixed")]
        unknown = [r for r in rows if r not in runner.study_module(STUDY).ROWS]
        if unknown:
            raise UserError(f"--rows: unknown budget-study rows {unknown}; "
                            f"choose from {list(runner.study_module(STUDY).ROWS)}")
        if args.fit_questions < 100:
            raise UserError(f"--fit_questions {args.fit_questions}: fit the heads on at least 100 questions")
        runs = candidate_runs(out, rows)
        if not runs:
            raise UserError(f"no finished budget-study run of {rows} with its checkpoint under {out / 'runs'}: "
                            f"train them first (python experiments/paper_trends/run.py --study budget --out {out})")
        runner._configure_jax(out, quick=False)
        records: dict[str, list[dict[str, Any]]] = {}
        for i, (row, seed, d) in enumerate(runs, 1):
            path = d / RECORD
            fingerprint = json.loads((d / runner.RUN_FILE).read_text())["fingerprint"]
            rec = json.loads(path.read_text()) if path.is_file() and not args.force else {}
            if (rec.get("fingerprint"), rec.get("fit_questions")) != (fingerprint, args.fit_questions):
                # New, retrained since, or fitted on other questions: score it (again).
                rec = {"fingerprint": fingerprint, "fit_questions": args.fit_questions,
                       **score_run(d, args.fit_questions)}
                runner._write_json_atomic(path, rec)
            h, c = rec["head"], rec["cascade"]
            print(f"[{i}/{len(runs)}] {d.name}: head {100 * h['accuracy']:.1f}% at {h['llm_vision_tokens']:.2f} "
                  f"tokens, cascade {100 * c['accuracy']:.1f}% at {c['llm_vision_tokens']:.2f}", flush=True)
            records.setdefault(row, []).append(rec)
        summary = summarize(records)
        refs = reference_points(out)
        command = "python experiments/paper_trends/budget_head.py" + (
            f" --out {out}" if out.resolve() != runner.DEFAULT_OUT.resolve() else "") + (
            f" --fit_questions {args.fit_questions}" if args.fit_questions != 3000 else "")
        name = plot(summary, refs, out)
        runner._write_json_atomic(out / "budget_head.json", {"fit_questions": args.fit_questions,
                                                             "calibration_questions": FIT_FROM,
                                                             "runs": {r["run"]: _without_sweeps(r)
                                                                      for rs in records.values() for r in rs},
                                                             "summary": summary})
        machines = sorted({r.get("machine", "not recorded") for rs in records.values() for r in rs})
        # An interrupted write leaves the old page whole.
        write_text_atomic(out / "budget_head.md", markdown(summary, refs, args.fit_questions, command, name, machines))
        print(f"wrote {out / 'budget_head.md'}")
        return 0
    except UserError as e:
        print(f"budget_head.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
