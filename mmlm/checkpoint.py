"""Standalone model checkpoints: `DIR/config.json` + `DIR/params` (Orbax).

A model checkpoint is what `mmlm convert` writes and what `--checkpoint DIR`
/ `--init_from DIR` read: the full mmlm config (so eval/chat can rebuild the
model) and the parameter pytree (possibly partial, e.g. only `vision` after
converting a CLIP tower). Training workdirs hold an Orbax CheckpointManager
under `WORKDIR/checkpoints` instead (written by `mmlm.train.checkpointing`);
`load_params_from_workdir` reads the params of one of its steps, so that
eval and chat need nothing from the training package.
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
CHECKPOINT_DIR = "checkpoints"  # a training workdir's CheckpointManager root


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


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


def _abstract_params(config: ml_collections.ConfigDict, sharding: Any) -> Any:
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.summary import abstract_params

    shapes = abstract_params(model_config_from_dict(config.model))
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)


def load_params_from_workdir(workdir: str, step: int | None = None, shardings: Any = None
                             ) -> tuple[Any, ml_collections.ConfigDict]:
    """(params, config) of a training workdir: the latest checkpoint, or `step`.

    For `mmlm eval --workdir` / `mmlm chat --workdir`. `shardings` is a
    `Sharding` for every leaf or a pytree of them matching the params (default:
    everything on the first local device). Params come back as plain (unboxed)
    jax arrays, fp32 master weights. Only the `params` item of the step is
    read (the optimizer state and data-iterator state are left on disk).
    """
    from flax import linen as nn

    config = load_config_json(workdir)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                    item_handlers={"params": ocp.StandardCheckpointHandler()})
    try:
        steps = list(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{checkpoint_dir(workdir)!r} holds no checkpoint (has training saved one?)")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)!r}; "
                                    f"available: {sorted(steps)}")
        target = _abstract_params(config, shardings or jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    finally:
        manager.close()
    return nn.unbox(restored["params"]), config
