"""experiments/paper_trends/run.py --quick: every study's table, orderings and plots come out well formed.

The quick run trains every row for a few steps on a few images, so its accuracies mean nothing; this
checks the pipeline (plan, foundation, training, scoring, oracle, aggregation, report, resume), not the
numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "experiments" / "paper_trends" / "run.py"
STUDIES = ("matryoshka", "prefusion", "resolution", "pooling", "budget")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(out: Path, *args: str, timeout: float = 900, quick: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(RUN), *(["--quick"] if quick else []), "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_trends")
    start = time.perf_counter()
    proc = _run(out)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"run.py --quick: {seconds:.0f} s")
    return out, proc, seconds


def test_every_study_has_its_table_orderings_and_plots(quick):
    out, proc, _ = quick
    report = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert list(report["studies"]) == list(STUDIES)
    assert report["settings"]["runs_finished"] == report["settings"]["runs_planned"]
    for study in STUDIES:
        st = report["studies"][study]
        rows = {p["row"] for p in st["points"]}
        expected = set(_rows(study)) | ({"oracle"} if study in ("matryoshka", "budget") else set())
        assert rows == expected, study
        for p in st["points"]:
            assert 0.0 <= p["mean"] <= 1.0 and p["std"] == 0.0 and p["n"] == 1  # one seed in quick mode
            assert p["train_flops"] > 0
            assert p["llm_vision_tokens"] >= 1 and p["flops"] > 0
        assert st["claims"] and all(c["verdict"].startswith(("holds", "does not hold")) for c in st["claims"])
        assert st["plots"] == [f"{study}_tokens.png", f"{study}_flops.png"] + (
            ["budget_auto.png"] if study == "budget" else [])
        for name in st["plots"]:
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
            assert f"({name})" in md
        # The command that reproduces the section is printed above its table.
        section = md.split(f"```\n{st['command']}\n```")
        assert len(section) == 2 and "| row | method |" in section[1].split("## ")[0], study
    # Budgets scored per row: the nested models at 1, 2, 4, 8, 16; a fixed model at its one budget.
    mat = {(p["row"], p["budget"]) for p in report["studies"]["matryoshka"]["points"]}
    assert {("matryoshka", m) for m in (1, 2, 4, 8, 16)} <= mat and ("fixed4", 4) in mat
    assert report["runs"]["foundation"]["points"]["16"]["count"] > 0
    # The budget study's Matryoshka recipes are also scored with the calibrated cascade (num_vision_tokens=auto).
    budget = report["studies"]["budget"]
    auto = {p["row"]: p for p in budget["points"] if p["budget"] == "auto"}
    assert set(auto) == set(_rows("budget")) - {"fixed1", "fixed4", "fixed16"}  # every Matryoshka recipe
    assert all(1 <= p["llm_vision_tokens"] <= 16 for p in auto.values())
    assert set(budget["auto"]) == set(auto) and "| fixed16's accuracy at <= 4 tokens |" in md
    for name, rec in report["runs"].items():
        if "auto" in rec:  # calibrated on training questions, never the scored ones
            assert rec["auto"]["calibration"] == "train_questions.jsonl" and 0 < rec["auto"]["threshold"] < 1


def test_shared_rows_train_once_and_a_rerun_skips_finished_runs(quick):
    out, _, _ = quick
    report = json.loads((out / "results.json").read_text())
    runs = report["runs"]
    # pooling's query rows are the Matryoshka study's fixed-budget rows: one run serves both.
    assert ["pooling", "query_t1"] in runs["matryoshka-fixed1-s0"]["rows"]
    assert not any(name.startswith("pooling-query") for name in runs)
    for rec in runs.values():
        assert (out / "runs" / rec["name"] / "run.json").is_file()
        assert (out / "runs" / rec["name"] / "eval" / "metrics.json").is_file()
    oracle = runs["matryoshka-matryoshka-s0"]["oracle"]
    best = max(runs["matryoshka-matryoshka-s0"]["points"][str(m)]["accuracy"] for m in (1, 4, 16))
    assert oracle["accuracy"] >= best and 1 <= oracle["llm_vision_tokens"] <= 16
    before = (out / "results.json").stat().st_mtime
    proc = _run(out, "--study", "pooling", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 runs to do" in proc.stdout  # every run of the study (and the foundation) had finished
    assert (out / "results.json").stat().st_mtime > before


def test_results_json_alone_stands_for_the_finished_runs(quick, tmp_path):
    """A fresh checkout has results.json but no runs/: the report rebuilds from it, and a missing run
    trains alone (with the foundation again, whose weights it needs)."""
    out, _, _ = quick
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(out / "results.json", fresh / "results.json")
    # The quick run's compiled programs (XLA's persistent cache): the retrained runs compile nothing new.
    shutil.copytree(out / "jit_cache", fresh / "jit_cache")
    proc = _run(fresh, "--report_only", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 runs to do" in proc.stdout
    old, new = (json.loads((d / "results.json").read_text()) for d in (out, fresh))
    for study in STUDIES:
        assert new["studies"][study]["points"] == old["studies"][study]["points"], study
    del new["runs"]["matryoshka-fixed4-s0"]  # pooling's query_t4 row
    (fresh / "results.json").write_text(json.dumps(new))
    proc = _run(fresh, "--study", "pooling", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 runs to do" in proc.stdout  # the row and the foundation
    assert (fresh / "runs" / "foundation" / "run.json").is_file()
    assert (fresh / "runs" / "matryoshka-fixed4-s0" / "run.json").is_file()
    assert not (fresh / "runs" / "matryoshka-fixed1-s0").exists()  # recorded: not trained again


def test_the_committed_results_stand_for_every_run_in_any_checkout(tmp_path):
    """The repository's results.json was recorded in another checkout: every run still counts as finished
    (no path of that checkout in the fingerprints), so --report_only rebuilds the same tables."""
    committed = REPO / "experiments" / "paper_trends" / "results.json"
    shutil.copy(committed, tmp_path / "results.json")
    proc = _run(tmp_path, "--report_only", timeout=300, quick=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old, new = (json.loads(p.read_text()) for p in (committed, tmp_path / "results.json"))
    # Every recorded run counts (a study cut short by its deadline leaves runs to do; results.md says so).
    done, planned = old["settings"]["runs_finished"], old["settings"]["runs_planned"]
    assert f"{planned - done} runs to do" in proc.stdout and new["settings"]["runs_finished"] == done
    for study, st in old["studies"].items():  # all but the printed command, which names the other --out
        assert {**new["studies"][study], "command": st["command"]} == st, study


def test_the_tokenizer_path_counts_relative_to_the_repository():
    sys.path.insert(0, str(RUN.parent))
    import run as runner

    inside = runner.REPO / "data" / "tiny_tokenizer.model"
    assert runner.repo_relative(str(inside)) == "data/tiny_tokenizer.model"
    assert runner.repo_relative("/elsewhere/t.model") == "/elsewhere/t.model"
    config = runner.load_spec(f"{runner.CONFIG_DIR}/matryoshka.py:matryoshka", 0, Path("data"), False, None)
    fp = runner.config_fingerprint(config)
    config.data.tokenizer = "data/tiny_tokenizer.model"
    assert runner.config_fingerprint(config) == fp
    config.data.tokenizer = "/elsewhere/t.model"
    assert runner.config_fingerprint(config) != fp


def test_a_knob_added_at_its_old_value_keeps_the_fingerprint():
    sys.path.insert(0, str(RUN.parent))
    import run as runner

    config = runner.load_spec(f"{runner.CONFIG_DIR}/matryoshka.py:matryoshka", 0, Path("data"), False, None)
    assert config.train.matryoshka_loss == "sample"
    fp = runner.config_fingerprint(config)
    del config.train["matryoshka_loss"]  # a config from before the knob
    assert runner.config_fingerprint(config) == fp
    config.train.matryoshka_loss = "all"
    assert runner.config_fingerprint(config) != fp


def test_quick_run_time(quick):
    """The acceptance bound of --quick is 5 minutes on the 2-core CPU; a loaded machine gets some slack."""
    _, _, seconds = quick
    assert seconds < 900


def _rows(study: str) -> list[str]:
    sys.path.insert(0, str(REPO))
    from mmlm.config_utils import load_config_module

    return list(load_config_module(str(REPO / "configs" / "experiments" / f"{study}.py")).ROWS)


def test_every_recorded_run_has_its_training_flops_and_the_budget_rows_cost_at_most_1_5x_fixed16():
    sys.path.insert(0, str(RUN.parent))
    import run as runner
    from mmlm.train.recipe import train_run_flops

    runs = json.loads((REPO / "experiments" / "paper_trends" / "results.json").read_text())["runs"]
    assert all(rec["train_flops"] > 0 for rec in runs.values())
    spec = lambda s, r: runner.load_spec(f"{runner.CONFIG_DIR}/{s}.py:{r}", 0, Path("data"), False, None)
    fixed16 = train_run_flops(spec("matryoshka", "fixed16"))
    assert runs["matryoshka-fixed16-s0"]["train_flops"] == pytest.approx(fixed16)
    assert runs["matryoshka-matryoshka_all-s0"]["train_flops"] > 2.5 * fixed16  # M3: every budget each step
    for row in _rows("budget"):
        config = spec("budget", row)
        assert int(config.train.steps) == 1200 and train_run_flops(config) <= 1.5 * fixed16, row
