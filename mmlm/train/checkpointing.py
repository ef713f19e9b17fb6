"""Saving training checkpoints: an Orbax `CheckpointManager` under `WORKDIR/checkpoints`.

What is specific to training lives here (the manager that saves the train
state asynchronously, the workdir checks before a run, setting damaged steps
aside on resume); finding steps and checking their integrity is
`mmlm.checkpoint`'s, shared with eval, chat and serve.

Each step directory holds four items:

* `params`: the fp32 master weights (what eval/chat load, without the rest);
* `opt_state`: the optax state (no entries for frozen parts);
* `meta`: `{"step", "rng"}` arrays (the run key that drives budget sampling);
* `data`: the grain iterator state, one JSON file per process
  (`process_{i}-of-{n}.json`), so every host resumes its own data shard.

Arrays are saved asynchronously (the train loop goes on while they are
written); the iterator state is written synchronously at the save call, so it
matches the step exactly.

Integrity: once a step's files are final (Orbax's post-finalization hook,
before the step directory is committed by its rename), `mmlm_manifest.json`
records every file's size and CRC-32 (`mmlm.checkpoint.write_manifest`).
`restore_latest` restores the newest intact step
(`mmlm.checkpoint.restore_newest_intact`); a damaged step (a missing,
truncated or corrupted file, an unreadable manifest, or, for a step without
a manifest, a failed restore) is reported by path, renamed `STEP.damaged`
(kept for inspection, out of the way of the next save) and the next older
step is tried. Interrupted saves (`STEP.orbax-checkpoint-tmp*` directories)
are removed at startup. Restoring takes an abstract target whose leaves
carry the *current* mesh's shardings: a checkpoint saved on one mesh
restores onto another (Orbax reshards).

`WORKDIR/config.json` (written by the trainer) is the resolved config, so
`mmlm.checkpoint.load_params_from_workdir(workdir)` rebuilds everything eval
and chat need.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from mmlm.checkpoint import (CONFIG_FILE, PARAMS_DIR, NoIntactCheckpointError, StepMismatchError, checkpoint_dir,
                             has_checkpoints, is_model_checkpoint, load_config_json, restore_newest_intact,
                             set_aside_damaged, write_manifest)
from mmlm.errors import DiskFullError, UserError, disk_full_message, is_disk_full

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("params", "opt_state", "meta")
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step directory being written
DATA_ITEM = "data"


# Model fields that only change how the model runs or the loss is computed, not its parameters: they may
# differ on resume.
RUNTIME_MODEL_KEYS = ("dtype", "remat_policy", "compressor.impl", "loss_chunk", "loss_positions")


def check_workdir(workdir: str) -> str:
    """Creates `workdir` if needed and checks that it is a writable directory; returns its absolute path."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir {workdir!r} is a file, not a directory; pass a new or existing directory")
    if is_model_checkpoint(path) and not os.path.isdir(checkpoint_dir(path)):
        # Training there would rewrite the checkpoint's config.json (and mix a run into a model's files).
        raise UserError(f"--workdir {workdir!r} is a model checkpoint ({CONFIG_FILE} + {PARAMS_DIR}/, as "
                        "`mmlm convert` writes), not a training workdir; start from it with "
                        f"`--init_from {workdir} --workdir NEW_DIR`")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mmlm-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--workdir {workdir!r} is not writable ({e.strerror or e}); pass a directory you can "
                        "write to") from None
    return path


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        tree = tuple(_flat_value(v) for v in tree)
    return {prefix[:-1]: tree}


def _flat_value(v: Any) -> Any:
    return tuple(_flat_value(x) for x in v) if isinstance(v, (list, tuple)) else v


