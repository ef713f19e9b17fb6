"""Checkpoints on disk: discovery, integrity and model checkpoints (one home for all of them).

Two kinds of directory hold weights:

* a model checkpoint, `DIR/config.json` + `DIR/params` (Orbax): what `mmlm
  convert` writes and what `--checkpoint DIR` / `--init_from DIR` read: the
  full mmlm config (so eval/chat can rebuild the model) and the parameter
  pytree (possibly partial, e.g. only `vision` after converting a CLIP tower);
  `is_model_checkpoint` tells one;
* a training workdir, `WORKDIR/config.json` + an Orbax CheckpointManager
  under `WORKDIR/checkpoints` (saved by `mmlm.train.checkpointing`), one
  directory per step; `has_checkpoints` tells one that saved a step.

Integrity: every saved step carries `mmlm_manifest.json` (each file's size
and CRC-32, `write_manifest`); `verify_step` checks a step against it, and
`restore_newest_intact` is the one loop that walks a workdir's steps from the
newest, skipping damaged ones: the trainer's resume and
`load_params_from_workdir` (eval, chat, serve, lmms-eval: `--workdir` with an
optional `--step`) both use it, so eval and chat need nothing from the
training package.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from typing import Any, Callable, Sequence, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mmlm.errors import UserError
from mmlm.safe_io import write_text_atomic

log = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKPOINT_DIR = "checkpoints"  # a training workdir's CheckpointManager root
MANIFEST_FILE = "mmlm_manifest.json"  # per step: every file's size and CRC-32, written after the save
# Files not listed in a manifest: the manifest itself and Orbax's commit markers (written after it).
_UNLISTED = (MANIFEST_FILE, "commit_success.txt")
# JSON files that Orbax rewrites when it commits the step (after the manifest): listed without size and
# checksum, verified as present, non-empty, valid JSON.
_JSON_REWRITTEN = ("_CHECKPOINT_METADATA",)
DAMAGED_SUFFIX = ".damaged"  # a damaged step directory is renamed STEP.damaged (kept for inspection)


# ------------------------------------------------------------------------- discovery

def checkpoint_dir(workdir: str) -> str:
    """`WORKDIR/checkpoints`: the root of a training workdir's step directories."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def is_model_checkpoint(directory: str) -> bool:
    """A model checkpoint (`config.json` + `params/`, as `mmlm convert` writes), not a training workdir."""
    return os.path.isdir(os.path.join(directory, PARAMS_DIR)) and os.path.isfile(
        os.path.join(directory, CONFIG_FILE))


def has_checkpoints(workdir: str) -> bool:
    """A training workdir that has saved at least one step."""
    root = checkpoint_dir(workdir)
    return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


# ------------------------------------------------------------------------- integrity

def _crc32(path: str, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _listed_files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            if name not in _UNLISTED:
                out.append(os.path.relpath(os.path.join(root, name), step_dir))
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """Records every file of a saved step (size and CRC-32) in `STEP/mmlm_manifest.json`.

    Called once the step's files are final (after Orbax finishes the save);
    written to a temporary name and renamed, so a manifest is never partial.
    """
    files = {rel: ({"json": True} if os.path.basename(rel) in _JSON_REWRITTEN else
                   {"size": os.path.getsize(os.path.join(step_dir, rel)), "crc32": _crc32(os.path.join(step_dir, rel))})
             for rel in _listed_files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "checksum": "crc32", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST_FILE))


