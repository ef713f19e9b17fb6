"""The command layer's platform choice (`mmlm.cli.platform`): with libtpu installed on a host without a TPU,
`mmlm` commands run on the CPU and print nothing of libtpu's; a user's JAX_PLATFORMS wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmlm.cli import platform

REPO = Path(__file__).resolve().parents[1]
LIBTPU_NOISE = ("libtpu", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "InitGoogle", "tpu_")


@pytest.mark.skipif(platform.tpu_attached() or platform.gpu_attached(), reason="a host with an accelerator")
def test_summary_on_a_cpu_host_prints_nothing_of_libtpu():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD",
                                                             "TPU_SKIP_MDS_QUERY")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # libtpu stays silent when another process holds its lock (/tmp/libtpu_lockfile, e.g. a parallel test
    # worker); allowing several loads makes it start, and speak, whenever jax would try the TPU platform.
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mmlm.cli", "summary", "--config", "configs/tiny.py"], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("config: configs/tiny.py\n"), proc.stdout  # nothing before the report
    noise = [word for word in LIBTPU_NOISE if word.lower() in proc.stdout.lower()]
    assert not noise, proc.stdout


def _host(monkeypatch, *, tpu: bool, gpu: bool, libtpu: bool) -> None:
    monkeypatch.setattr(platform, "tpu_attached", lambda: tpu)
    monkeypatch.setattr(platform, "gpu_attached", lambda: gpu)
    monkeypatch.setattr(platform, "libtpu_installed", lambda: libtpu)


def test_cpu_chosen_only_with_libtpu_and_no_accelerator(monkeypatch):
    _host(monkeypatch, tpu=False, gpu=False, libtpu=True)
    env: dict[str, str] = {}
    assert platform.choose_platform(env) == "cpu" and env == {"JAX_PLATFORMS": "cpu"}
    for host in ({"tpu": True, "gpu": False, "libtpu": True}, {"tpu": False, "gpu": True, "libtpu": True},
                 {"tpu": False, "gpu": False, "libtpu": False}):
        _host(monkeypatch, **host)
        env = {}
        assert platform.choose_platform(env) is None and env == {}, host  # jax chooses, as without mmlm


def test_the_users_platform_wins(monkeypatch):
    _host(monkeypatch, tpu=False, gpu=False, libtpu=True)
    env = {"JAX_PLATFORMS": "tpu"}
    assert platform.choose_platform(env) is None and env == {"JAX_PLATFORMS": "tpu"}
    env = {"JAX_PLATFORMS": "cuda", "TPU_SKIP_MDS_QUERY": "0"}
    platform.tpu_compile_environment(env)  # `mmlm compile`: libtpu's settings, the user's values kept
    assert env == {"JAX_PLATFORMS": "cuda", "TPU_SKIP_MDS_QUERY": "0", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
