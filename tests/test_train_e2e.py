"""`mmlm train` end to end on the tiny config: exact resume, sharding, multi-host, mesh changes, preemption.

Every run is a subprocess (device counts are fixed when JAX starts). The runs
share one synthetic dataset and a persistent XLA compilation cache (so a
program compiled by one run is reused by the next), and compile with LLVM
optimisation off: these tests check equalities between runs, not speed. Runs
that need no process of their own (no signal, no second process) are `mmlm
train` commands of one process per device count, one after another, each with
its own output and exit status (`cli_helpers.run_commands`), so that JAX starts
once for them: `single_runs` (1 device) and `mesh_runs` (8 devices).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_commands

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
# Deterministic metrics: everything but timings.
KEYS = ("loss", "token_accuracy", "grad_norm", "lr", "budget", "supervised_tokens")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A dataset cache and a compilation cache shared by every run of this module."""
    root = tmp_path_factory.mktemp("train_e2e")
    return {"data": root / "data", "jit": root / "jit_cache", "root": root}


def _env(shared, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"  # conftest's
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(shared["jit"])
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(shared, workdir: Path, *overrides: str, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "mmlm.cli", "train", "--config", str(REPO / "configs/tiny.py"),
            "--workdir", str(workdir), f"--config.synthetic.cache_dir={shared['data']}",
            f"--config.train.steps={steps}", "--config.train.checkpoint_every=5",
            "--config.eval.every=-1", *overrides, *extra]


def command(name: str, shared, workdir: Path, *overrides: str, steps: int = STEPS, extra: tuple[str, ...] = (),
            copy: tuple = ()) -> dict:
    """One `mmlm train` entry for `cli_helpers.run_commands`."""
    return {"name": name, "args": _cmd(shared, workdir, *overrides, steps=steps, extra=extra)[3:], "copy": copy}


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"mmlm train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def rows(workdir: Path, kind: str = "train") -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        out = [json.loads(line) for line in f if line.strip()]
    return [r for r in out if ("loss" in r) == (kind == "train")]


def losses(workdir: Path) -> np.ndarray:
    r = rows(workdir)
    assert [x["step"] for x in r] == list(range(1, len(r) + 1))
    return np.array([x["loss"] for x in r])


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    """The latest checkpoint's params, as eval/chat load them (`load_params_from_workdir`)."""
    import jax

    from mmlm.checkpoint import load_params_from_workdir

    params, _ = load_params_from_workdir(str(workdir))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_params_close(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


# ------------------------------------------------------------------ the 1-device runs of one process

FINAL_EVAL = ("--config.eval.every=0", "--config.eval.num_questions=0", "--config.eval.loss_batches=2",
              "--config.data.eval_batch_size=5")
VISION_PRETRAIN = ("--config.train.vision_pretrain.steps=5", "--config.train.vision_pretrain.num_images=32",
                   "--config.train.vision_pretrain.eval_images=8")


@pytest.fixture(scope="module")
def init_checkpoints(shared):
    """Partial model checkpoints for --init_from (e.g. a converted CLIP): random vision weights that fit the
    tiny model (`good`), and the same with one array of a wrong shape (`bad`)."""
    import jax

    from mmlm.checkpoint import save_model
    from mmlm.config_utils import load_config
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.summary import abstract_params

    config = load_config(str(REPO / "configs/tiny.py"))
    shapes = abstract_params(model_config_from_dict(config.model))
    rng = np.random.default_rng(0)
    vision = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes["vision"])
    root = shared["root"] / "init_checkpoints"
    save_model(str(root / "good"), {"vision": vision}, config)
    bad = dict(vision, class_embedding=np.zeros(7, np.float32))
    save_model(str(root / "bad"), {"vision": bad}, config)
    return {"vision": vision, "good": root / "good", "bad": root / "bad"}


INTERRUPTS = {"killed": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}


@pytest.fixture(scope="module")
def interrupted(shared):
    """The 60-step run in a process of its own, interrupted by each signal once its first checkpoint is
    committed (workdir resume_NAME): {NAME: (process, its output, the steps committed when it ended)}."""
    out = {}
    for name, sig in INTERRUPTS.items():
        work = shared["root"] / f"resume_{name}"
        try:
            proc, text = interrupt(shared, work, sig)
        except AssertionError as e:  # failed by that signal's test alone (`interruption`)
            out[name] = e
            continue
        out[name] = (proc, text, committed(work))
    return out


def interruption(interrupted, name: str) -> tuple[subprocess.Popen, str, list[int]]:
    if isinstance(interrupted[name], AssertionError):
        raise interrupted[name]
    return interrupted[name]


@pytest.fixture(scope="module")
def single_runs(shared, init_checkpoints, interrupted):
    """The 1-device runs of the tests below, as commands of one process: {name: CompletedProcess}. The
    interrupted runs are resumed there with the same command (`resume_NAME`)."""
    root = shared["root"]
    commands = [
        command("resume_ref", shared, root / "resume_ref", *RESUME, steps=RESUME_STEPS),
        *(command(f"resume_{name}", shared, root / f"resume_{name}", *RESUME, steps=RESUME_STEPS)
          for name in INTERRUPTS),
        command("one", shared, root / "mesh_one", *FINAL_EVAL),
        command("buckets", shared, root / "buckets", *FINAL_EVAL, "--config.data.length_buckets=(8,16,24)"),
        command("frame_buckets", shared, root / "frame_buckets", "--config.synthetic.kind=moving_shapes",
                "--config.synthetic.num_train=16", "--config.synthetic.num_eval=8", "--config.data.max_frames=8",
                "--config.data.video_fps=0.5", "--config.data.frame_buckets=(4,)", steps=3),
        command("init_from", shared, root / "init_from", steps=2, extra=("--init_from", str(init_checkpoints["good"]))),
        command("init_bad", shared, root / "init_bad", steps=2, extra=("--init_from", str(init_checkpoints["bad"]))),
        command("vision_pretrain", shared, root / "vision_pretrain", *VISION_PRETRAIN, steps=5),
        # the same command with 8 steps, in a copy of the first one's workdir (which keeps its results.json)
        command("vision_pretrain_resumed", shared, root / "vision_pretrain_resumed", *VISION_PRETRAIN, steps=8,
                copy=[(root / "vision_pretrain", root / "vision_pretrain_resumed", [])]),
        dict(command("nan", shared, root / "nan", "--config.data.pixels_on_device=false"), prelude=POISON),
    ]
    procs = run_commands(commands, _env(shared, 1), REPO, root / "single_runs")
    return {c["name"]: p for c, p in zip(commands, procs)}


# ---------------------------------------------------------------------------- exact resume

RESUME_STEPS = 60
RESUME = ("--config.train.checkpoint_every=20", "--config.eval.every=0")


@pytest.fixture(scope="module")
def resume_ref(shared, single_runs):
    """An uninterrupted 60-step run (checkpoints every 20 steps, evaluation at the end)."""
    succeeded(single_runs["resume_ref"])
    return shared["root"] / "resume_ref"


def interrupt(shared, work: Path, sig: int) -> tuple[subprocess.Popen, str]:
    """Starts the resume run and sends `sig` once its first checkpoint (step 20) is committed."""
    proc = subprocess.Popen(_cmd(shared, work, *RESUME, steps=RESUME_STEPS), env=_env(shared, 1), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = work / "checkpoints" / "20" / "commit_success.txt"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0]
    return proc, out


def committed(work: Path) -> list[int]:
    return sorted(int(d.name) for d in (work / "checkpoints").iterdir()
                  if d.name.isdigit() and (d / "commit_success.txt").exists())


def assert_same_run(work: Path, ref: Path) -> None:
    """Same final params (bitwise) and the same metric rows (timings aside)."""
    assert_params_close(final_params(work), final_params(ref))
    for kind in ("train", "eval"):
        got, want = rows(work, kind), rows(ref, kind)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want):
            keys = KEYS if kind == "train" else [k for k in w if k.startswith("eval/")]
            assert {k: g[k] for k in keys} == {k: w[k] for k in keys}
    assert rows(ref, "eval")[-1]["eval/num_questions"] == 8
    # The synthetic data labels each question, so accuracy is also broken down by category.
    assert any(k.startswith("eval/accuracy/") for k in rows(ref, "eval")[-1])


