"""The training loop: setup, resume, steps, evaluation, checkpoints, report.

    result = train(config, workdir)

`train` reads as its steps: check and lock the workdir, `_set_up` (data
pipeline, `Setup`), `_restore_or_start` (checkpoint or fresh state),
`TrainLoop.run` (steps, logging, evaluation, saving, signals), `_finish`
(results.json, the console table of `mmlm.train.results`).

1. Mesh from `config.mesh`; params and optimizer state sharded by the
   logical-axis rules (`mmlm.sharding`); the step is `jax.jit`-compiled
   ahead of time with in/out shardings and a donated state.
2. Resume: the latest checkpoint in `WORKDIR/checkpoints` (state, data
   iterator, run key) is restored onto the current mesh, so the same command
   continues a killed run exactly. Otherwise params are initialised from
   `config.seed` (and `train.init_from`, a converted model checkpoint).
3. Every step: one optimizer update on the global batch (`mmlm.train.step`).
   Metrics every `train.log_every` steps, evaluation every `eval.every`,
   asynchronous checkpoints every `train.checkpoint_every` and at the end.
4. SIGTERM (preemption) or Ctrl-C (SIGINT): the current step finishes, a
   checkpoint is saved, and the run exits with `PREEMPTED_EXIT_CODE`
   (`INTERRUPTED_EXIT_CODE` for Ctrl-C); rerunning resumes it. A second
   Ctrl-C interrupts at once (`mmlm.train.signals`).
5. A non-finite loss stops the run (`NonFiniteLossError`) without saving, so
   the last checkpoint on disk is the last good state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmlm.checkpoint import (PARAMS_DIR, has_checkpoints, is_model_checkpoint, load_model_params,
                             load_model_params_metadata, save_config)
from mmlm.errors import UserError
from mmlm.models.config import ModelConfig, model_config_from_dict
from mmlm.models.layers import count_params
from mmlm.models.llava_mini import LlavaMini
from mmlm.models.loss import max_supervised_tokens
from mmlm.models.prefusion import prefusion_from_llm
from mmlm.models.summary import dummy_batch
from mmlm import sharding as shd
from mmlm.train import data as data_lib
from mmlm.train.config import validate_config
from mmlm.train.checkpointing import Checkpointer, check_saved_model_config, check_workdir
from mmlm.safe_io import write_text_atomic
from mmlm.train.evaluate import Evaluator
from mmlm.train.lock import WorkdirLock
from mmlm.train.metrics import MetricWriter, model_flops_per_step, peak_tflops_per_device, train_row
from mmlm.train.optimizer import count_state, make_optimizer, part_schedule, trainable_parts
from mmlm.train.recipe import MatryoshkaRecipe, recipe_from_config
from mmlm.train.results import RESULTS_FILE, format_results, write_results  # noqa: F401 - RESULTS_FILE re-exported
from mmlm.train.signals import (  # noqa: F401 - exit codes re-exported for `mmlm train`
    INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch)
from mmlm.train.step import make_train_step, model_inputs

log = logging.getLogger(__name__)

VISION_PRETRAIN_FILE = "vision_pretrain.json"  # the summary of a fresh run's ViT pretraining


class TrainError(UserError, RuntimeError):
    """A problem the user can fix (reported without a traceback by `mmlm train`)."""


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became NaN/inf."""


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass
class Setup:
    """Everything the loop needs that does not change across steps."""

    config: ml_collections.ConfigDict
    cfg: ModelConfig
    model: LlavaMini
    mesh: Mesh
    parts: tuple[str, ...]
    budgets: tuple[int, ...]
    all_budgets: bool                  # every budget trains each step (train.matryoshka_loss="all")
    total_steps: int
    tx: Any
    schedules: dict[str, Any]
    abstract_state: dict[str, Any]     # ShapeDtypeStructs carrying the target shardings
    state_shardings: dict[str, Any]
    param_logical_specs: Any
    recipe: MatryoshkaRecipe = MatryoshkaRecipe()  # how the budgets train (train.matryoshka_loss and its knobs)


def training_budgets(cfg: ModelConfig) -> tuple[int, ...]:
    """Budgets sampled in training: the Matryoshka set, or the single default budget."""
    if cfg.mode == "llava_mini" and cfg.compressor.matryoshka:
        return tuple(sorted(set(int(b) for b in cfg.compressor.budgets)))
    return (cfg.check_budget(None),)


