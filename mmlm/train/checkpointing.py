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
`mmlm.checkpoint.load_params_from_workdir(workdir)` rebuilds everything eval
and chat need.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mmlm.checkpoint import checkpoint_dir

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("params", "opt_state", "meta")
DATA_ITEM = "data"


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

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