def _model_fields(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.model` flattened to {"llm.width": 32, ...}, normalised through the typed model config."""
    from mmlm.models.config import model_config_from_dict

    try:
        tree = dataclasses.asdict(model_config_from_dict(model))
    except (ValueError, TypeError):  # a config.json from another version: compare it as written
        tree = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
    return _flat(tree)


def check_saved_model_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to resume a workdir whose checkpoints were trained with another model config.

    Runs before anything is written: the workdir's `config.json` (the config
    its checkpoints were saved with) is compared with `config.model`; every
    differing key is listed. Fields that do not change the parameters
    (`RUNTIME_MODEL_KEYS`) may differ.
    """
    if not (os.path.isfile(os.path.join(workdir, CONFIG_FILE)) and has_checkpoints(workdir)):
        return
    try:
        saved = load_config_json(workdir)
    except (ValueError, OSError) as e:
        raise UserError(f"{os.path.join(workdir, CONFIG_FILE)!r} cannot be read ({e}); it describes the "
                        "checkpoints in this workdir: restore it, or use a new --workdir") from None
    if "model" not in saved:
        raise UserError(f"{os.path.join(workdir, CONFIG_FILE)!r} has no 'model' section; restore it, or use a "
                        "new --workdir")
    old, new = _model_fields(saved.model), _model_fields(config.model)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in RUNTIME_MODEL_KEYS:
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            diffs.append(f"model.{key}={a!r}, the config says {b!r}")
    if diffs:
        raise UserError(f"this workdir ({workdir}) was trained with " + "; ".join(diffs)
                        + ". Use a new --workdir, or the saved config "
                        f"({os.path.join(workdir, CONFIG_FILE)}) and its overrides")


class Checkpointer:
    """Saves and restores the train state (+ data iterator) of one workdir."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.root = checkpoint_dir(workdir)
        self.async_save = async_save
        self._unmanifested: list[int] = []  # saved steps whose manifest is not written yet
        self._failed = False  # a save failed on a full disk (reported once)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            # Interrupted saves leave STEP.orbax-checkpoint-tmp* directories: removed at startup.
            cleanup_tmp_directories=not read_only,
            # The trainer decides when to save (train.checkpoint_every, SIGTERM, the last step).
            save_interval_steps=1,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_pending_manifests)
            if async_save else None,
        )
        if not read_only:
            self._remove_interrupted_saves()
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers[DATA_ITEM] = grain.checkpoint.CheckpointHandler()
        self.manager = ocp.CheckpointManager(self.root, options=options, item_handlers=handlers)

    def _remove_interrupted_saves(self) -> None:
        """Deletes STEP.orbax-checkpoint-tmp* directories: saves cut short by a kill (never committed)."""
        if jax.process_index() != 0 or not os.path.isdir(self.root):
            return
        for name in sorted(os.listdir(self.root)):
            if TMP_MARKER in name and name.split(".", 1)[0].isdigit():
                path = os.path.join(self.root, name)
                shutil.rmtree(path, ignore_errors=True)
                log.warning("removed the interrupted save %s", path)

    def _write_pending_manifests(self) -> None:
        """Writes the manifest of each finished save (process 0; the step may still be in its tmp directory)."""
        while self._unmanifested:
            step = self._unmanifested.pop(0)
            if jax.process_index() != 0:
                continue
            final = os.path.join(self.root, str(step))
            try:
                tmp = sorted((os.path.join(self.root, n) for n in os.listdir(self.root)
                              if n.startswith(f"{step}{TMP_MARKER}")), key=os.path.getmtime)
                write_manifest(tmp[-1] if tmp else final)
            except OSError as e:  # the step stays restorable, only unverified: never fail the save for it
                log.warning("could not write the manifest of checkpoint step %d (%s); it will be restored "
                            "without verification", step, e)

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
        try:
            self.manager.wait_until_finished()  # the previous save's manifest refers to its step alone
            self._unmanifested.append(step)
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
            if not self.async_save:
                self._write_pending_manifests()
        except Exception as e:
            self._raise_if_disk_full(e)
            raise

    def _raise_if_disk_full(self, e: BaseException) -> None:
        """A save that failed on a full disk: its partial step directory is removed, one-line `DiskFullError`."""
        if not is_disk_full(e):
            return
        self._failed = True
        self._unmanifested.clear()
        self._remove_interrupted_saves()  # frees what the failed save wrote; older steps are untouched
        last = self.latest_step()
        kept = f"; the last complete checkpoint is step {last}" if last is not None else ""
        raise DiskFullError(f"saving a checkpoint: {disk_full_message(self.root)}{kept}") from None

    def restore_latest(self, abstract_state: dict[str, Any], data_iterator: Any | None = None
                       ) -> tuple[int | None, dict[str, Any] | None]:
        """(step, state) of the newest intact checkpoint, or (None, None) for a workdir without one.

        Damaged newer steps are logged as warnings naming the damaged file and
        renamed `STEP.damaged`; if every step is damaged, `UserError` (nothing
        is renamed, so no work is silently discarded).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None, None

        def skipped(step: int, detail: str) -> None:
            log.warning("checkpoint step %d is damaged: %s; trying an older step", step, detail)

        try:
            step, state, damaged = restore_newest_intact(
                self.root, steps, lambda s: self.restore(s, abstract_state, data_iterator), on_damaged=skipped)
        except StepMismatchError as e:  # intact files that do not fit: not damage, a config mismatch
            raise UserError(f"checkpoint step {e.step} in {self.root} does not fit this config ({e.reason}); "
                            "use the workdir's config.json or a new --workdir") from None
        except NoIntactCheckpointError as e:
            raise UserError(f"{e}. Move the damaged step directories away to start afresh") from None
        self._set_aside(damaged)
        return step, state

    def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
        if not damaged:
            return
        if jax.process_index() == 0:
            for step, _ in damaged:
                moved = set_aside_damaged(os.path.join(self.root, str(step)))
                log.warning("kept the damaged step %d for inspection as %s", step, moved)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mmlm_checkpoint_set_aside")
        self.manager.reload()

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
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if not self._failed:  # else already reported by the save that failed; raising would hide it
                self._raise_if_disk_full(e)
                raise
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failed:
                    raise