def resolve_total_steps(config: ml_collections.ConfigDict, pipeline: Any) -> int:
    """train.steps, or (steps == -1) train.epochs passes over the training split."""
    steps = int(config.train.steps)
    if steps > 0:
        return steps
    if steps != -1:
        raise ValueError(f"train.steps must be > 0, or -1 for train.epochs epochs; got {steps}")
    per_epoch = int(pipeline.batches_per_epoch)
    return max(1, int(math.ceil(float(config.train.epochs) * per_epoch)))


def build_setup(config: ml_collections.ConfigDict, total_steps: int, mesh: Mesh | None = None) -> Setup:
    """Model, mesh, optimizer and the sharded abstract train state (nothing allocated)."""
    cfg = model_config_from_dict(config.model)
    model = LlavaMini(cfg)
    mesh = mesh or shd.make_mesh(shd.mesh_config_from(config))
    rules = config.sharding_rules
    boxed = jax.eval_shape(model.init, jax.random.key(0), dummy_batch(cfg, abstract=False))
    logical = nn.get_partition_spec(boxed)["params"]
    abstract_params = nn.unbox(boxed)["params"]
    param_sh = shd.logical_to_shardings(logical, abstract_params, mesh, rules,
                                        allow_replication=shd.allow_replicated_fallback(config))
    parts = trainable_parts(abstract_params, tuple(config.train.trainable))
    schedules = {p: part_schedule(config.optim, p, total_steps) for p in parts}
    tx = make_optimizer(config.optim, abstract_params, parts, total_steps)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = shd.opt_state_shardings(abstract_opt, param_sh, mesh)
    rep = shd.replicated(mesh)
    state_sh = {"step": rep, "params": param_sh, "opt_state": opt_sh, "rng": rep}
    abstract = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": abstract_opt,
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return Setup(config=config, cfg=cfg, model=model, mesh=mesh, parts=parts, budgets=training_budgets(cfg),
                 all_budgets=config.train.get("matryoshka_loss", "sample") == "all", total_steps=total_steps,
                 tx=tx, schedules=schedules, abstract_state=abstract, state_shardings=state_sh,
                 param_logical_specs=logical, recipe=recipe_from_config(config))


def init_state(setup: Setup, seed: int) -> dict[str, Any]:
    """Fresh state, created directly in its shardings (threefry is partitionable: values do not
    depend on the mesh)."""
    cfg, model, tx = setup.cfg, setup.model, setup.tx
    sample = dummy_batch(cfg, abstract=False)

    def create(seed_arr):
        root = jax.random.key(seed_arr)
        params = nn.unbox(model.init(jax.random.fold_in(root, 0), sample))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "rng": jax.random.key_data(jax.random.fold_in(root, 1)).astype(jnp.uint32)}

    return jax.jit(create, out_shardings=setup.state_shardings)(jnp.asarray(seed, jnp.uint32))


def check_init_from(path: str) -> None:
    """Raises TrainError unless `path` is a model checkpoint (checked before any data is built)."""
    if not is_model_checkpoint(path):
        raise TrainError(f"--init_from {path!r} is not a model checkpoint (a directory with config.json and "
                         f"{PARAMS_DIR}/, as `mmlm convert` writes)")


def load_init_from(setup: Setup, state: dict[str, Any], path: str) -> dict[str, Any]:
    """Overwrites params with those of a model checkpoint (`mmlm convert` output; may be partial).

    Every checkpoint leaf must exist in the model with the same shape; model
    leaves absent from the checkpoint keep their fresh initialisation. The
    optimizer state stays zero (it is a fresh run).
    """
    check_init_from(path)
    meta_tree = load_model_params_metadata(path)
    model_flat = {jax.tree_util.keystr(p): a for p, a in
                  jax.tree_util.tree_flatten_with_path(setup.abstract_state["params"])[0]}
    ckpt_flat = jax.tree_util.tree_flatten_with_path(meta_tree)[0]
    problems = []
    for p, m in ckpt_flat:
        key = jax.tree_util.keystr(p)
        if key not in model_flat:
            problems.append(f"{key}: not a parameter of this model")
        elif tuple(m.shape) != tuple(model_flat[key].shape):
            problems.append(f"{key}: checkpoint {tuple(m.shape)} vs model {tuple(model_flat[key].shape)}")
    if problems:
        raise TrainError(f"--init_from {path}: checkpoint does not fit config.model:\n  " + "\n  ".join(problems))
    target = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(meta_tree),
        [model_flat[jax.tree_util.keystr(p)] for p, _ in ckpt_flat])
    loaded = load_model_params(path, target)
    loaded_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: loaded_flat.get(jax.tree_util.keystr(p), v), state["params"])
    log.info("initialised %d of %d parameter arrays from %s", len(loaded_flat), len(model_flat), path)
    return {**state, "params": params}