def test_sigkill_and_rerun_resumes_exactly(shared, interrupted, single_runs, resume_ref):
    """kill -9 after a checkpoint, then the same command again: bitwise the uninterrupted run."""
    work = shared["root"] / "resume_killed"
    proc, _, done = interruption(interrupted, "killed")
    assert proc.returncode == -signal.SIGKILL
    assert done and done[-1] < RESUME_STEPS, f"killed too late to test resuming: checkpoints {done}"
    succeeded(single_runs["resume_killed"])  # the same command again
    assert_same_run(work, resume_ref)


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(shared, interrupted, single_runs, resume_ref):
    work = shared["root"] / "resume_sigterm"
    proc, out, done = interruption(interrupted, "sigterm")
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in out
    stopped = int(out.split("saved a checkpoint at step ")[1].split(";")[0])
    assert 20 <= stopped < RESUME_STEPS and done[-1] == stopped
    succeeded(single_runs["resume_sigterm"])
    assert_same_run(work, resume_ref)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(shared, interrupted, single_runs, resume_ref):
    """SIGINT (Ctrl-C) saves like SIGTERM: nothing since the last checkpoint is lost."""
    work = shared["root"] / "resume_sigint"
    proc, out, done = interruption(interrupted, "sigint")
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "SIGINT: saved a checkpoint at step" in out
    stopped = int(out.split("saved a checkpoint at step ")[1].split(";")[0])
    assert 20 <= stopped < RESUME_STEPS and done[-1] == stopped
    succeeded(single_runs["resume_sigint"])
    assert_same_run(work, resume_ref)