def verify_step(step_dir: str, items: tuple[str, ...] | None = None) -> tuple[str, str]:
    """Checks a saved step against its manifest: ("ok" | "unverified" | "damaged", detail).

    "unverified": the step has no manifest (saved by an older version, or the
    process died between the save and the manifest); only restoring it can
    tell. "damaged": the manifest is unreadable, or a listed file is missing,
    has another size (truncated) or another checksum (flipped bytes); the
    detail names the file. `items` limits the check to files under those
    top-level item directories (and the step's own top-level files), e.g.
    ("params",) for eval/chat.
    """
    if not os.path.isdir(step_dir):
        return "damaged", f"{step_dir} is not a directory"
    path = os.path.join(step_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        return "unverified", f"{step_dir} has no {MANIFEST_FILE}"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        entries = [(str(rel), None, None) if e.get("json") else (str(rel), int(e["size"]), int(e["crc32"]))
                   for rel, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return "damaged", f"{path} is unreadable ({type(e).__name__}: {e})"
    for rel, size, crc in entries:
        top = rel.split(os.sep, 1)[0] if os.sep in rel else None
        if items is not None and top is not None and top not in items:
            continue
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return "damaged", f"{full} is missing"
        if size is None:
            try:
                with open(full) as f:
                    json.load(f)
            except (OSError, ValueError) as e:
                return "damaged", f"{full} is not valid JSON ({type(e).__name__}: {e})"
            continue
        actual = os.path.getsize(full)
        if actual != size:
            return "damaged", f"{full} has {actual} bytes, {size} were saved (truncated or overwritten)"
        if _crc32(full) != crc:
            return "damaged", f"{full} does not match its checksum (corrupted bytes)"
    return "ok", ""


def set_aside_damaged(step_dir: str) -> str:
    """Renames a damaged step directory to STEP.damaged (STEP.damaged-2, ...) so that the run can save that
    step again; returns the new path."""
    target = step_dir.rstrip(os.sep) + DAMAGED_SUFFIX
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{step_dir.rstrip(os.sep)}{DAMAGED_SUFFIX}-{n}"
    os.rename(step_dir, target)
    return target


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


class StepMismatchError(UserError, ValueError):
    """An intact (verified) step that does not restore: its files do not fit the restore target, which is a
    config mismatch, not damage. `step` and `reason` let the caller say which config to use."""

    def __init__(self, root: str, step: int, reason: str):
        super().__init__(f"checkpoint step {step} in {root} does not fit the config ({reason})")
        self.step, self.reason = step, reason


class NoIntactCheckpointError(UserError, ValueError):
    """Every step tried is damaged; `damaged` lists (step, detail), newest first."""

    def __init__(self, root: str, damaged: list[tuple[int, str]]):
        super().__init__(f"no intact checkpoint in {root}: " + "; ".join(f"step {s}: {d}" for s, d in damaged))
        self.damaged = damaged


def restore_newest_intact(root: str, steps: Sequence[int], restore: Callable[[int], T], *,
                          items: tuple[str, ...] | None = None,
                          on_damaged: Callable[[int, str], None] | None = None
                          ) -> tuple[int, T, list[tuple[int, str]]]:
    """Restores the first of `steps` (tried in order, newest first) that is not damaged.

    Each `root/STEP` is checked against its manifest first (`verify_step`,
    limited to `items`); a damaged step, or one without a manifest that fails
    to restore, goes to `on_damaged(step, detail)` and the next is tried.
    Returns (step, what `restore(step)` returned, the skipped damaged steps as
    (step, detail)). Raises `StepMismatchError` when a verified step fails to
    restore, `NoIntactCheckpointError` when every step is damaged. Nothing on
    disk is changed (setting damaged steps aside is the caller's choice).
    """
    damaged: list[tuple[int, str]] = []
    for step in steps:
        step_dir = os.path.join(root, str(step))
        status, detail = verify_step(step_dir, items=items)
        if status != "damaged":
            try:
                restored = restore(step)
            except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for bad files
                if status == "ok":  # the files are intact: they do not fit the target
                    raise StepMismatchError(root, step, _short(e)) from None
                detail = f"{step_dir} cannot be restored ({_short(e)})"
            else:
                return step, restored, damaged
        if on_damaged is not None:
            on_damaged(step, detail)
        damaged.append((step, detail))
    raise NoIntactCheckpointError(root, damaged)


def save_config(directory: str, config: ml_collections.ConfigDict) -> None:
    """Writes `directory/config.json` atomically (a complete old or new file, never a partial one)."""
    os.makedirs(directory, exist_ok=True)
    write_text_atomic(os.path.join(directory, CONFIG_FILE), config.to_json_best_effort(indent=2, sort_keys=True))


def load_config_json(directory: str) -> ml_collections.ConfigDict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no {CONFIG_FILE}: not an mmlm checkpoint or workdir")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise ConfigFileError(f"{path} is damaged: not valid JSON ({type(e).__name__}: {e}); restore it "
                              "from a copy (a workdir's config.json is what `mmlm train` wrote there)") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigFileError(f"{path} is damaged: expected a JSON object with a 'model' section, got "
                              f"{type(data).__name__ if not isinstance(data, dict) else 'no model section'}")
    return ml_collections.ConfigDict(_tuples(data))


class ConfigFileError(UserError, ValueError):
    """A checkpoint's or workdir's config.json that cannot be read as an mmlm config."""


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


def load_model_params_metadata(directory: str) -> Any:
    """The params tree of a model checkpoint as saved (leaves carry `shape` and `dtype`; no array is read)."""
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
    return getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta


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


def _abstract_params(config: ml_collections.ConfigDict, sharding: Any) -> Any:
    from mmlm.models.config import model_config_from_dict
    from mmlm.models.summary import abstract_params

    shapes = abstract_params(model_config_from_dict(config.model))
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)


def load_params_from_workdir(workdir: str, step: int | None = None, shardings: Any = None
                             ) -> tuple[Any, ml_collections.ConfigDict]:
    """(params, config) of a training workdir: the latest intact checkpoint, or `step`.

    For `mmlm eval --workdir` / `mmlm chat --workdir`. `shardings` is a
    `Sharding` for every leaf or a pytree of them matching the params (default:
    everything on the first local device). Params come back as plain (unboxed)
    jax arrays, fp32 master weights. Only the `params` item of the step is
    read (the optimizer state and data-iterator state are left on disk).

    Each step's params files are checked against the step's manifest first.
    Without `step`, a damaged latest step is reported (a warning naming the
    file) and the newest intact one is used; a damaged `step`, or no intact
    step at all, raises `UserError`. Nothing on disk is changed.
    """
    from flax import linen as nn

    config = load_config_json(workdir)
    root = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(root, options=options,
                                    item_handlers={"params": ocp.StandardCheckpointHandler()})
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{root!r} holds no checkpoint (has training saved one?)")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {root!r}; available: {sorted(steps)}")
        target = _abstract_params(config, shardings or jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))

        def restore(s: int) -> Any:
            return manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]

        def skipped(s: int, detail: str) -> None:
            log.warning("checkpoint step %d is damaged and skipped: %s", s, detail)

        try:
            found, params, damaged = restore_newest_intact(
                root, [step] if step is not None else steps, restore, items=("params",),
                on_damaged=None if step is not None else skipped)
        except StepMismatchError as e:
            raise UserError(f"checkpoint step {e.step} in {root} does not fit {workdir}/{CONFIG_FILE} "
                            f"({e.reason})") from None
        except NoIntactCheckpointError as e:
            if step is not None:
                raise UserError(f"checkpoint step {step} is damaged: {e.damaged[0][1]}; choose another --step "
                                f"(available: {sorted(steps)})") from None
            raise
        if damaged:
            log.warning("using checkpoint step %d; newer damaged step(s) were skipped: %s", found,
                        "; ".join(f"step {s}: {d}" for s, d in damaged))
        return nn.unbox(params), config
    finally:
        manager.close()