def init_prefusion_if_configured(config: ml_collections.ConfigDict, setup: Setup,
                                 state: dict[str, Any]) -> dict[str, Any]:
    """A fresh state with the pre-fusion blocks copied from the LLM's when `train.init_prefusion_from_llm`."""
    if not config.train.get("init_prefusion_from_llm") or "prefusion" not in state["params"]:
        return state
    try:
        params = prefusion_from_llm(state["params"])
    except ValueError as e:
        raise TrainError(f"train.init_prefusion_from_llm: {e}") from None
    params = jax.device_put(params, setup.state_shardings["params"])
    log.info("pre-fusion blocks initialised from the LLM's blocks")
    return {**state, "params": params}


# ------------------------------------------------------------------------------ checks

def _host(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def batch_signature(batch: dict[str, Any]) -> tuple:
    """What a compiled step is specialised to: every array's name, shape and dtype."""
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def _check_batch(config: ml_collections.ConfigDict, setup: Setup) -> None:
    b = int(config.data.batch_size)
    k = int(config.train.grad_accum_steps)
    dp = shd.data_parallel_size(setup.mesh)
    if k < 1 or b % k:
        raise TrainError(f"data.batch_size={b} must be a multiple of train.grad_accum_steps={k}")
    if (b // k) % dp:
        raise TrainError(f"micro-batch {b // k} (data.batch_size / train.grad_accum_steps) must be a multiple "
                         f"of the data-parallel size {dp} (mesh.data x mesh.fsdp)")


def check_data(config: ml_collections.ConfigDict) -> None:
    """Clear errors for the data settings a paper-scale config leaves to the user."""
    if not config.data.get("dataset_dir"):
        raise TrainError("config.data.dataset_dir is empty: pass --config.data.dataset_dir=DIR "
                         "(an `mmlm data build` output) or use a config with a `synthetic` section")
    if not config.data.get("tokenizer"):
        raise TrainError("config.data.tokenizer is empty: pass --config.data.tokenizer=PATH "
                         "(the LLM's tokenizer.model or tokenizer.json)")
    from mmlm.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(config.data.tokenizer).vocab_size
    if vocab > int(config.model.llm.vocab_size):
        raise TrainError(f"tokenizer {config.data.tokenizer!r} has {vocab} ids but model.llm.vocab_size is "
                         f"{config.model.llm.vocab_size}: ids past the embedding table cannot be learned")


# ------------------------------------------------------------------------------ a run

def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the final results (also in results.json)."""
    t_start = time.time()
    # Every check a user mistake can fail runs before any data is built or anything compiled.
    run = validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    buckets, fbuckets = run.data.length_buckets, run.data.frame_buckets
    workdir = check_workdir(workdir)
    # One run per workdir: a second one would interleave its metrics and checkpoints with this one's.
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        return _train_locked(config, workdir, t_start, buckets, fbuckets)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: ml_collections.ConfigDict, workdir: str, t_start: float, buckets: Any,
                  fbuckets: Any) -> dict[str, Any]:
    """`train` once the workdir is checked and locked: set up, restore (or start), loop, finish."""
    train_pipe, setup = _set_up(config, workdir)
    ckpt = Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
    data_iter = iter(train_pipe)
    state, pretrain_summary = _restore_or_start(config, setup, ckpt, data_iter, workdir)
    start = int(jax.device_get(state["step"]))
    counts = _param_counts(setup)
    writer = MetricWriter(workdir, total_steps=setup.total_steps, start_step=start,
                          progress_bar=bool(config.train.progress_bar))
    writer.message(f"mmlm train: {counts['params']:,} params ({counts['trainable_params']:,} trainable in "
                   f"{', '.join(setup.parts)}; optimizer state {counts['optimizer_state_size']:,}); "
                   f"mesh {shd.describe(setup.mesh)}; steps {start}->{setup.total_steps}; workdir {workdir}")
    loop = TrainLoop(config, setup, ckpt, data_iter, writer, _make_evaluator(config, setup), buckets, fbuckets)
    progress = loop.run(state, start)
    return _finish(workdir, setup, t_start, progress, counts, pretrain_summary)


# ------------------------------------------------------------------------- steps of a run

def _set_up(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Setup]:
    """Checks the workdir's saved config and the data, builds the training pipeline and the `Setup`."""
    check_saved_model_config(config, workdir)
    if config.train.init_from and not has_checkpoints(workdir):
        check_init_from(config.train.init_from)
    data_lib.prepare_synthetic(config, workdir)
    data_lib.resolve_data_config(config)
    check_data(config)
    train_pipe = data_lib.make_pipeline(config, config.data.train_split, train=True)
    data_lib.check_supervision(config, config.data.train_split)  # says how many examples the text length cuts
    total_steps = resolve_total_steps(config, train_pipe)
    setup = build_setup(config, total_steps)
    _check_batch(config, setup)
    log.info("mesh %s; trainable %s; budgets %s; %d steps", shd.describe(setup.mesh), setup.parts,
             setup.budgets, total_steps)
    return train_pipe, setup


def _restore_or_start(config: ml_collections.ConfigDict, setup: Setup, ckpt: Checkpointer, data_iter: Any,
                      workdir: str) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The newest intact checkpoint (state and data iterator), else a fresh state; then writes config.json.

    Returns the state and the ViT pretraining summary (a resumed run reports its start's again)."""
    pretrain_summary = None
    latest, state = ckpt.restore_latest(setup.abstract_state, data_iter)
    pretrain_file = os.path.join(workdir, VISION_PRETRAIN_FILE)
    if latest is not None:
        log.info("resumed from step %d (%s)", latest, ckpt.manager.directory)
        if os.path.exists(pretrain_file):
            with open(pretrain_file) as f:
                pretrain_summary = json.load(f)
    else:
        state, pretrain_summary = fresh_state(config, setup)
        if pretrain_summary is not None and jax.process_index() == 0:
            write_text_atomic(pretrain_file, json.dumps(pretrain_summary, indent=2))
    # Written only now: the given config matched the checkpoint (or the workdir is fresh).
    if jax.process_index() == 0:
        save_config(workdir, config)
    return state, pretrain_summary


def _param_counts(setup: Setup) -> dict[str, int]:
    params = setup.abstract_state["params"]
    return {"params": count_params(params),
            "trainable_params": sum(count_params(params[p]) for p in setup.parts),
            "optimizer_state_size": count_state(setup.abstract_state["opt_state"])}


def _make_evaluator(config: ml_collections.ConfigDict, setup: Setup) -> Evaluator | None:
    """The in-training evaluator, or None when `eval.every` < 0 or there is nothing to evaluate."""
    ev = config.eval
    if int(ev.every) >= 0 and (int(ev.num_questions) > 0 or int(ev.loss_batches) > 0):
        return Evaluator(config, setup.cfg, setup.mesh)
    return None


def _finish(workdir: str, setup: Setup, t_start: float, progress: Progress, counts: dict[str, int],
            pretrain_summary: dict[str, float] | None) -> dict[str, Any]:
    """The run's results: written to results.json (process 0) and, for a completed run, printed."""
    results = {
        "status": progress.status,
        "steps": progress.step,
        "total_steps": setup.total_steps,
        "wall_time_s": time.time() - t_start,
        "train_time_s": progress.train_time,
        **counts,
        "mesh": shd.describe(setup.mesh),
        "train": dict(progress.last_row),
        "eval": dict(progress.eval_row),
        "samples": progress.samples,
    }
    if pretrain_summary is not None:
        results["vision_pretrain"] = pretrain_summary
    if jax.process_index() == 0:
        write_results(workdir, results)
        if progress.status == "completed":
            print(format_results(results), flush=True)
    return results


# ------------------------------------------------------------------------------ loop

@dataclasses.dataclass
class Progress:
    """Where the loop stands, and what the results report of it."""

    step: int
    status: str = "completed"  # "preempted" (SIGTERM) or "interrupted" (Ctrl-C) when stopped early
    train_time: float = 0.0  # seconds of stepping, compilation excluded
    last_row: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last train metrics row
    eval_row: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last evaluation row
    samples: list[dict[str, str]] = dataclasses.field(default_factory=list)  # held-out answers of the last eval


class TrainLoop:
    """The step loop: one compiled program per batch shape; metrics every `train.log_every` steps,
    evaluation every `eval.every`, a checkpoint every `train.checkpoint_every`, all three at the last
    step; a signal saves and stops (`mmlm.train.signals`); a non-finite loss stops without saving."""

    def __init__(self, config: ml_collections.ConfigDict, setup: Setup, ckpt: Checkpointer, data_iter: Any,
                 writer: MetricWriter, evaluator: Evaluator | None, buckets: Any, fbuckets: Any):
        self.config, self.setup, self.ckpt, self.data_iter = config, setup, ckpt, data_iter
        self.writer, self.evaluator, self.buckets, self.fbuckets = writer, evaluator, buckets, fbuckets
        self.step_fn = jax.jit(
            make_train_step(setup.model, setup.tx, setup.parts, setup.budgets,
                            int(config.train.grad_accum_steps), setup.schedules, setup.mesh,
                            config.sharding_rules, all_budgets=setup.all_budgets, recipe=setup.recipe),
            in_shardings=(setup.state_shardings, None), out_shardings=(setup.state_shardings, None),
            donate_argnums=(0,),
            compiler_options=dict(config.get("tpu_compiler_options") or {})
            if jax.default_backend() == "tpu" else None)
        self.log_every = max(int(config.train.log_every), 1)
        self.ckpt_every = max(int(config.train.checkpoint_every), 1)
        self.eval_every = int(config.eval.every)
        self.peak = peak_tflops_per_device(float(config.train.peak_tflops_per_device)) * 1e12 * jax.device_count()
        self.programs: dict[tuple, Any] = {}  # batch shapes -> compiled step (one per text-length x frame bucket)
        self.flops_of: dict[tuple, float] = {}

    def run(self, state: dict[str, Any], start: int) -> Progress:
        """Steps from `start` to `setup.total_steps` (or a signal); closes the checkpointer and the writer."""
        progress = Progress(step=start)
        preempt = PreemptionWatch()
        try:
            self._steps(state, progress, preempt)
        except Preempted:
            progress.status = "interrupted" if preempt.signal_name == "SIGINT" else "preempted"
            self.writer.message(f"{preempt.signal_name}: saved a checkpoint at step {progress.step}; rerun the "
                                "same command to resume")
        finally:
            preempt.close()
            self.ckpt.close()
            self.writer.close()
        return progress

    def _steps(self, state: dict[str, Any], progress: Progress, preempt: PreemptionWatch) -> None:
        total = self.setup.total_steps
        pending: list[dict[str, Any]] = []  # device metrics since the last log row
        pending_flops = 0.0
        t_log = time.perf_counter()
        prev = None
        while progress.step < total:
            batch = self._next_batch(progress.step)
            shape = batch_signature(batch)
            if shape not in self.programs:
                t_log += self._compile(state, batch, shape)  # compiling is not training time
            state, metrics = self.programs[shape](state, batch)
            progress.step += 1
            step = progress.step
            pending.append(metrics)
            pending_flops += self.flops_of[shape]
            # Check the previous step (already finished or nearly) so the host never stalls the queue.
            if prev is not None and not int(prev["finite"]):
                raise NonFiniteLossError(_nan_message(step - 1, _host(prev), self.ckpt))
            prev = metrics
            is_last = step == total
            do_log = step % self.log_every == 0 or is_last
            do_ckpt = step % self.ckpt_every == 0 or is_last
            do_eval = self.evaluator is not None and (
                (self.eval_every > 0 and step % self.eval_every == 0) or is_last)
            stop = preempt.reached(step)
            if not (do_log or do_ckpt or do_eval or stop):
                continue
            host = _host(pending)
            if not all(int(m["finite"]) for m in host):
                bad = next(i for i, m in enumerate(host) if not int(m["finite"]))
                raise NonFiniteLossError(_nan_message(step - len(host) + 1 + bad, host[bad], self.ckpt))
            elapsed = time.perf_counter() - t_log
            progress.train_time += elapsed
            if do_log:
                self._log(progress, host, elapsed, pending_flops)
            pending, pending_flops = [], 0.0
            if do_ckpt or stop:
                self.ckpt.save(step, state, self.data_iter)
            if do_eval:
                self._evaluate(progress, state, is_last)
            if stop and not is_last:
                raise Preempted()
            t_log = time.perf_counter()

    def _next_batch(self, step: int) -> dict[str, Any]:
        """The next global batch, sharded on the mesh (padded to its length and frame buckets)."""
        local = model_inputs(next(self.data_iter))
        _check_supervised(local, self.setup.cfg.loss_positions, step, self.ckpt)
        return data_lib.global_batch(local, self.setup.mesh, self.buckets, self.fbuckets)

    def _compile(self, state: dict[str, Any], batch: dict[str, Any], shape: tuple) -> float:
        """Compiles the step for a new batch shape; returns the seconds it took."""
        setup = self.setup
        t0 = time.time()
        self.programs[shape] = self.step_fn.lower(state, batch).compile()
        self.flops_of[shape] = model_flops_per_step(setup.cfg, batch, setup.parts, setup.budgets,
                                                    setup.all_budgets, setup.recipe)
        frames = f", {batch['images'].shape[1]}-frame" if "images" in batch else ""
        self.writer.message(f"compiled the train step for {batch['input_ids'].shape[1]}-token{frames} batches "
                            f"in {time.time() - t0:.1f}s ({self.flops_of[shape] / 1e9:.2f} model GFLOP/step)")
        return time.time() - t0

    def _log(self, progress: Progress, host: list[dict[str, Any]], elapsed: float, flops: float) -> None:
        progress.last_row = self.writer.write(progress.step, train_row(host, elapsed, flops, self.peak,
                                                                       self.setup.parts))
        self.writer.progress(progress.step, {"loss": progress.last_row["loss"],
                                             "acc": progress.last_row["token_accuracy"]})

    def _evaluate(self, progress: Progress, state: dict[str, Any], is_last: bool) -> None:
        assert self.evaluator is not None
        eval_metrics, progress.samples = self.evaluator.run(
            state["params"], samples=int(self.config.eval.print_samples) if is_last else 0)
        progress.eval_row = self.writer.write(progress.step, eval_metrics)
        self.writer.message(f"step {progress.step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in eval_metrics.items() if isinstance(v, float)))


def fresh_state(config: ml_collections.ConfigDict,
                setup: Setup) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The state a run starts from when it has no checkpoint: random init with `config.seed`, the
    parts of `train.init_from` loaded over it, pre-fusion copied from the LLM when configured, then
    the ViT pretraining when configured. Returns the state and the pretraining summary (or None)."""
    state = init_state(setup, int(config.seed))
    if config.train.init_from:  # a partial model checkpoint (e.g. the paper-trends foundation's parts)
        state = load_init_from(setup, state, config.train.init_from)
    state = init_prefusion_if_configured(config, setup, state)
    return pretrain_vision_if_configured(config, setup, state)


def pretrain_vision_if_configured(config: ml_collections.ConfigDict, setup: Setup,
                                  state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float] | None]:
    """A fresh state whose ViT is pretrained on per-patch labels when `train.vision_pretrain.steps` > 0
    (else unchanged), and the pretraining summary (None when it did not run)."""
    vp = config.train.get("vision_pretrain")
    if vp is None or int(vp.steps) <= 0:
        return state, None
    from mmlm.train.vision_pretrain import pretrain_vision

    vision, summary = pretrain_vision(config, setup.model, state["params"]["vision"],
                                      setup.state_shardings["params"]["vision"],
                                      progress=bool(config.train.progress_bar) and jax.process_index() == 0)
    return {**state, "params": {**state["params"], "vision": vision}}, summary


def _check_supervised(batch: dict[str, Any], limit: int, step: int, ckpt: Checkpointer) -> None:
    """With `model.loss_positions` > 0: stop before a row's answer tokens past the limit go unlearned."""
    if limit <= 0:
        return
    most = max_supervised_tokens(batch["labels"])
    if most > limit:
        last = ckpt.latest_step()
        where = f"the last checkpoint is step {last}" if last is not None else "no checkpoint was saved yet"
        raise TrainError(f"step {step + 1}: a training row has {most} supervised (answer) tokens but "
                         f"model.loss_positions={limit} puts the LM head on only {limit} per row; {where}. "
                         f"Rerun with --config.model.loss_positions={most} or more, or 0 (every position).")


def _nan_message(step: int, metrics: dict[str, Any], ckpt: Checkpointer) -> str:
    last = ckpt.latest_step()
    where = f"the last good checkpoint is step {last} in {ckpt.manager.directory}" if last is not None else \
        "no checkpoint was saved yet"
    return (f"non-finite loss at step {step} (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}): stopping without saving; {where}. "
            "Lower optim.learning_rate or optim.grad_clip_norm and rerun (it resumes from that checkpoint).")
