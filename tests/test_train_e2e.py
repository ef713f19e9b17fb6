"""`mmlm train` end to end on the tiny config: exact resume, sharding, multi-host, mesh changes, preemption.

Every run is a subprocess (device counts are fixed when JAX starts). The runs
share one synthetic dataset and a persistent XLA compilation cache (so a
program compiled by one run is reused by the next), and compile with LLVM
optimisation off: these tests check equalities between runs, not speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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


def run_train(shared, workdir: Path, *overrides: str, devices: int = 1, steps: int = STEPS,
              timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(shared, workdir, *overrides, steps=steps), env=_env(shared, devices), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
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


# ---------------------------------------------------------------------------- exact resume

RESUME_STEPS = 60
RESUME = ("--config.train.checkpoint_every=20", "--config.eval.every=0")


@pytest.fixture(scope="module")
def resume_ref(shared):
    """An uninterrupted 60-step run (checkpoints every 20 steps, evaluation at the end)."""
    ref = shared["root"] / "resume_ref"
    run_train(shared, ref, *RESUME, steps=RESUME_STEPS)
    return ref


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


def test_sigkill_and_rerun_resumes_exactly(shared, resume_ref):
    """kill -9 after a checkpoint, then the same command again: bitwise the uninterrupted run."""
    work = shared["root"] / "resume_killed"
    proc, _ = interrupt(shared, work, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = committed(work)
    assert done and done[-1] < RESUME_STEPS, f"killed too late to test resuming: checkpoints {done}"
    run_train(shared, work, *RESUME, steps=RESUME_STEPS)
    assert_same_run(work, resume_ref)


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(shared, resume_ref):
    work = shared["root"] / "resume_sigterm"
    proc, out = interrupt(shared, work, signal.SIGTERM)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in out
    stopped = int(out.split("saved a checkpoint at step ")[1].split(";")[0])
    assert 20 <= stopped < RESUME_STEPS and committed(work)[-1] == stopped
    run_train(shared, work, *RESUME, steps=RESUME_STEPS)
    assert_same_run(work, resume_ref)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(shared, resume_ref):
    """SIGINT (Ctrl-C) saves like SIGTERM: nothing since the last checkpoint is lost."""
    work = shared["root"] / "resume_sigint"
    proc, out = interrupt(shared, work, signal.SIGINT)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "SIGINT: saved a checkpoint at step" in out
    stopped = int(out.split("saved a checkpoint at step ")[1].split(";")[0])
    assert 20 <= stopped < RESUME_STEPS and committed(work)[-1] == stopped
    run_train(shared, work, *RESUME, steps=RESUME_STEPS)
    assert_same_run(work, resume_ref)


# ------------------------------------------------------------------------------- sharding

@pytest.fixture(scope="module")
def mesh_runs(shared):
    """Three 10-step runs of the same config: 1 device; 8 devices fsdp=4 x tensor=2; 8 devices data=8.

    The first two end with an eval-loss pass whose batch (5 rows) the fsdp axis does not divide: the
    evaluator pads it with masked rows.
    """
    final_eval = ("--config.eval.every=0", "--config.eval.num_questions=0", "--config.eval.loss_batches=2",
                  "--config.data.eval_batch_size=5")
    runs = {
        "one": (final_eval, 1),
        "fsdp4_tensor2": (("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2") + final_eval,
                          8),
        "data8": (("--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"), 8),
    }
    out = {}
    for name, (overrides, devices) in runs.items():
        work = shared["root"] / f"mesh_{name}"
        run_train(shared, work, *overrides, devices=devices)
        out[name] = work
    return out


def test_sharded_meshes_give_the_same_losses(mesh_runs):
    ref = losses(mesh_runs["one"])
    assert len(ref) == STEPS and np.all(np.isfinite(ref))
    for name in ("fsdp4_tensor2", "data8"):
        np.testing.assert_allclose(losses(mesh_runs[name]), ref, rtol=0, atol=1e-5, err_msg=name)
    assert_params_close(final_params(mesh_runs["one"]), final_params(mesh_runs["fsdp4_tensor2"]), atol=1e-5)
    (one,), (sharded,) = rows(mesh_runs["one"], "eval"), rows(mesh_runs["fsdp4_tensor2"], "eval")
    assert sharded["eval/loss"] == pytest.approx(one["eval/loss"], abs=1e-5)


def test_length_buckets_cut_padding_only(shared, mesh_runs):
    """Batches cut to the smallest length bucket that holds them: one compiled step per length used, the
    same losses as full-length batches (only padding is cut)."""
    work = shared["root"] / "buckets"
    final_eval = ("--config.eval.every=0", "--config.eval.num_questions=0", "--config.eval.loss_batches=2",
                  "--config.data.eval_batch_size=5")
    proc = run_train(shared, work, *final_eval, "--config.data.length_buckets=(8,16,24)")
    lengths = sorted({int(n) for n in re.findall(r"compiled the train step for (\d+)-token",
                                                  proc.stdout + proc.stderr)})
    assert lengths and lengths[0] < 32, proc.stdout[-3000:]  # tiny: max_text_len 32
    np.testing.assert_allclose(losses(work), losses(mesh_runs["one"]), rtol=0, atol=1e-5)


def test_frame_buckets_reach_the_train_step(shared):
    """Videos (3 real frames of max_frames 8) with data.frame_buckets=(4,): the trainer compiles and runs only
    4-frame steps (that a cut batch trains like the full one: tests/test_train_unit.py)."""
    work = shared["root"] / "frame_buckets"
    proc = run_train(shared, work, "--config.synthetic.kind=moving_shapes", "--config.synthetic.num_train=16",
                     "--config.synthetic.num_eval=8", "--config.data.max_frames=8", "--config.data.video_fps=0.5",
                     "--config.data.frame_buckets=(4,)", steps=3)
    compiled = re.findall(r"compiled the train step for \d+-token, (\d+)-frame batches", proc.stdout + proc.stderr)
    assert compiled == ["4"], proc.stdout[-3000:]
    assert len(losses(work)) == 3 and np.isfinite(losses(work)).all()


def test_restore_a_checkpoint_onto_another_mesh(shared, mesh_runs):
    """Saved on fsdp=4 x tensor=2 at step 5, resumed on data=8: the same steps 6..10 and final params."""
    src = mesh_runs["fsdp4_tensor2"]
    work = shared["root"] / "remesh"
    shutil.copytree(src, work)
    shutil.rmtree(work / "checkpoints" / str(STEPS))  # keep only step 5
    proc = run_train(shared, work, "--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
                     devices=8)
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

_POISONED_RUN = """
import sys
import numpy as np
import mmlm.train.data as data_lib

