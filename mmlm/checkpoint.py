"""Standalone model checkpoints: `DIR/config.json` + `DIR/params` (Orbax).

A model checkpoint is what `mmlm convert` writes and what `--checkpoint DIR`
/ `--init_from DIR` read: the full mmlm config (so eval/chat can rebuild the
model) and the parameter pytree (possibly partial, e.g. only `vision` after
converting a CLIP tower). Training workdirs hold an Orbax CheckpointManager
instead (see `mmlm.train`); `load_params` reads either.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_config(directory: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config_json(directory: str) -> ml_collections.ConfigDict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no {CONFIG_FILE}: not an mmlm checkpoint or workdir")
    with open(path) as f:
        data = json.load(f)
    return ml_collections.ConfigDict(_tuples(data))


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples (configs use tuples for budgets, rules, ...)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def save_model(directory: str, params: Any, config: ml_collections.ConfigDict) -> None:
    """Writes config.json and the params pytree (numpy or jax arrays)."""
    directory = os.path.abspath(directory)
    save_config(directory, config)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=True)


def save_model_low_memory(directory: str, params: Any, config: ml_collections.ConfigDict) -> None:
    """`save_model` for large host (numpy) pytrees, adding almost no memory.

    `StandardCheckpointer` deep-copies every numpy leaf before its background
    write and compresses chunks in memory, which doubles the peak RSS of a
    conversion. This writes the same Orbax format (OCDBT, read back by
    `load_model_params`) without the copy and uncompressed, synchronously;
    the caller must not modify `params` during the call.
    """
    directory = os.path.abspath(directory)
    save_config(directory, config)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    path = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(path):
        shutil.rmtree(path)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(jax.tree.map(np.asarray, params)))


def load_model_params(directory: str, target: Any | None = None) -> Any:
    """Reads the params of a model checkpoint.

    `target` is an optional pytree of `jax.ShapeDtypeStruct` (with shardings)
    to restore onto; without it arrays come back as saved.
    """
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{directory!r} has no {PARAMS_DIR}/ directory: not an mmlm model checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        return ckptr.restore(path, target)


def is_model_checkpoint(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, PARAMS_DIR)) and os.path.isfile(
        os.path.join(directory, CONFIG_FILE))