# ------------------------------------------------------------------------------- sharding

@pytest.fixture(scope="module")
def mesh_runs(shared, single_runs):
    """Three 10-step runs of the same config: 1 device; 8 devices fsdp=4 x tensor=2; 8 devices data=8.

    The first two end with an eval-loss pass whose batch (5 rows) the fsdp axis does not divide: the
    evaluator pads it with masked rows. The 8-device process then also resumes a copy of the fsdp=4 x
    tensor=2 run without its step 10 on data=8 (`remesh`, test_restore_a_checkpoint_onto_another_mesh).
    """
    root = shared["root"]
    succeeded(single_runs["one"])
    data8 = ("--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.mesh.tensor=1")
    commands = [
        command("fsdp4_tensor2", shared, root / "mesh_fsdp4_tensor2", "--config.mesh.data=1", "--config.mesh.fsdp=4",
                "--config.mesh.tensor=2", *FINAL_EVAL),
        command("data8", shared, root / "mesh_data8", *data8),
        command("remesh", shared, root / "remesh", *data8,  # saved on fsdp=4 x tensor=2 at step 5
                copy=[(root / "mesh_fsdp4_tensor2", root / "remesh", [f"checkpoints/{STEPS}"])]),
    ]
    procs = dict(zip(("fsdp4_tensor2", "data8", "remesh"),
                     run_commands(commands, _env(shared, 8), REPO, root / "mesh_runs")))
    for name in ("fsdp4_tensor2", "data8"):
        succeeded(procs[name])
    return {"one": root / "mesh_one", "fsdp4_tensor2": root / "mesh_fsdp4_tensor2", "data8": root / "mesh_data8",
            "remesh": (root / "remesh", procs["remesh"])}


def test_sharded_meshes_give_the_same_losses(mesh_runs):
    ref = losses(mesh_runs["one"])
    assert len(ref) == STEPS and np.all(np.isfinite(ref))
    for name in ("fsdp4_tensor2", "data8"):
        np.testing.assert_allclose(losses(mesh_runs[name]), ref, rtol=0, atol=1e-5, err_msg=name)
    assert_params_close(final_params(mesh_runs["one"]), final_params(mesh_runs["fsdp4_tensor2"]), atol=1e-5)
    (one,), (sharded,) = rows(mesh_runs["one"], "eval"), rows(mesh_runs["fsdp4_tensor2"], "eval")
    assert sharded["eval/loss"] == pytest.approx(one["eval/loss"], abs=1e-5)


def test_length_buckets_cut_padding_only(shared, single_runs, mesh_runs):
    """Batches cut to the smallest length bucket that holds them: one compiled step per length used, the
    same losses as full-length batches (only padding is cut)."""
    work = shared["root"] / "buckets"
    proc = succeeded(single_runs["buckets"])
    lengths = sorted({int(n) for n in re.findall(r"compiled the train step for (\d+)-token",
                                                  proc.stdout + proc.stderr)})
    assert lengths and lengths[0] < 32, proc.stdout[-3000:]  # tiny: max_text_len 32
    np.testing.assert_allclose(losses(work), losses(mesh_runs["one"]), rtol=0, atol=1e-5)


