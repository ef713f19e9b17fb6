"""The paper's trends at small scale: every study row trained and scored, tables and plots.

    python experiments/paper_trends/run.py                              # every study, 3 seeds
    python experiments/paper_trends/run.py --study prefusion --seeds 3  # one study
    python experiments/paper_trends/run.py --quick --out /tmp/trends    # the pipeline in minutes (no real accuracies)
    python experiments/paper_trends/run.py --report_only                # tables and plots from finished runs
    python experiments/paper_trends/run.py --study budget --rows largest  # some rows of a study

The studies are the config files of `configs/experiments/` (one per study,
its rows as `FILE.py:ROW`): `matryoshka`, `prefusion`, `resolution`,
`pooling`, `budget`. First the shared foundation (`foundation.py`, the analogue of the
paper's pretrained CLIP and LLM) is trained once and its vision tower and
LLM exported to OUT/foundation/model. Then, for each row and seed, the
runner trains the row's config from that start with the trainer
(`mmlm.train.trainer.train`, what `mmlm train` runs) and scores the trained
model on every held-out question of the synthetic val split at the row's
budgets with the project's evaluator (`mmlm.eval.evaluate`, what `mmlm eval`
runs). Both happen in this process (one JAX start for every run). The
equivalent commands of one run are

    mmlm train --config configs/experiments/STUDY.py:ROW --workdir RUN --config.seed=SEED \\
        --config.synthetic.cache_dir=OUT/data --config.eval.every=-1 --init_from OUT/foundation/model
    mmlm eval --workdir RUN --data OUT/data/<build>/raw/val_questions.jsonl \\
        --num_vision_tokens <the row's eval.budgets> --out RUN/eval

Outputs (under --out, default experiments/paper_trends/):

* `runs/foundation/`, `foundation/model/`: the foundation's run and its exported parts.
* `runs/<study>-<row>-s<seed>/`: the run (checkpoint, metrics, `eval/`
  answers per budget) and `run.json`, written last: a run with a `run.json`
  is finished and skipped when the runner is started again; an unfinished
  one resumes from its last checkpoint. Rows of different studies with the
  same config (e.g. `pooling.py:query_t1` and `matryoshka.py:fixed1`) share
  one run.
* `results.json`: every point (row, budget: mean, std and values over
  seeds, per category, LLM vision tokens, FLOPs per example, training FLOPs),
  the paper's orderings with verdicts, wall times, and every finished run's
  record (with `train_flops`: the analytic model FLOPs of all its training
  steps, forward and backward of every budget and teacher pass, computed from
  its config by `mmlm.train.recipe.train_run_flops`, as the trainer's MFU). A
  run recorded there with the same config counts as finished even when its
  `runs/` directory is gone (a fresh checkout of the repository's results):
  a new row trains alone, and `--report_only` rebuilds the same report. The
  foundation is trained again only when a row needs its weights.
* `results.md`: per study the command, the table, the orderings, the plots.
* `<study>_tokens.png`, `<study>_flops.png`: accuracy vs LLM vision tokens
  and vs FLOPs per example (analytic matmul count, `mmlm bench flops`), one
  line per method, error bars = std over seeds.

`data/` (the synthetic datasets, built once per kind) and `jit_cache/` (XLA's
persistent compilation cache: seeds of a row compile once) sit next to them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "experiments"
DEFAULT_OUT = Path(__file__).resolve().parent
STUDIES = ("matryoshka", "prefusion", "resolution", "pooling", "budget")
CATEGORIES = ("cell_color", "cell_shape", "count_color", "exist")
RESULTS_JSON, RESULTS_MD, RUN_FILE = "results.json", "results.md", "run.json"
FOUNDATION = "foundation"  # the shared start of every row (configs/experiments/foundation.py)
ORACLE = "oracle"  # the pseudo-row: best budget per question of the Matryoshka model
ORACLE_OF, ORACLE_BUDGETS = ("matryoshka", "matryoshka"), (1, 4, 16)  # (study, row) and the budgets it picks from
# --quick compiles fast (see _configure_jax): its programs run for seconds
QUICK_XLA_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}
QUICK_EVAL_IMAGES = 8  # a val split this small is a --quick one: score one question per image (one batch)
AUTO = "auto"  # the budget of an adaptive point: the calibrated cascade (`num_vision_tokens=auto`)
AUTO_STUDY = "budget"  # the study whose Matryoshka runs are also scored with the cascade
AUTO_METHOD = ", auto (calibrated cascade)"  # appended to a row's method for its adaptive point
AUTO_CALIBRATION_QUESTIONS = 600  # the first questions of the training split (200 images) calibrate its threshold
MATCH_TOLERANCE = 0.02  # "matches": within max(2 points, the combined seed spread)
# Config keys added after runs were recorded, at the value every earlier run had implicitly: left out of the
# fingerprint at that value, so adding a knob does not mark the finished runs stale.
LATER_KEYS = {("train", "matryoshka_loss"): "sample", ("train", "matryoshka_probs"): (),
              ("train", "matryoshka_weights"): (), ("train", "distill_weight"): 1.0,
              ("data", "video_chunk_frames"): 16, ("data", "prefill_chunk_tokens"): 512,  # inference knobs of videos
              ("model", "compressor", "nesting"): "prefix"}


# ----------------------------------------------------------------------------- the paper's orderings

@dataclasses.dataclass(frozen=True)
class Claim:
    """An ordering: point `a` beats (">"), is at least (">=") or matches ("~") point `b`; points are (row, budget).

    With `c` and `d` the claim is on differences: (a - b) > (c - d).
    """

    text: str
    paper: str
    a: tuple[str, int]
    b: tuple[str, int]
    relation: str = ">"
    c: tuple[str, int] | None = None
    d: tuple[str, int] | None = None


# The paper: LLaVA-Mini (arXiv 2501.03895), VQAv2 / GQA / MMBench. Budgets of our rows are in LLM vision tokens.
CLAIMS: dict[str, tuple[Claim, ...]] = {
    "matryoshka": (
        Claim("one Matryoshka model matches the fixed-budget model at 1 token",
              "the Matryoshka claim (MQT, M3): one model serves every budget", ("matryoshka", 1), ("fixed1", 1), "~"),
        Claim("... at 4 tokens", "(as above)", ("matryoshka", 4), ("fixed4", 4), "~"),
        Claim("... at 16 tokens", "(as above)", ("matryoshka", 16), ("fixed16", 16), "~"),
        Claim("... trained 3x as long (each budget about as many steps as its fixed model), at 1 token",
              "(as above)", ("matryoshka_3x", 1), ("fixed1", 1), "~"),
        Claim("... trained 3x as long, at 4 tokens", "(as above)", ("matryoshka_3x", 4), ("fixed4", 4), "~"),
        Claim("... trained 3x as long, at 16 tokens", "(as above)", ("matryoshka_3x", 16), ("fixed16", 16), "~"),
        Claim("... trained on every budget each step (M3's loss), at 1 token", "(as above)",
              ("matryoshka_all", 1), ("fixed1", 1), "~"),
        Claim("... every budget each step, at 4 tokens", "(as above)", ("matryoshka_all", 4), ("fixed4", 4), "~"),
        Claim("... every budget each step, at 16 tokens", "(as above)", ("matryoshka_all", 16), ("fixed16", 16),
              "~"),
        Claim("fixed-budget models: 4 tokens beat 1", "336 px LLaVA-Mini, 1 vs 4 tokens: VQAv2 77.6 vs 77.7",
              ("fixed4", 4), ("fixed1", 1)),
        Claim("fixed-budget models: 16 tokens beat 4", "4 vs 16 tokens: VQAv2 77.7 vs 78.1",
              ("fixed16", 16), ("fixed4", 4)),
        Claim("the Matryoshka model: 4 tokens beat 1", "(the same trend, one model)", ("matryoshka", 4),
              ("matryoshka", 1)),
        Claim("the Matryoshka model: 16 tokens beat 4", "(the same trend, one model)", ("matryoshka", 16),
              ("matryoshka", 4)),
        Claim("the oracle (best of 1/4/16 per question) beats the Matryoshka model at 16 tokens",
              "an upper bound for choosing the budget per question", (ORACLE, 0), ("matryoshka", 16), ">="),
        Claim("MQT any-m sampling matches square budgets at 1 token", "MQT: any m in 1..M at inference",
              ("mqt_any_m", 1), ("matryoshka", 1), "~"),
        Claim("... at 4 tokens", "(as above)", ("mqt_any_m", 4), ("matryoshka", 4), "~"),
        Claim("... at 16 tokens", "(as above)", ("mqt_any_m", 16), ("matryoshka", 16), "~"),
        Claim("MQT beats square-budget training at 2 tokens (never trained there)", "(MQT's motivation)",
              ("mqt_any_m", 2), ("matryoshka", 2)),
        Claim("MQT beats square-budget training at 8 tokens (never trained there)", "(MQT's motivation)",
              ("mqt_any_m", 8), ("matryoshka", 8)),
    ),
    "budget": tuple(
        Claim(f"{row} matches the fixed-budget model at {m} token{'s' if m > 1 else ''}",
              "equal training cost (1,200 steps, <= 1.5x fixed16's FLOPs): MatFormer / MRL self-distillation, "
              "weighted budget draws" if m == 1 else "(as above)", (row, m), (f"fixed{m}", m), "~")
        for row in ("largest", "largest_b", "weighted_distill", "heavy_distill", "weighted", "distill")
        for m in (1, 4, 16)
    ) + tuple(
        Claim(f"{row}'s calibrated cascade (auto) is at least as accurate as fixed16 (mean tokens: the auto table)",
              "adaptive budget per image and question: no released system (LLaVA-Mini, MQT, M3) chooses one",
              (row, AUTO), ("fixed16", 16), ">=")
        for row in ("largest", "largest_b", "weighted_distill", "heavy_distill", "weighted", "distill")
    ) + (
        Claim("the oracle (best of 1/4/16 per question) beats the uniform-draw model at 16 tokens",
              "an upper bound for choosing the budget per question", (ORACLE, 0), ("matryoshka", 16), ">="),
    ),
    "prefusion": (
        Claim("1 pre-fusion layer beats 0 at 1 token", "VQAv2/GQA/MMB 74.8/55.5/60.4 vs 72.4/54.2/57.7",
              ("pf1_t1", 1), ("pf0_t1", 1)),
        Claim("2 layers beat 1 at 1 token", "76.0/57.6/63.1 vs 74.8/55.5/60.4", ("pf2_t1", 1), ("pf1_t1", 1)),
        Claim("4 layers beat 2 at 1 token", "77.6/60.9/65.6 vs 76.0/57.6/63.1 (3 layers: 76.9/59.1/64.9)",
              ("pf4_t1", 1), ("pf2_t1", 1)),
        Claim("0 layers: 4 tokens beat 1", "0 layers, 1/16/64/144 tokens: 72.4/74.1/75.3/76.9 (VQAv2)",
              ("pf0_t4", 4), ("pf0_t1", 1)),
        Claim("0 layers: 16 (all) tokens beat 4", "(as above; our 16 tokens are all 16 patches)",
              ("pf0_t16", 16), ("pf0_t4", 4)),
        Claim("1 layer at 1 token beats 0 layers at 16 tokens", "74.8/55.5/60.4 vs 74.1/55.4/59.2",
              ("pf1_t1", 1), ("pf0_t16", 16)),
        Claim("4 layers at 1 token beat 0 layers at the most tokens", "77.6/60.9/65.6 vs 76.9/58.9/64.9 (144 tokens)",
              ("pf4_t1", 1), ("pf0_t16", 16)),
        Claim("LLaVA-1.5 (all patches) beats 0 layers at the most tokens",
              "78.5/62.0/64.3 vs 76.9/58.9/64.9 (MMB reverses)", ("llava15", 16), ("pf0_t16", 16)),
        Claim("LLaVA-1.5 beats 4 layers at 1 token", "78.5/62.0/64.3 vs 77.6/60.9/65.6 (MMB reverses)",
              ("llava15", 16), ("pf4_t1", 1)),
    ),
    "resolution": (
        Claim("HD grid 2 beats grid 1 at 16 tokens", "672 vs 336 px at 16 tokens: VQAv2 78.5 vs 78.1",
              ("hd2", 16), ("hd1", 16)),
        Claim("HD grid 2 beats grid 1 at 4 tokens", "not in the paper (its 672 px rows start at 16 tokens)",
              ("hd2", 4), ("hd1", 4)),
        Claim("HD grid 2 beats grid 1 at 1 token", "not in the paper", ("hd2", 1), ("hd1", 1)),
        Claim("grid 1: 16 tokens beat 1", "336 px, 1 vs 16 tokens: 77.6 vs 78.1", ("hd1", 16), ("hd1", 1)),
        Claim("grid 2: 16 tokens beat 1", "672 px, 16 vs 576 tokens: 78.5 vs 80.0 (more tokens win)",
              ("hd2", 16), ("hd2", 1)),
    ),
    "pooling": (
        Claim("the query compressor beats average pooling at 1 token", "VQAv2 77.6 vs 76.1",
              ("query_t1", 1), ("avgpool_t1", 1)),
        Claim("the query compressor beats average pooling at 4 tokens", "VQAv2 77.7 vs 76.9",
              ("query_t4", 4), ("avgpool_t4", 4)),
        Claim("the query compressor's lead shrinks from 1 to 4 tokens", "1.5 points at 1 token, 0.8 at 4",
              ("query_t1", 1), ("avgpool_t1", 1), ">", ("query_t4", 4), ("avgpool_t4", 4)),
    ),
}

STUDY_TITLES = {
    "matryoshka": ("Matryoshka: one model for budgets 1/4/16 vs fixed-budget models, the oracle, MQT's any-m, "
                   "M3's every-budget loss"),
    "prefusion": "Pre-fusion depth at 1 token, tokens without pre-fusion, and LLaVA-1.5",
    "resolution": "Resolution: HD grid 1 vs 2 at the same budgets",
    "pooling": "Query compressor vs average pooling",
    "budget": "Token budget: one Matryoshka {1, 4, 16} model for the training cost of one fixed model",
}

# What each study's rows share, printed under its heading (the configs' docstrings have the details).
STUDY_SETUP = {
    "matryoshka": "Task `grid_shapes`, no pre-fusion: with 1 pre-fusion layer copied from the foundation's LLM "
                  "the fused text carries the answers and a Matryoshka model scored 76.8-78.0% at every budget "
                  "from 1 to 16 tokens, so that setting cannot test a budget claim. Rows: "
                  "`configs/experiments/matryoshka.py`.",
    "prefusion": "Task `grid_shapes`, one fixed budget per row; 16 tokens are all 16 patches. Rows: "
                 "`configs/experiments/prefusion.py`.",
    "resolution": "Task `grid_shapes_hd`: the same scenes at 128 px with shapes about 9 px wide (4-5 px in a "
                  "64 px view). Grid 1 reads the image as one 64 px view, grid 2 as four 64 px crops plus the "
                  "whole image. One Matryoshka {1, 4, 16} model per grid, with 1 pre-fusion layer (so the "
                  "budget matters little, as in the Matryoshka study's note). Rows: "
                  "`configs/experiments/resolution.py`.",
    "pooling": "Task `grid_shapes`, no pre-fusion (as in the Matryoshka study); average pooling of the 4x4 "
               "patch grid to 1x1 / 2x2 has no parameters. Rows: `configs/experiments/pooling.py`.",
    "budget": "The Matryoshka study's setting. Every recipe row trains 1,200 steps at no more than 1.5x the "
              "fixed16 row's training FLOPs (the `train TFLOP` column: analytic model FLOPs of all its steps, "
              "forward and backward of every budget, teacher forwards included). Rows: "
              "`configs/experiments/budget.py`. Seeds 1 and 2 of `weighted_distill`, `heavy_distill`, "
              "`weighted` and `distill` and every run of `largest_1`, `pooled`, `pooled_largest_b` and "
              "`offset_largest_b` started from the foundation trained again "
              "from the same config on another host (a 2-core AVX2 CPU; the first foundation's weights were not "
              "kept), so their spread includes the foundation's; every other run started from the first one. "
              "The fixed rows trained from the retrained foundation too (`run.py --study budget --rows "
              "fixed1,fixed16 --seeds 3 --out OUT`, OUT holding that foundation; not in the table, whose fixed "
              "rows started from the first one) score 49.3 ± 2.6 at 1 token (46.3 / 51.3 / 50.3) and 71.3 ± 10.0 "
              "at 16 (61.6 / 70.8 / 81.6): against those, `pooled_largest_b` is 0.0 / -2.9 points at 1 / 16 "
              "tokens, `largest_1` -1.1 / -2.5 and `offset_largest_b` -2.1 / -2.2; `largest_b`, trained again "
              "from it too (`--rows largest_b` into that OUT; not in the table), scores 48.5 ± 2.6 / 56.1 ± 1.5 / "
              "68.8 ± 6.3 at 1 / 4 / 16 tokens: -0.8 / -2.5 points from those fixed rows. A seed either learns the "
              "cell questions at 16 tokens or not (fixed16's seeds span 20 points), so 3 seeds cannot settle a "
              "2-point goal from either foundation.",
}

# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Run:
    """One training + evaluation: a config (shared by the study rows listed in `rows`) and a seed."""

    name: str
    seed: int
    rows: list[tuple[str, str]]  # (study, row) pairs that use this run
    config: Any  # ml_collections.ConfigDict
    fingerprint: str
    spec: str  # configs/experiments/STUDY.py:ROW of the first row

    @property
    def budgets(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.config.eval.budgets)


def study_module(study: str) -> Any:
    from mmlm.config_utils import load_config_module

    return load_config_module(str(CONFIG_DIR / f"{study}.py"))


def config_fingerprint(config: Any, base: str = "") -> str:
    """A hash of the whole config (seed included; the data and foundation paths left out, so OUT can move,
    and the tokenizer's path taken relative to the repository, so the checkout can) and of `base` (the
    foundation's fingerprint for a row): runs with equal fingerprints are the same run."""
    plain = config.to_dict()
    plain["synthetic"] = {**plain["synthetic"], "cache_dir": ""}
    plain["data"] = {**plain["data"], "tokenizer": repo_relative(plain["data"]["tokenizer"])}
    plain["train"] = {**plain["train"], "init_from": bool(plain["train"]["init_from"])}
    for (*sections, key), value in LATER_KEYS.items():
        node = plain
        for section in sections:
            node = node.get(section, {})
        if node.get(key, value) == value:
            node.pop(key, None)
    text = json.dumps(plain, sort_keys=True, default=str) + base
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def repo_relative(path: str) -> str:
    """`path` relative to the repository when it lies inside it (the configs name files of the checkout by
    absolute path); any other path as given."""
    p = Path(path)
    return p.relative_to(REPO).as_posix() if p.is_absolute() and p.is_relative_to(REPO) else path


def load_spec(spec: str, seed: int, data_dir: Path, quick: bool, init_from: Path | None) -> Any:
    """The config of `FILE.py[:ROW]` and a seed, as `mmlm train --config ... --config.seed=SEED
    --config.synthetic.cache_dir=DATA [--init_from FOUNDATION]` loads it (the runner scores the model
    itself, so the trainer's own evaluation is off)."""
    from mmlm.config_utils import load_config, load_config_module

    config = load_config(spec, [f"--config.seed={seed}", f"--config.synthetic.cache_dir={data_dir}"])
    if quick:
        load_config_module(str(CONFIG_DIR / "base.py")).quick(config)
    if init_from is not None:
        config.train.init_from = str(init_from)
    config.eval.every = -1  # the runner scores every question of the val split after training
    config.train.progress_bar = False  # the runner prints one line per run
    return config


def foundation_run(out: Path, quick: bool) -> Run:
    """The shared foundation (configs/experiments/foundation.py), trained once with seed 0."""
    spec = f"{CONFIG_DIR}/foundation.py"
    config = load_spec(spec, 0, out / "data", quick, None)
    return Run(FOUNDATION, 0, [], config, config_fingerprint(config), "configs/experiments/foundation.py")


def make_plan(studies: Sequence[str], seeds: int, out: Path, quick: bool) -> list[Run]:
    """The foundation, then every (row, seed) of the studies; rows with equal configs collapse into one run."""
    runs: dict[str, Run] = {}
    init_from = out / FOUNDATION / "model"
    foundation = foundation_run(out, quick)
    for study in studies:
        for row in study_module(study).ROWS:
            for seed in range(seeds):
                config = load_spec(f"{CONFIG_DIR / study}.py:{row}", seed, out / "data", quick, init_from)
                fp = config_fingerprint(config, foundation.fingerprint)  # a new foundation retrains the rows
                if fp not in runs:
                    runs[fp] = Run(f"{study}-{row}-s{seed}", seed, [], config, fp,
                                   f"configs/experiments/{study}.py:{row}")
                runs[fp].rows.append((study, row))
    return [foundation] + list(runs.values())


def export_foundation(run: Run, out: Path) -> Path:
    """OUT/foundation/model: the foundation's shared parts as a model checkpoint for `--init_from`."""
    from mmlm.checkpoint import is_model_checkpoint, load_params_from_workdir, save_model
    from mmlm.config_utils import load_config_module

    dest = out / FOUNDATION / "model"
    if is_model_checkpoint(str(dest)):
        return dest
    parts = load_config_module(str(CONFIG_DIR / "base.py")).FOUNDATION_PARTS
    params, config = load_params_from_workdir(str(out / "runs" / run.name))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written export of a killed runner
    save_model(str(tmp), {p: params[p] for p in parts}, config)
    os.replace(tmp, dest)
    return dest


# ----------------------------------------------------------------------------- one run

class Interrupted(Exception):
    """The trainer stopped on SIGINT/SIGTERM after saving a checkpoint."""


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def flops_per_example(config: Any, budget: int, text_tokens: int) -> float:
    """Analytic matmul FLOPs of one image-question prefill at `budget` (`mmlm bench flops`, analytic row)."""
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.flops import analytic_flops, make_workload

    cfg = model_config_from_dict(config.model)
    return float(analytic_flops(cfg, make_workload(cfg, text_tokens, budget))["total"])


def llm_vision_tokens(config: Any, budget: int) -> int:
    """Vision tokens the LLM reads per image at `budget` (all patches for the LLaVA-1.5 baseline)."""
    from mmlm.models.config import model_config_from_dict

    return model_config_from_dict(config.model).check_budget(budget)


def questions_file(config: Any) -> Path:
    """The val questions of the row's synthetic dataset (set by the trainer: `data.dataset_dir` = BUILD/built)."""
    return Path(config.data.dataset_dir).parent / "raw" / f"{config.data.eval_split}_questions.jsonl"


def oracle(answers: dict[int, list[dict[str, Any]]], budgets: Sequence[int]) -> dict[str, Any]:
    """Best budget per question: correct when any budget is; it spends the smallest budget that is
    correct (the smallest of all when none is)."""
    budgets = sorted(b for b in budgets if b in answers)
    by_q = [dict(zip(budgets, lines)) for lines in zip(*(answers[b] for b in budgets))]
    chosen, correct = [], []
    for q in by_q:
        ok = [b for b in budgets if q[b]["accuracy"] > 0]
        chosen.append(ok[0] if ok else budgets[0])
        correct.append(bool(ok))
    cats: dict[str, list[bool]] = {}
    for q, c in zip(by_q, correct):
        cats.setdefault(str(q[budgets[0]].get("category", "other")), []).append(c)
    return {"budgets": budgets, "accuracy": sum(correct) / max(len(correct), 1),
            "by_category": {k: sum(v) / len(v) for k, v in sorted(cats.items())},
            "chosen": {str(b): chosen.count(b) for b in budgets}, "count": len(correct)}


def execute(run: Run, out: Path) -> dict[str, Any]:
    """Trains (or resumes) and scores one run; writes RUN/run.json last; returns its content."""
    from mmlm.eval.evaluate import ResultsWriter, evaluate, prepare_questions, read_jsonl
    from mmlm.infer.loading import load_inference_model
    from mmlm.train.recipe import train_run_flops
    from mmlm.train.trainer import train

    workdir = out / "runs" / run.name
    workdir.mkdir(parents=True, exist_ok=True)
    config = run.config.copy_and_resolve_references()
    t0 = time.time()
    result = train(config, str(workdir))
    if result["status"] != "completed":
        raise Interrupted(f"{run.name}: training {result['status']} at step {result['steps']}; rerun to resume")
    t_train = time.time() - t0
    t1 = time.time()
    qfile = questions_file(config)
    im = load_inference_model(workdir=str(workdir))
    lines = read_jsonl(str(qfile))
    if int(config.synthetic.num_eval) <= QUICK_EVAL_IMAGES:  # --quick: the first question of each image
        lines = [q for q in lines if not str(q["question_id"]).rpartition("-q")[1] or
                 str(q["question_id"]).endswith("-q0")]
    questions = prepare_questions(im, lines, qfile.parent)
    writer = ResultsWriter(workdir / "eval")
    try:
        ev = evaluate(im, questions, run.budgets, batch_size=int(config.data.eval_batch_size),
                      max_new_tokens=int(config.eval.max_new_tokens), progress=False, on_answers=writer)
    finally:
        writer.close()
    t_eval = time.time() - t1
    writer.finish(ev, {"source": str(workdir), "data": str(qfile), "seconds": round(t_eval, 2)})
    text_tokens = round(sum(len(q.prompt) - 1 for q in questions) / len(questions))  # the placeholder excluded
    points = {}
    for row in ev.rows:
        m = int(row["num_vision_tokens"])
        points[str(m)] = {"accuracy": row["accuracy"], "by_category": row.get("by_category", {}),
                          "count": row["count"], "llm_vision_tokens": llm_vision_tokens(config, m),
                          "flops": flops_per_example(config, m, text_tokens)}
    record: dict[str, Any] = {
        "name": run.name, "seed": run.seed, "rows": [list(r) for r in run.rows], "spec": run.spec,
        "fingerprint": run.fingerprint, "steps": result["steps"], "final_train_loss": result["train"].get("loss"),
        "params": result["params"], "train_s": round(t_train, 1), "eval_s": round(t_eval, 1),
        "wall_s": round(t_train + t_eval, 1), "text_tokens": text_tokens, "questions": str(qfile),
        "train_flops": train_run_flops(config),
        "points": points,
        "command": (f"mmlm train --config {run.spec} --workdir RUN --config.seed={run.seed} "
                    f"--config.synthetic.cache_dir=DATA --config.eval.every=-1"
                    + (" --init_from OUT/foundation/model" if config.train.init_from else "")
                    + f" && mmlm eval --workdir RUN --data {qfile.name} "
                    f"--num_vision_tokens {','.join(str(b) for b in run.budgets)} --out RUN/eval"),
    }
    if any(s == AUTO_STUDY for s, _ in run.rows) and len(run.budgets) > 1:
        record["auto"] = auto_scores(im, config, ev, questions, lines, text_tokens)
    if (ORACLE_OF[0], ORACLE_OF[1]) in run.rows:
        o = oracle(ev.answers, ORACLE_BUDGETS)
        chosen = {int(b): n for b, n in o["chosen"].items()}
        n = max(sum(chosen.values()), 1)
        o["llm_vision_tokens"] = sum(b * k for b, k in chosen.items()) / n
        o["flops"] = sum(flops_per_example(config, b, text_tokens) * k for b, k in chosen.items()) / n
        record["oracle"] = o
    _write_json_atomic(workdir / RUN_FILE, record)
    return record


def auto_scores(im: Any, config: Any, ev: Any, questions: Sequence[Any], lines: Sequence[dict[str, Any]],
                text_tokens: int) -> dict[str, Any]:
    """The cascade (`mmlm eval --num_vision_tokens auto`) of a Matryoshka run: its threshold calibrated on the
    first AUTO_CALIBRATION_QUESTIONS questions of the training split (checked disjoint from the val
    questions), its point on the val questions, and the sweep over thresholds (accuracy vs mean tokens)."""
    from mmlm.eval.auto import cascade_row, score_budgets, sweep
    from mmlm.eval.evaluate import prepare_questions, read_jsonl
    from mmlm.infer.cascade import calibrate_threshold, cascade_budgets, check_disjoint

    budgets = cascade_budgets(im.cfg)
    kw = {"batch_size": int(config.data.eval_batch_size), "max_new_tokens": int(config.eval.max_new_tokens)}
    raw = questions_file(config).parent
    cal_file = raw / f"{config.data.train_split}_questions.jsonl"
    cal_lines = read_jsonl(str(cal_file))[:AUTO_CALIBRATION_QUESTIONS]
    if int(config.synthetic.num_eval) <= QUICK_EVAL_IMAGES:  # --quick: one batch calibrates (its prompt lengths)
        cal_lines = cal_lines[: int(config.data.eval_batch_size)]
    check_disjoint(cal_lines, lines)
    cal = score_budgets(im, prepare_questions(im, cal_lines, raw), budgets, **kw)
    threshold = calibrate_threshold(cal.conf, cal.correct, budgets)
    scored = score_budgets(im, questions, budgets, answered=ev, **kw)
    row, _ = cascade_row(scored, threshold)
    return {"budgets": list(budgets), "threshold": threshold, "calibration": cal_file.name,
            "calibration_questions": len(cal.questions),
            "point": {"accuracy": row["accuracy"], "by_category": row.get("by_category", {}), "count": row["count"],
                      "llm_vision_tokens": row["mean_vision_tokens"], "flops": row["flops_per_question"],
                      "histogram": row["budget_histogram"]},
            "sweep": sweep(scored), "text_tokens": text_tokens}


def load_finished(run: Run, out: Path) -> dict[str, Any] | None:
    """The run's record if it finished with this config; an error if its directory holds another config."""
    from mmlm.errors import UserError

    path = out / "runs" / run.name / RUN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != run.fingerprint:
        raise UserError(f"{path.parent} was trained with another config of {run.spec} (fingerprint "
                        f"{record.get('fingerprint')} vs {run.fingerprint}): the config changed since. Delete "
                        "that directory to retrain it, or pass another --out")
    return record


def reported_runs(out: Path) -> dict[str, dict[str, Any]]:
    """The run records of OUT/results.json (the report of an earlier invocation; with the repository's
    results a fresh checkout has every run's record but none of the `runs/` directories)."""
    path = out / RESULTS_JSON
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("runs", {}))
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not a mapping of runs
        from mmlm.errors import UserError

        raise UserError(f"{path} is not a results file of this runner ({e}); move it away to start afresh") from e


