"""Checkpoint integrity: manifests, damaged latest steps, fallback to the newest intact step.

One short tiny run (10 steps, checkpoints at 5 and 10) is shared by the
module. Each damage kind is applied to a copy of its step 10; resuming that
copy must report the damaged file, keep it as `10.damaged`, resume from step
5 and reach the same final loss as the undamaged run resumed from step 5.
Runs are `mmlm train` commands in subprocesses with a persistent compilation
cache (as in test_train_e2e.py); the reference and the damaged resumes are
commands of one process, one after another, each with its own output and exit
status (`cli_helpers.run_commands`): JAX starts once for all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_commands

REPO = Path(__file__).resolve().parents[1]
STEPS = 10


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=1"  # conftest's
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jit_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _args(root: Path, workdir: Path) -> list[str]:
    return ["train", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(workdir),
            f"--config.synthetic.cache_dir={root / 'data'}", f"--config.train.steps={STEPS}",
            "--config.train.checkpoint_every=5", "--config.eval.every=-1"]


def train(root: Path, workdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmlm.cli", *_args(root, workdir)]
    return subprocess.run(cmd, env=_env(root), cwd=REPO, capture_output=True, text=True, timeout=900)


def final_loss(workdir: Path) -> float:
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert results["status"] == "completed" and results["steps"] == STEPS
    return float(results["train"]["loss"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base run: steps 5 and 10 saved."""
    root = tmp_path_factory.mktemp("ckpt_integrity")
    proc = train(root, root / "base")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "base": root / "base"}


@pytest.fixture(scope="module")
def runs(base):
    """`base`, the reference (its copy without step 10, resumed from step 5) and, per damage kind, a copy
    of `base` with that damage in its step 10, resumed: {kind: (damaged file, the resume's process)}."""
    root, base = base["root"], base["base"]
    ref = root / "ref"
    shutil.copytree(base, ref)
    shutil.rmtree(ref / "checkpoints" / "10")
    damaged = {}
    for kind, damage in DAMAGE.items():
        work = root / f"damaged_{kind}"
        shutil.copytree(base, work)
        damaged[kind] = (work, damage(work / "checkpoints" / "10"))
    workdirs = [ref] + [work for work, _ in damaged.values()]
    procs = dict(zip(workdirs, run_commands([{"args": _args(root, w), "name": w.name} for w in workdirs],
                                            _env(root), REPO, root / "logs")))
    assert procs[ref].returncode == 0, procs[ref].stderr[-3000:]
    assert "resumed from step 5" in procs[ref].stderr
    return {"root": root, "base": base, "ref": ref, "ref_loss": final_loss(ref),
            "damaged": {kind: (work, f, procs[work]) for kind, (work, f) in damaged.items()}}


def _largest(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_array(step: Path) -> Path:
    f = _largest(step / "params" / "ocdbt.process_0" / "d")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def _flip_bytes(step: Path) -> Path:
    f = _largest(step / "opt_state" / "ocdbt.process_0" / "d")
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    return f


def _empty(rel: str):
    def damage(step: Path) -> Path:
        (step / rel).write_bytes(b"")
        return step / rel
    return damage


def _delete(rel: str):
    def damage(step: Path) -> Path:
        (step / rel).unlink()
        return step / rel
    return damage


def _bad_json(rel: str):
    def damage(step: Path) -> Path:
        (step / rel).write_text('{"not": json')
        return step / rel
    return damage


DAMAGE = {
    "truncated_array_file": _truncate_array,
    "flipped_bytes": _flip_bytes,
    "empty_metadata": _empty("params/_METADATA"),
    "empty_step_metadata": _empty("_CHECKPOINT_METADATA"),
    "missing_metadata": _delete("opt_state/_METADATA"),
    "missing_ocdbt_manifest": _delete("params/manifest.ocdbt"),
    "bad_json_data_state": _bad_json("data/process_0-of-1.json"),
    "bad_json_step_metadata": _bad_json("_CHECKPOINT_METADATA"),
    "bad_json_mmlm_manifest": _bad_json("mmlm_manifest.json"),
}


def test_every_saved_step_has_a_manifest_that_verifies(base):
    runs = base
    from mmlm.checkpoint import MANIFEST_FILE, verify_step

    for step in (5, 10):
        d = runs["base"] / "checkpoints" / str(step)
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        assert any(k.startswith("params/") for k in manifest["files"])
        assert verify_step(str(d)) == ("ok", "")


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_skips_a_damaged_latest_step(runs, kind):
    from mmlm.checkpoint import verify_step

    work, damaged_file, proc = runs["damaged"][kind]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "checkpoint step 10 is damaged" in proc.stderr
    assert str(work / "checkpoints" / "10") in proc.stderr  # names where the damage is
    if kind != "bad_json_mmlm_manifest":
        assert str(damaged_file) in proc.stderr
    assert "resumed from step 5" in proc.stderr
    assert final_loss(work) == runs["ref_loss"]
    assert (work / "checkpoints" / "10.damaged").is_dir()  # kept for inspection
    assert verify_step(str(work / "checkpoints" / "10")) == ("ok", "")  # saved again, intact


def test_eval_and_chat_loading_fall_back_or_refuse(base, caplog):
    """`load_params_from_workdir` (chat / eval): the latest damaged step -> warning and the previous step;
    asking for the damaged step -> UserError naming the file."""
    from mmlm.checkpoint import load_params_from_workdir
    from mmlm.errors import UserError

    work = base["root"] / "damaged_for_loading"
    shutil.copytree(base["base"], work)
    damaged_file = _truncate_array(work / "checkpoints" / "10")
    want, _ = load_params_from_workdir(str(base["base"]), step=5)
    with caplog.at_level("WARNING"):
        got, _ = load_params_from_workdir(str(work))
    assert "checkpoint step 10 is damaged" in caplog.text and str(damaged_file) in caplog.text
    import jax

    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="step 10 is damaged"):
        load_params_from_workdir(str(work), step=10)
    # Everything damaged: a clear error, not a traceback from Orbax.
    _truncate_array(work / "checkpoints" / "5")
    with pytest.raises(UserError, match="no intact checkpoint"):
        load_params_from_workdir(str(work))
