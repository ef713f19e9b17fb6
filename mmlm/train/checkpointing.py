"""Training checkpoints: an Orbax `CheckpointManager` under `WORKDIR/checkpoints`.

Each step directory holds four items:

* `params`: the fp32 master weights (what eval/chat load, without the rest);
* `opt_state`: the optax state (no entries for frozen parts);
* `meta`: `{"step", "rng"}` arrays (the run key that drives budget sampling);
* `data`: the grain iterator state, one JSON file per process
  (`process_{i}-of-{n}.json`), so every host resumes its own data shard.

Arrays are saved asynchronously (the train loop goes on while they are
written); the iterator state is written synchronously at the save call, so it
matches the step exactly. Restoring takes an abstract target whose leaves carry
the *current* mesh's shardings: a checkpoint saved on one mesh restores onto
another (Orbax reshards).

`WORKDIR/config.json` (written by the trainer) is the resolved config, so
`load_params_from_workdir(workdir)` rebuilds everything eval and chat need.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from mmlm.checkpoint import load_config_json

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
ARRAY_ITEMS = ("params", "opt_state", "meta")
DATA_ITEM = "data"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class Checkpointer:
    """Saves and restores the train state (+ data iterator) of one workdir."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            # The trainer decides when to save (train.checkpoint_every, SIGTERM, the last step).
            save_interval_steps=1,
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers[DATA_ITEM] = grain.checkpoint.CheckpointHandler()
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any], data_iterator: Any | None = None) -> None:
        """Starts an asynchronous save of `state` (and, synchronously, the iterator state) at `step`."""
        args = {
            "params": ocp.args.StandardSave(state["params"]),
            "opt_state": ocp.args.StandardSave(state["opt_state"]),
            "meta": ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
        }
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            args[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: dict[str, Any], data_iterator: Any | None = None
                ) -> dict[str, Any]:
        """Restores the state saved at `step` onto the shardings of `abstract_state` (ShapeDtypeStructs).

        The data iterator, when given, is restored in place. A checkpoint
        written by a different number of processes has no iterator state for
        this layout: the iterator then starts afresh (logged).
        """
        args = {
            "params": ocp.args.StandardRestore(abstract_state["params"]),
            "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"]),
            "meta": ocp.args.StandardRestore({"step": abstract_state["step"], "rng": abstract_state["rng"]}),
        }
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_iterator is not None and hasattr(data_iterator, "set_state"):
            try:
                self.manager.restore(step, args=ocp.args.Composite(
                    **{DATA_ITEM: grain.checkpoint.CheckpointRestore(data_iterator)}))
            except (ValueError, FileNotFoundError, KeyError) as e:
                log.warning("checkpoint %d has no data-iterator state for process %d of %d (%s); the data "
                            "iterator starts from the beginning", step, jax.process_index(), jax.process_count(), e)
        return {"step": restored["meta"]["step"], "params": restored["params"],
                "opt_state": restored["opt_state"], "rng": restored["meta"]["rng"]}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract_params(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding | Any) -> Any:
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
    jax arrays, fp32 master weights.
    """
    config = load_config_json(workdir)
    ckpt = Checkpointer(workdir, read_only=True, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{checkpoint_dir(workdir)!r} holds no checkpoint (has training saved one?)")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)!r}; "
                                    f"available: {sorted(steps)}")
        target = _abstract_params(config, shardings or jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    finally:
        ckpt.close()
    return nn.unbox(restored["params"]), config


def checkpoint_step_of(workdir: str) -> int | None:
    """Latest checkpointed step of a workdir (None if none), without loading anything."""
    path = checkpoint_dir(workdir)
    if not os.path.isdir(path):
        return None
    steps = [int(d) for d in os.listdir(path) if d.isdigit()]
    return max(steps) if steps else None


def host_array(x: Any) -> np.ndarray:
    """A (replicated or fully addressable) array as numpy on this host."""
    return np.asarray(jax.device_get(x))