def finished_records(plan: Sequence[Run], out: Path) -> dict[str, dict[str, Any]]:
    """Records of the plan's finished runs: `runs/NAME/run.json`, else the run's record in results.json when
    its fingerprint is the run's (a row whose config changed since is trained again)."""
    reported = reported_runs(out)
    records = {}
    for run in plan:
        rec = load_finished(run, out)
        if rec is None and reported.get(run.name, {}).get("fingerprint") == run.fingerprint:
            rec = reported[run.name]
        if rec is not None:
            records[run.name] = with_plan_fields(rec, run)
    return records


def with_plan_fields(record: dict[str, Any], run: Run) -> dict[str, Any]:
    """The record with the plan's rows (a study added since shares the run) and its `train_flops`
    (computed from the config when the run was recorded before the field existed)."""
    from mmlm.train.recipe import train_run_flops

    out = {**record, "rows": [list(r) for r in run.rows]}
    if "train_flops" not in out and run.config is not None:
        out["train_flops"] = train_run_flops(run.config)
    return out


def foundation_available(out: Path) -> bool:
    """Whether the rows can start from the foundation: exported, or its finished run is here to export."""
    from mmlm.checkpoint import is_model_checkpoint

    return is_model_checkpoint(str(out / FOUNDATION / "model")) or (out / "runs" / FOUNDATION / RUN_FILE).is_file()