def test_frame_buckets_reach_the_train_step(shared, single_runs):
    """Videos (3 real frames of max_frames 8) with data.frame_buckets=(4,): the trainer compiles and runs only
    4-frame steps (that a cut batch trains like the full one: tests/test_train_unit.py)."""
    work = shared["root"] / "frame_buckets"
    proc = succeeded(single_runs["frame_buckets"])
    compiled = re.findall(r"compiled the train step for \d+-token, (\d+)-frame batches", proc.stdout + proc.stderr)
    assert compiled == ["4"], proc.stdout[-3000:]
    assert len(losses(work)) == 3 and np.isfinite(losses(work)).all()


def test_restore_a_checkpoint_onto_another_mesh(shared, mesh_runs):
    """Saved on fsdp=4 x tensor=2 at step 5, resumed on data=8: the same steps 6..10 and final params."""
    src = mesh_runs["fsdp4_tensor2"]
    work, proc = mesh_runs["remesh"]  # a copy of src with only step 5, resumed on data=8
    succeeded(proc)
    assert "steps 5->10" in proc.stdout + proc.stderr
    np.testing.assert_allclose(losses(work), losses(src), rtol=0, atol=1e-5)
    assert_params_close(final_params(work), final_params(src), atol=1e-5)


# ----------------------------------------------------------------------------- multi-host

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(shared, mesh_runs):
    """2 processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices, mesh fsdp=4 x tensor=2."""
    work = shared["root"] / "multihost"
    port = _free_port()
    overrides = ("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2")
    procs = []
    for i in range(2):
        cmd = _cmd(shared, work, *overrides, extra=(
            f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"))
        procs.append(subprocess.Popen(cmd, env=_env(shared, 4), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    np.testing.assert_allclose(losses(work), losses(mesh_runs["fsdp4_tensor2"]), rtol=0, atol=1e-5)
    # Each process saved its own data-iterator state.
    data = work / "checkpoints" / str(STEPS) / "data"
    assert sorted(f.name for f in data.iterdir() if f.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]


# ------------------------------------------------------------------ non-finite loss, init_from

# NaN pixels in the 7th training batch (float images: pixels_on_device off); a prelude of `run_commands`.
POISON = """
import numpy as np
import mmlm.train.data as data_lib

_orig, _calls = data_lib.global_batch, [0]


def poisoned(local, mesh, *args):
    _calls[0] += 1
    if _calls[0] == 7:
        local = dict(local, images=np.full_like(local["images"], np.nan))
    return _orig(local, mesh, *args)


def undo():
    data_lib.global_batch = _orig


data_lib.global_batch = poisoned
"""


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shared, single_runs):
    work = shared["root"] / "nan"
    proc = single_runs["nan"]  # NaN pixels in its 7th batch
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite loss at step 7" in proc.stderr
    assert "last good checkpoint is step 5" in proc.stderr
    assert committed(work) == [5]
    assert [r["step"] for r in rows(work)] == list(range(1, 7))
    assert all(np.all(np.isfinite(v)) for v in final_params(work).values())


def test_init_from_a_model_checkpoint(shared, single_runs, init_checkpoints):
    import jax

    work = shared["root"] / "init_from"  # started from a partial checkpoint, e.g. a converted CLIP
    succeeded(single_runs["init_from"])
    got = final_params(work)
    want = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path({"vision": init_checkpoints["vision"]})[0]}
    for k, v in want.items():  # the vision tower is frozen in the tiny recipe: still the loaded weights
        np.testing.assert_array_equal(got[k], v, err_msg=k)

    proc = single_runs["init_bad"]  # class_embedding of shape (7,)
    assert proc.returncode != 0 and "['vision']['class_embedding']: checkpoint (7,) vs model (32,)" in proc.stderr


def test_vision_pretraining_runs_on_a_fresh_start_only(shared, single_runs):
    """train.vision_pretrain.steps > 0: the ViT is pretrained before step 0, reported, and not again on resume."""
    work = shared["root"] / "vision_pretrain"
    first = succeeded(single_runs["vision_pretrain"])  # 5 steps
    assert "vision pretraining: 5 steps" in first.stderr
    summary = json.loads((work / "results.json").read_text())["vision_pretrain"]
    assert summary["steps"] == 5 and 0.0 <= summary["held_out_shape_accuracy"] <= 1.0
    assert "vision pretraining" in first.stdout  # the results table has a row for it
    resumed = succeeded(single_runs["vision_pretrain_resumed"])  # the same command with 8 steps, in a copy of work
    work = shared["root"] / "vision_pretrain_resumed"
    assert "resumed from step 5" in resumed.stderr and "vision pretraining: " not in resumed.stderr
    assert json.loads((work / "results.json").read_text())["vision_pretrain"] == summary  # still reported
