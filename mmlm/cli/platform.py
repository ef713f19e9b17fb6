"""The jax platform of an `mmlm` command, chosen before jax initialises (it reads the environment on import).

With the `tpu` extra installed (libtpu) on a host without a TPU, jax would try the TPU backend
first and libtpu prints banners and TPU_WORKER_HOSTNAMES errors on every command. When no TPU
device is attached, no GPU is present and the user has not set `JAX_PLATFORMS`, the command runs
on the CPU platform instead. Everything here is a file-system check: nothing imports jax.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import MutableMapping

# Device nodes of attached accelerators: TPU v2-v4 (/dev/accel*), TPU v5e/v5p/v6e (VFIO groups),
# NVIDIA and AMD GPUs.
TPU_DEVICES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
GPU_DEVICES = ("/dev/nvidia[0-9]*", "/dev/kfd")

# `mmlm compile` compiles for a named TPU slice with libtpu on any host: jax itself stays on the CPU
# (a TPU VM's chips are not touched), several compile processes may load libtpu at once, and libtpu
# asks no Cloud TPU metadata server (a workstation or CI host has none; the query would wait for a timeout).
TPU_COMPILE_ENVIRONMENT = {"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1"}


def _present(patterns: tuple[str, ...]) -> bool:
    return any(glob.glob(p) for p in patterns)


def tpu_attached() -> bool:
    """Whether this host has a TPU device node."""
    return _present(TPU_DEVICES)


def gpu_attached() -> bool:
    """Whether this host has an NVIDIA or AMD GPU device node."""
    return _present(GPU_DEVICES)


def libtpu_installed() -> bool:
    """Whether libtpu (the `tpu` extra) is installed, found without importing it."""
    return importlib.util.find_spec("libtpu") is not None


def choose_platform(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Sets `JAX_PLATFORMS=cpu` when libtpu is installed but no TPU (and no GPU) is attached.

    A user's `JAX_PLATFORMS` wins; a TPU host keeps jax's choice, and so does a GPU host (jax
    prefers the GPU). Returns the value set, or None when the environment is left as it was.
    Effective only before jax is imported.
    """
    if environ.get("JAX_PLATFORMS") or tpu_attached() or gpu_attached() or not libtpu_installed():
        return None
    environ["JAX_PLATFORMS"] = "cpu"
    return "cpu"


def tpu_compile_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """The environment of `mmlm compile` (`TPU_COMPILE_ENVIRONMENT`); what the user set wins."""
    for name, value in TPU_COMPILE_ENVIRONMENT.items():
        environ.setdefault(name, value)