# ----------------------------------------------------------------------------- aggregation

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def study_points(study: str, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (row, budget) of the study: accuracy mean/std over seeds, per category, tokens, FLOPs."""
    rows = study_module(study).ROWS
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rec in records:
        for s, row in rec["rows"]:
            if s != study:
                continue
            for m, p in rec["points"].items():
                grouped.setdefault((row, int(m)), []).append({**p, "seed": rec["seed"], "wall_s": rec["wall_s"],
                                                               "train_flops": rec.get("train_flops", 0.0)})
            if "auto" in rec and s == AUTO_STUDY:
                grouped.setdefault((row, AUTO), []).append({**rec["auto"]["point"], "seed": rec["seed"],
                                                            "wall_s": rec["wall_s"],
                                                            "train_flops": rec.get("train_flops", 0.0)})
            if "oracle" in rec and row == ORACLE_OF[1]:  # the uniform-draw Matryoshka row of any study
                grouped.setdefault((ORACLE, 0), []).append({**rec["oracle"], "seed": rec["seed"], "wall_s": 0.0,
                                                            "train_flops": rec.get("train_flops", 0.0)})
    order = {r: i for i, r in enumerate(list(rows) + [ORACLE])}
    out = []
    for (row, m), ps in sorted(grouped.items(),
                               key=lambda kv: (order[kv[0][0]], kv[0][1] if kv[0][1] != AUTO else math.inf)):
        acc = [p["accuracy"] for p in ps]
        mean, std = mean_std(acc)
        cats = {c: mean_std([p["by_category"][c] for p in ps if c in p["by_category"]])[0]
                for c in CATEGORIES if any(c in p["by_category"] for p in ps)}
        method = rows.get(row, "oracle (best budget per question)")
        out.append({"row": row, "budget": m, "method": method + (AUTO_METHOD if m == AUTO else ""),
                    "mean": mean, "std": std, "n": len(acc), "values": acc,
                    "seeds": [p["seed"] for p in ps], "by_category": cats,
                    "llm_vision_tokens": sum(p["llm_vision_tokens"] for p in ps) / len(ps),
                    "flops": sum(p["flops"] for p in ps) / len(ps),
                    "train_flops": sum(p["train_flops"] for p in ps) / len(ps),
                    "wall_s_per_run": sum(p["wall_s"] for p in ps) / len(ps)})
    return out


def auto_summary(study: str, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per row of the study with cascade scores: the calibrated points over seeds (threshold, accuracy,
    mean tokens, budget histogram, FLOPs) and the sweep over thresholds averaged over seeds."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        for s, row in rec["rows"]:
            if s == study and "auto" in rec:
                rows.setdefault(row, []).append(rec["auto"])
    out = {}
    for row, autos in rows.items():
        acc = [a["point"]["accuracy"] for a in autos]
        mean, std = mean_std(acc)
        hist: dict[str, int] = {}
        for a in autos:
            for m, k in a["point"]["histogram"].items():
                hist[m] = hist.get(m, 0) + k
        by_t: dict[float, list[dict[str, Any]]] = {}
        for a in autos:
            for p in a["sweep"]:
                by_t.setdefault(p["threshold"], []).append(p)
        out[row] = {"n": len(autos), "thresholds": [a["threshold"] for a in autos], "mean": mean, "std": std,
                    "llm_vision_tokens": sum(a["point"]["llm_vision_tokens"] for a in autos) / len(autos),
                    "flops": sum(a["point"]["flops"] for a in autos) / len(autos), "histogram": hist,
                    "sweep": [{"threshold": t, "accuracy": sum(p["accuracy"] for p in ps) / len(ps),
                               "mean_vision_tokens": sum(p["mean_vision_tokens"] for p in ps) / len(ps),
                               "n": len(ps)} for t, ps in sorted(by_t.items())]}
    return out


def plot_auto(study: str, points: Sequence[dict[str, Any]], auto: dict[str, Any], out: Path) -> str:
    """`<study>_auto.png`: accuracy vs mean LLM vision tokens of each row's cascade as the threshold varies
    (seed means), its calibrated point, the fixed-budget models and the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=_figsize(len(auto) + 2))
    colors = _colors(plt, list(auto))
    for row, a in auto.items():
        ax.plot([p["mean_vision_tokens"] for p in a["sweep"]], [100 * p["accuracy"] for p in a["sweep"]],
                marker=".", color=colors[row], label=f"{row}: cascade, threshold swept")
        ax.errorbar([a["llm_vision_tokens"]], [100 * a["mean"]], yerr=[100 * a["std"]], marker="*", markersize=12,
                    color=colors[row], capsize=3, linestyle="none")
    for p in points:
        if p["row"].startswith("fixed") or p["row"] == ORACLE:
            ax.errorbar([p["llm_vision_tokens"]], [100 * p["mean"]], yerr=[100 * p["std"]], capsize=3,
                        marker="s" if p["row"] != ORACLE else "D", linestyle="none", color="black" if
                        p["row"] != ORACLE else "gray", label=p["row"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean LLM vision tokens per question")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("num_vision_tokens=auto: accuracy vs mean tokens (stars: calibrated thresholds)", fontsize=9)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(auto) + 2)
    name = f"{study}_auto.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def verdict(claim: Claim, points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether our numbers show the claim's ordering ("holds" / "does not hold" / "missing")."""
    table = {(p["row"], p["budget"]): p for p in points}
    need = [claim.a, claim.b] + ([claim.c, claim.d] if claim.c else [])
    if any(k not in table for k in need):
        return {"verdict": "missing", "ours": "", "diff": None}
    a, b = table[claim.a], table[claim.b]
    spread = math.sqrt(a["std"] ** 2 + b["std"] ** 2)
    if claim.c:
        c, d = table[claim.c], table[claim.d]
        lhs, rhs = a["mean"] - b["mean"], c["mean"] - d["mean"]
        holds = lhs > rhs
        ours = f"{100 * lhs:+.1f} vs {100 * rhs:+.1f} points"
        diff = lhs - rhs
        spread = math.sqrt(spread ** 2 + c["std"] ** 2 + d["std"] ** 2)
    else:
        diff = a["mean"] - b["mean"]
        ours = f"{_pct(a)} vs {_pct(b)}"
        holds = {">": diff > 0, ">=": diff >= 0}.get(claim.relation, diff >= -max(MATCH_TOLERANCE, spread))
    note = ""
    if claim.relation == ">" and abs(diff) <= spread:
        note = " (within the seed spread)"
    return {"verdict": ("holds" if holds else "does not hold") + note, "ours": ours, "diff": diff}


def _pct(p: dict[str, Any]) -> str:
    return f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}"


# ----------------------------------------------------------------------------- report

LEGEND_INSIDE = 6  # legend entries that fit inside the axes; more go beside the plot (a wider figure)


def _figsize(entries: int) -> tuple[float, float]:
    return (6.4, 4.2) if entries <= LEGEND_INSIDE else (11.0, 4.8)


def _colors(plt: Any, keys: Sequence[str]) -> dict[str, Any]:
    """A distinct colour per key: tab10, or tab20 beyond 10 keys (the default cycle repeats after 10)."""
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def _legend(ax: Any, entries: int) -> None:
    if entries <= LEGEND_INSIDE:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def plot_study(study: str, points: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """`<study>_tokens.png` and `<study>_flops.png`: accuracy vs x, one line per method, std error bars; a
    row's adaptive point (`auto`) is a star in its method's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    methods: dict[str, list[dict[str, Any]]] = {}
    adaptive: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if p["budget"] == AUTO:
            adaptive.setdefault(p["method"].removesuffix(AUTO_METHOD), []).append(p)
        else:
            methods.setdefault(p["method"], []).append(p)
    colors = _colors(plt, list(methods))
    for key, label, log_base in (("llm_vision_tokens", "LLM vision tokens per image", 2),
                                 ("flops", "FLOPs per example (analytic matmuls, one image-question)", 10)):
        fig, ax = plt.subplots(figsize=_figsize(len(methods)))
        for method, ps in methods.items():
            ps = sorted(ps, key=lambda p: p[key])
            ax.errorbar([p[key] for p in ps], [100 * p["mean"] for p in ps], yerr=[100 * p["std"] for p in ps],
                        marker="o" if len(ps) > 1 else "s", capsize=3, label=method, color=colors[method],
                        linestyle="-" if len(ps) > 1 else "none")
            for p in adaptive.get(method, []):
                ax.errorbar([p[key]], [100 * p["mean"]], yerr=[100 * p["std"]], marker="*", markersize=11,
                            capsize=3, color=colors[method], linestyle="none")
        ax.set_xscale("log", base=log_base)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out exact match (%)")
        title = STUDY_TITLES[study] + (" (stars: num_vision_tokens=auto)" if adaptive else "")
        ax.set_title("\n".join(textwrap.wrap(title, 75)), fontsize=9)  # titles outgrow the axes
        ax.grid(True, alpha=0.3)
        _legend(ax, len(methods))
        name = f"{study}_{'tokens' if key == 'llm_vision_tokens' else 'flops'}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names


def study_command(study: str, seeds: int, quick: bool, out: Path) -> str:
    parts = ["python experiments/paper_trends/run.py", f"--study {study}", f"--seeds {seeds}"]
    if quick:
        parts.append("--quick")
    if out.resolve() != DEFAULT_OUT:
        parts.append(f"--out {out}")
    return " ".join(parts)


def _fmt_flops(f: float) -> str:
    return f"{f / 1e6:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """results.md: per study the command, the table, the paper's orderings with verdicts, the plots."""
    s = report["settings"]
    lines = ["# The paper's trends at small scale", "",
             "LLaVA-Mini's ablations (arXiv 2501.03895) re-run with a 300k-parameter model "
             "on the synthetic `grid_shapes` task (`mmlm.data.synth`: 6-12 shapes on a 4x4 grid, one 16 px ViT "
             "patch per cell; questions on one cell's colour or shape, counts per colour, existence). "
             "Accuracy is greedy exact match on every question of the held-out split "
             f"({s['questions']} questions), mean ± sample std over seeds. "
             "FLOPs per example: analytic matmul FLOPs of one image-question prefill (`mmlm bench flops`, "
             f"{s['text_tokens']} text tokens). Configs: `configs/experiments/`.", ""]
    if s["quick"]:
        lines += ["**Quick mode** (`--quick`): a few training steps on a few images; the numbers only show that "
                  "the pipeline runs, they are not results.", ""]
    lines += [f"Runs: {s['runs_finished']} of {s['runs_planned']} finished; wall time of the finished runs "
              f"{report['wall_time_s'] / 3600:.2f} h ({report['wall_time_s']:.0f} s); generated {s['generated']}; "
              f"machine: {s['machine']}.", ""]
    fd = report["runs"].get(FOUNDATION)
    if fd:
        acc = ", ".join(f"{100 * p['accuracy']:.1f}% at {m} tokens" for m, p in fd["points"].items())
        cats = ", ".join(f"{c} {100 * v:.1f}" for c, v in next(iter(fd["points"].values()))["by_category"].items())
        lines += ["## The shared foundation", "",
                  "Every row starts from one foundation, the analogue of the paper's pretrained CLIP ViT and LLM: "
                  "a LLaVA-1.5-style model (all 16 patch tokens to the LLM) trained from scratch on grid_shapes "
                  f"(`configs/experiments/foundation.py`, {fd['steps']} steps, seed 0). Its vision tower (frozen "
                  "in the rows, as CLIP in LLaVA-Mini's stage 2), projector and LLM initialise each row, and its "
                  "LLM blocks the row's pre-fusion blocks (block i from LLM block i mod 2); the compressor starts "
                  "fresh. The foundation itself scores "
                  f"{acc} ({cats}); it took {fd['wall_s']:.0f} s.", "",
                  "How this setup was found (the ViT pretraining with position heads, the frozen ViT, the "
                  "pre-fusion copied from the LLM) and every variant that did not learn the cell questions: "
                  "`experiments/demo_learning/results.md`, from the section \"The paper-trends foundation\".", ""]
    for study, st in report["studies"].items():
        if not st["points"]:
            lines += [f"## {STUDY_TITLES[study]}", "", "No finished runs yet; to run them:", "", "```",
                      st["command"], "```", ""]
            continue
        lines += [f"## {STUDY_TITLES[study]}", "", STUDY_SETUP[study], "",
                  "Reproduce this section (table and plots):", "", "```", st["command"], "```", "",
                  f"Wall time of its runs: {st['wall_time_s']:.0f} s ({st['runs']} runs; runs shared with another "
                  "study count in both).", ""]
        if "runs_planned" in st:
            lines += [f"**{st['runs']} of its {st['runs_planned']} planned runs have finished** (the column `n` "
                      "gives the seeds behind each point; a row with fewer than 3 did not get all its runs).", ""]
        head = "| row | method | LLM vision tokens | MFLOPs / example | train TFLOP | accuracy (%) | n | " + \
            " | ".join(CATEGORIES) + " | s / run |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for p in st["points"]:
            cats = " | ".join(f"{100 * p['by_category'][c]:.1f}" if c in p["by_category"] else ""
                              for c in CATEGORIES)
            budget = "" if p["row"] == ORACLE else f"@{p['budget']}"
            lines.append(f"| {p['row']}{budget} | {p['method']} | {p['llm_vision_tokens']:.3g} | "
                         f"{_fmt_flops(p['flops'])} | {p['train_flops'] / 1e12:.2f} | {100 * p['mean']:.1f} ± {100 * p['std']:.1f} | {p['n']} | "
                         f"{cats} | {p['wall_s_per_run']:.0f} |")
        lines += ["", "The paper's orderings, row by row:" if "runs_planned" not in st else "The goal, row by row:", "",
                  "| ordering | the paper | ours | verdict |", "|---|---|---|---|"]
        for c in st["claims"]:
            lines.append(f"| {c['text']} | {c['paper']} | {c['ours']} | {c['verdict']} |")
        lines += ["", f"![accuracy vs tokens]({study}_tokens.png) ![accuracy vs FLOPs]({study}_flops.png)", ""]
        if "runs_planned" in st:
            lines += acceptance_markdown(st)
        if st.get("auto"):
            lines += auto_markdown(study, st)
    return "\n".join(lines) + "\n"


def acceptance_markdown(st: dict[str, Any]) -> list[str]:
    """The budget study's goal, computed: per recipe row its gaps to fixed1 at 1 token and fixed16 at 16
    tokens (within 2 points is the goal), seeds behind them and its training FLOPs over fixed16's."""
    table = {(p["row"], p["budget"]): p for p in st["points"]}
    if ("fixed1", 1) not in table or ("fixed16", 16) not in table:
        return []
    f1, f16 = table[("fixed1", 1)], table[("fixed16", 16)]
    lines = ["The goal: one model within 2 points of fixed1 at 1 token and of fixed16 at 16 tokens, at the "
             "fixed rows' 1,200 steps and at most 1.5x fixed16's training FLOPs, over 3 seeds.", "",
             "| row | seeds | 1 token vs fixed1 (points) | 4 tokens vs fixed4 | 16 tokens vs fixed16 | train FLOPs / "
             "fixed16's | goal |", "|---|---|---|---|---|---|---|"]
    f4 = table.get(("fixed4", 4))
    for row in dict.fromkeys(p["row"] for p in st["points"]):
        a, b = table.get((row, 1)), table.get((row, 16))
        if row.startswith("fixed") or row == ORACLE or a is None or b is None:
            continue
        c = table.get((row, 4))
        d1, d16 = 100 * (a["mean"] - f1["mean"]), 100 * (b["mean"] - f16["mean"])
        d4 = f"{100 * (c['mean'] - f4['mean']):+.1f}" if c and f4 else ""
        ratio = a["train_flops"] / f16["train_flops"] if f16["train_flops"] else float("nan")
        met = d1 >= -2 and d16 >= -2 and ratio <= 1.5
        goal = ("met" if met else "not met") + ("" if a["n"] >= 3 else f" ({a['n']} seed{'s' if a['n'] > 1 else ''})")
        lines.append(f"| {row} | {a['n']} | {d1:+.1f} | {d4} | {d16:+.1f} | {ratio:.2f} | {goal} |")
    return lines + [""]


def auto_markdown(study: str, st: dict[str, Any]) -> list[str]:
    """The cascade's table: per row the calibrated thresholds, accuracy, mean tokens, budgets used, and
    whether it reaches fixed16's accuracy at no more than 4 vision tokens on average."""
    f16 = next((p for p in st["points"] if (p["row"], p["budget"]) == ("fixed16", 16)), None)
    lines = ["`num_vision_tokens=auto` (`mmlm.infer.cascade`): each question is answered at the smallest "
             "budget whose first answer token has a probability at or above the threshold (else at 16 tokens); "
             f"the threshold is calibrated per run on the first {AUTO_CALIBRATION_QUESTIONS} questions of the "
             "training split (disjoint from the scored val questions), as the one with the fewest mean tokens "
             "within 1 point of the best calibration accuracy. FLOPs: prefill of every budget tried, the vision "
             "tower once.", "",
             "| row | thresholds (per seed) | accuracy (%) | n | mean LLM vision tokens | questions at 1 / 4 / 16 "
             "| MFLOPs / question | fixed16's accuracy at <= 4 tokens | best swept threshold at <= 4 tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, a in st["auto"].items():
        hist = " / ".join(str(a["histogram"].get(str(m), 0)) for m in ORACLE_BUDGETS)
        ok = "missing" if f16 is None else (
            "holds" if a["mean"] >= f16["mean"] and a["llm_vision_tokens"] <= 4 else "does not hold")
        cheap = [p for p in a["sweep"] if p["mean_vision_tokens"] <= 4]
        best = max(cheap, key=lambda p: p["accuracy"]) if cheap else None
        best_text = (f"{100 * best['accuracy']:.1f}% at {best['mean_vision_tokens']:.2f} tokens (threshold "
                     f"{best['threshold']:g})") if best else "none"
        lines.append(f"| {row} | {', '.join(f'{t:g}' for t in a['thresholds'])} | {100 * a['mean']:.1f} ± "
                     f"{100 * a['std']:.1f} | {a['n']} | {a['llm_vision_tokens']:.2f} | {hist} | "
                     f"{_fmt_flops(a['flops'])} | {ok} | {best_text} |")
    return lines + ["", "The last column picks the threshold on the scored questions themselves (seed means of the "
                    "sweep): an upper bound for this confidence signal, not a calibrated result.", "",
                    f"![accuracy vs mean tokens]({study}_auto.png)", "",
                    "A learned budget head against this cascade, on the runs whose checkpoints were kept: "
                    "[budget_head.md](budget_head.md) (`experiments/paper_trends/budget_head.py`).", ""]


def _relative_paths(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """The run record with its questions file relative to OUT (results.json stays valid when OUT moves)."""
    q = Path(record["questions"])
    if q.is_absolute() and q.resolve().is_relative_to(out.resolve()):
        return {**record, "questions": str(q.resolve().relative_to(out.resolve()))}
    return record


def build_report(studies: Sequence[str], plan: Sequence[Run], records: dict[str, dict[str, Any]], out: Path,
                 seeds: int, quick: bool) -> dict[str, Any]:
    """results.json content; also writes results.md and the plots."""
    import platform

    finished = [records[r.name] for r in plan if r.name in records]
    report: dict[str, Any] = {
        "settings": {"studies": list(studies), "seeds": seeds, "quick": quick,
                     "runs_planned": len(plan), "runs_finished": len(finished),
                     "questions": max((p["count"] for rec in finished for p in rec["points"].values()), default=0),
                     "text_tokens": finished[0]["text_tokens"] if finished else None,
                     "generated": datetime.datetime.now().isoformat(timespec="seconds"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"},
        "wall_time_s": sum(r["wall_s"] for r in finished),
        "studies": {}, "runs": {r["name"]: _relative_paths(r, out) for r in finished},
    }
    for study in studies:
        recs = [r for r in finished if any(s == study for s, _ in r["rows"])]
        points = study_points(study, recs)
        claims = [{**dataclasses.asdict(c), **verdict(c, points)} for c in CLAIMS[study]]
        report["studies"][study] = {
            "command": study_command(study, seeds, quick, out), "points": points, "claims": claims,
            "runs": len(recs), "wall_time_s": sum(r["wall_s"] for r in recs),
            "plots": plot_study(study, points, out) if points else []}
        if study == AUTO_STUDY:
            auto = auto_summary(study, recs)
            report["studies"][study]["auto"] = auto
            report["studies"][study]["runs_planned"] = sum(any(s == study for s, _ in r.rows) for r in plan)
            if auto:
                report["studies"][study]["plots"].append(plot_auto(study, points, auto, out))
    _write_json_atomic(out / RESULTS_JSON, report)
    from mmlm.safe_io import write_text_atomic

    write_text_atomic(out / RESULTS_MD, markdown(report))  # an interrupted write leaves the old report whole
    return report


# ----------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="all",
                   help=f"a study, a comma-separated list, or 'all' (default); studies: {', '.join(STUDIES)}")
    p.add_argument("--rows", default="",
                   help="only these rows of the studies (comma-separated, e.g. largest,fixed16); default: every row")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3; 1 with --quick)")
    p.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT}; with --quick a new "
                                               "temporary directory)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps on a few images per row, every study, 1 seed: checks the pipeline in minutes")
    p.add_argument("--report_only", action="store_true",
                   help="no training: tables and plots from the runs that have finished")
    return p


def parse_studies(text: str) -> list[str]:
    from mmlm.errors import UserError

    names = list(STUDIES) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STUDIES]
    if unknown or not names:
        raise UserError(f"--study {text!r}: unknown study {unknown}; choose from {list(STUDIES)} or 'all'")
    return names


def _configure_jax(out: Path, quick: bool) -> None:
    """Before jax starts: CPU, XLA's persistent compilation cache under OUT (the seeds of a row compile
    once), and with --quick no LLVM optimisation and XLA:CPU's loop emitters instead of its MLIR fusion
    emitters: compiling dominates --quick, which takes 173 s this way and 265 s with the fusion emitters."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if quick:
        for flag, value in QUICK_XLA_FLAGS.items():
            if flag not in os.environ.get("XLA_FLAGS", ""):  # a flag the caller set wins
                os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={value}".strip()
    import jax

    jax.config.update("jax_compilation_cache_dir", str(out / "jit_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    for name in ("absl", "orbax", "grain", "jax._src", "tensorflow", "etils", "mmlm"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mmlm.errors import UserError

    try:
        studies = parse_studies(args.study)
        seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        if seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {seeds}")
        if args.out:
            out = Path(args.out)
        elif args.quick:
            import tempfile

            out = Path(tempfile.mkdtemp(prefix="paper_trends_quick_"))
        else:
            out = DEFAULT_OUT
        out.mkdir(parents=True, exist_ok=True)
        _configure_jax(out, args.quick)
        # The report covers every study whose runs are in OUT (a run of one study does not drop the others).
        plan = make_plan(STUDIES, seeds, out, args.quick)
        wanted = {(s, r) for s in studies for r in study_module(s).ROWS}
        if args.rows:
            names = {r.strip() for r in args.rows.split(",") if r.strip()}
            unknown = sorted(names - {r for _, r in wanted})
            if unknown:
                raise UserError(f"--rows {args.rows!r}: {unknown} are not rows of {', '.join(studies)}; rows: "
                                f"{', '.join(sorted({r for _, r in wanted}))}")
            wanted = {(s, r) for s, r in wanted if r in names}
        records = finished_records(plan, out)
        todo = [r for r in plan if r.name not in records and (r.name == FOUNDATION or set(r.rows) & wanted)]
        if not args.report_only and todo and todo[0].name != FOUNDATION and not foundation_available(out):
            # Its record came from results.json, its weights are gone (a fresh checkout): train it again.
            del records[FOUNDATION]
            todo.insert(0, plan[0])
        print(f"paper trends: {len(todo)} runs to do for {', '.join(studies)}, {seeds} seed(s)"
              f"{' (quick)' if args.quick else ''}; {len(records)} of all {len(plan)} runs finished -> {out}",
              flush=True)
        # One seed of every row first: a study cut short has every row, with fewer seeds.
        todo.sort(key=lambda r: (r.name != FOUNDATION, r.seed))
        if not args.report_only:
            run_all(todo, records, out, len(records), len(records) + len(todo))
        report = build_report(STUDIES, plan, records, out, seeds, args.quick)
    except UserError as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 130
    print(f"wrote {out / RESULTS_MD}, {out / RESULTS_JSON} and "
          f"{sum(len(s['plots']) for s in report['studies'].values())} plots "
          f"({report['settings']['runs_finished']}/{len(plan)} runs finished)", flush=True)
    return 0


def run_all(todo: Sequence[Run], records: dict[str, dict[str, Any]], out: Path, done: int, total: int) -> None:
    """Trains and scores the unfinished runs, one progress line each."""
    from tqdm import tqdm

    foundation = next((r for r in todo if r.name == FOUNDATION), None)
    if foundation is None and FOUNDATION in records:
        export_foundation(Run(FOUNDATION, 0, [], None, "", ""), out)  # finished earlier; exported unless killed
    start = time.time()
    bar = tqdm(todo, desc="runs", unit="run", file=sys.stdout, dynamic_ncols=True)
    for i, run in enumerate(bar):
        bar.set_postfix_str(run.name)
        t = time.time()
        records[run.name] = rec = execute(run, out)
        if run.name == FOUNDATION:
            export_foundation(run, out)
        accs = ", ".join(f"@{m} {100 * p['accuracy']:.1f}%" for m, p in rec["points"].items())
        bar.write(f"[{done + i + 1}/{total}] {run.name}: {accs}; {time.time() - t:.0f} s (train {rec['train_s']:.0f}, "
                  f"eval {rec['eval_s']:.0f}); elapsed {datetime.timedelta(seconds=round(time.time() - start))}")
    bar.close()


if __name__ == "__main__":
    sys.exit(main())