_orig, _calls = data_lib.global_batch, [0]


def poisoned(local, mesh, *args):  # NaN pixels in the 7th training batch (float images: pixels_on_device off)
    _calls[0] += 1
    if _calls[0] == 7:
        local = dict(local, images=np.full_like(local["images"], np.nan))
    return _orig(local, mesh, *args)


data_lib.global_batch = poisoned
from mmlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shared):
    work = shared["root"] / "nan"
    cmd = [sys.executable, "-c", _POISONED_RUN] + _cmd(shared, work, "--config.data.pixels_on_device=false")[3:]
    proc = subprocess.run(cmd, env=_env(shared, 1), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite loss at step 7" in proc.stderr
    assert "last good checkpoint is step 5" in proc.stderr
    assert committed(work) == [5]
    assert [r["step"] for r in rows(work)] == list(range(1, 7))
    assert all(np.all(np.isfinite(v)) for v in final_params(work).values())


def test_init_from_a_model_checkpoint(shared, tmp_path):
    import jax

    from mmlm.checkpoint import save_model
    from mmlm.config_utils import load_config
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.summary import abstract_params

    config = load_config(str(REPO / "configs/tiny.py"))
    shapes = abstract_params(model_config_from_dict(config.model))
    rng = np.random.default_rng(0)
    vision = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes["vision"])
    save_model(str(tmp_path / "ckpt"), {"vision": vision}, config)  # a partial checkpoint, e.g. a converted CLIP
    work = shared["root"] / "init_from"
    proc = subprocess.run(_cmd(shared, work, steps=2) + ["--init_from", str(tmp_path / "ckpt")],
                          env=_env(shared, 1), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = final_params(work)
    want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path({"vision": vision})[0]}
    for k, v in want.items():  # the vision tower is frozen in the tiny recipe: still the loaded weights
        np.testing.assert_array_equal(got[k], v, err_msg=k)

    bad = dict(vision, class_embedding=np.zeros(7, np.float32))
    save_model(str(tmp_path / "bad"), {"vision": bad}, config)
    proc = subprocess.run(_cmd(shared, shared["root"] / "init_bad", steps=2) + ["--init_from", str(tmp_path / "bad")],
                          env=_env(shared, 1), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "['vision']['class_embedding']: checkpoint (7,) vs model (32,)" in proc.stderr


def test_vision_pretraining_runs_on_a_fresh_start_only(shared):
    """train.vision_pretrain.steps > 0: the ViT is pretrained before step 0, reported, and not again on resume."""
    work = shared["root"] / "vision_pretrain"
    pre = ("--config.train.vision_pretrain.steps=5", "--config.train.vision_pretrain.num_images=32",
           "--config.train.vision_pretrain.eval_images=8")
    first = run_train(shared, work, *pre, steps=5)
    assert "vision pretraining: 5 steps" in first.stderr
    summary = json.loads((work / "results.json").read_text())["vision_pretrain"]
    assert summary["steps"] == 5 and 0.0 <= summary["held_out_shape_accuracy"] <= 1.0
    assert "vision pretraining" in first.stdout  # the results table has a row for it
    resumed = run_train(shared, work, *pre, steps=8)
    assert "resumed from step 5" in resumed.stderr and "vision pretraining: " not in resumed.stderr
    assert json.loads((work / "results.json").read_text())["vision_pretrain"] == summary  # still reported
