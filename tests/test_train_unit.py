"""Trainer pieces in-process on the tiny config: optimizer recipe, train step, metrics, eval helpers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.config_utils import load_config
from mmlm.models.layers import count_params
from mmlm.train import trainer
from mmlm.train.evaluate import first_questions
from mmlm.train.metrics import truncate_rows_after
from mmlm.train.optimizer import count_state, lr_factor
from mmlm.train.step import budget_index, make_eval_step, make_train_step

T = 16
# These tests compare numbers, not speed: skip LLVM's optimisation passes (halves compile times).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny(*overrides: str):
    return load_config("configs/tiny.py", list(overrides))


def batch_for(cfg, b=8, seed=0):
    """Random conversations: placeholder at 1, answer tokens at 10..12, right padding from 14."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, cfg.llm.vocab_size, (b, T)).astype(np.int32)
    ids[:, 1] = IMAGE_TOKEN_ID
    labels = np.full((b, T), IGNORE_INDEX, np.int32)
    labels[:, 10:13] = ids[:, 10:13]
    mask = np.ones((b, T), bool)
    mask[:, 14:] = False
    s = cfg.image_size
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "fuse_mask": labels == IGNORE_INDEX,
            "images": rng.standard_normal((b, 1, 1, s, s, 3)).astype(np.float32),
            "frame_mask": np.ones((b, 1), bool)}


def setup_and_state(config, steps=10):
    setup = trainer.build_setup(config, steps)
    return setup, trainer.init_state(setup, int(config.seed))


_STEPS: dict = {}


def step_fn(setup, config, grad_accum=None):
    """The jitted train step (one per setup and accumulation, so tests share compilations)."""
    k = int(config.train.grad_accum_steps) if grad_accum is None else grad_accum
    key = (id(setup), k)
    if key not in _STEPS:
        _STEPS[key] = (setup, jax.jit(make_train_step(setup.model, setup.tx, setup.parts, setup.budgets, k,
                                                      setup.schedules, setup.mesh), compiler_options=FAST_COMPILE))
    return _STEPS[key][1]


@pytest.fixture(scope="module")
def stage2():
    config = tiny()
    setup, state = setup_and_state(config)
    return config, setup, state


def test_frozen_parts_have_no_optimizer_state(stage2):
    config, setup, state = stage2
    params = state["params"]
    assert "vision" not in setup.parts
    trainable = sum(count_params(params[p]) for p in setup.parts)
    # Adam: mu + nu per trainable scalar, plus a few step counters; nothing for the frozen vision tower.
    assert 2 * trainable <= count_state(state["opt_state"]) < 2 * trainable + 100
    leaves = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
    assert not any("'vision'" in jax.tree_util.keystr(p) for p, _ in leaves)


def test_stage1_trains_only_the_projector():
    config = tiny("--config.train.trainable=('projector',)", "--config.optim.warmup_ratio=0.0")
    setup = trainer.build_setup(config, 10)
    assert setup.parts == ("projector",)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), setup.abstract_state["params"])
    opt_state = setup.tx.init(params)
    assert count_state(opt_state) < 2 * count_params(params["projector"]) + 100
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = setup.tx.update(grads, opt_state, params)
    for part in ("vision", "compressor", "prefusion", "llm"):
        assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates[part])), part
    assert all(bool(jnp.all(u < 0)) for u in jax.tree.leaves(updates["projector"]))


def test_unknown_trainable_part_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown part"):
        trainer.build_setup(tiny("--config.train.trainable=('projector','decoder')"), 10)


def test_per_part_learning_rates_and_schedule():
    config = tiny("--config.optim.learning_rate.llm=1e-3", "--config.optim.learning_rate.projector=1e-4",
                  "--config.optim.warmup_ratio=0.1")
    setup = trainer.build_setup(config, 100)
    f = lr_factor(config.optim, 100)
    assert float(f(0)) == 0.0 and float(f(10)) == pytest.approx(1.0) and float(f(100)) == pytest.approx(0.0)
    assert float(f(5)) == pytest.approx(0.5)
    assert float(setup.schedules["llm"](10)) == pytest.approx(1e-3)
    assert float(setup.schedules["projector"](10)) == pytest.approx(1e-4)
    assert float(setup.schedules["llm"](55)) == pytest.approx(1e-3 * 0.5, rel=1e-5)  # cosine midpoint


def test_wsd_schedule_holds_the_peak_then_decays_linearly():
    config = tiny("--config.optim.schedule=wsd", "--config.optim.warmup_ratio=0.1", "--config.optim.decay_ratio=0.2",
                  "--config.optim.end_lr_ratio=0.1")
    f = lr_factor(config.optim, 100)
    assert float(f(0)) == 0.0 and float(f(5)) == pytest.approx(0.5)
    assert [float(f(s)) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
    assert float(f(90)) == pytest.approx(0.55) and float(f(100)) == pytest.approx(0.1)
    config.optim.decay_ratio = 0.0
    with pytest.raises(ValueError, match="decay_ratio.*0.0"):
        lr_factor(config.optim, 100)


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_a_one_step_run_takes_its_step_at_the_peak(kind):
    """`--config.train.steps=1` (a smoke run) has no room for warmup: its one step uses the peak LR."""
    config = tiny(f"--config.optim.schedule={kind}", "--config.optim.warmup_ratio=0.1")
    assert float(lr_factor(config.optim, 1)(0)) == pytest.approx(1.0)
    f = lr_factor(config.optim, 2)  # one warmup step from 0, then the peak
    assert float(f(0)) == 0.0 and float(f(1)) == pytest.approx(1.0)


def test_gradient_accumulation_matches_one_big_batch(stage2):
    config, setup, state = stage2
    batch = batch_for(setup.cfg, b=8)
    one, m1 = step_fn(setup, config, 1)(jax.tree.map(jnp.copy, state), batch)
    acc, m2 = step_fn(setup, config, 4)(jax.tree.map(jnp.copy, state), batch)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert int(m1["supervised_tokens"]) == int(m2["supervised_tokens"]) == 8 * 3
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(acc["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_matryoshka_budget_is_sampled_from_the_step_key(stage2):
    config, setup, state = stage2
    assert setup.budgets == (1, 4)
    rng = state["rng"]
    picks = [int(budget_index(rng, jnp.int32(s), 2)) for s in range(40)]
    assert set(picks) == {0, 1}  # both budgets get trained
    assert picks == [int(budget_index(rng, jnp.int32(s), 2)) for s in range(40)]  # a function of (key, step)
    # The step trains the sampled budget: its loss equals the loss at that budget.
    batch = batch_for(setup.cfg)
    eval_step = jax.jit(make_eval_step(setup.model), static_argnums=2, compiler_options=FAST_COMPILE)
    ref = {m: eval_step(state["params"], batch, m) for m in setup.budgets}
    ref = {m: float(r["loss_sum"]) / float(r["num_tokens"]) for m, r in ref.items()}
    assert ref[1] != ref[4]
    for s in (picks.index(0), picks.index(1)):
        st = dict(jax.tree.map(jnp.copy, state), step=jnp.asarray(s, jnp.int32))
        _, m = step_fn(setup, config)(st, batch)
        assert int(m["budget"]) == setup.budgets[picks[s]]
        assert float(m["loss"]) == pytest.approx(ref[int(m["budget"])], rel=1e-5)


def test_matryoshka_loss_all_trains_the_mean_of_every_budget(stage2):
    """train.matryoshka_loss="all" (M3): loss and gradient are the means over the budgets, every step."""
    config, setup, state = stage2
    batch = batch_for(setup.cfg)
    trainable, frozen = {p: state["params"][p] for p in setup.parts}, {
        p: v for p, v in state["params"].items() if p not in setup.parts}
    eval_step = make_eval_step(setup.model)

    def loss_at(train_params, m):
        r = eval_step({**train_params, **frozen}, batch, m)
        return r["loss_sum"] / r["num_tokens"]

    grad = jax.jit(jax.value_and_grad(loss_at), static_argnums=1, compiler_options=FAST_COMPILE)
    (l1, g1), (l4, g4) = grad(trainable, 1), grad(trainable, 4)
    want_norm = float(optax.tree.norm(jax.tree.map(lambda a, b: (a + b) / 2, g1, g4)))
    step = jax.jit(make_train_step(setup.model, setup.tx, setup.parts, setup.budgets, 1, setup.schedules,
                                   setup.mesh, all_budgets=True), compiler_options=FAST_COMPILE)
    for s in (0, 1):  # the same at every step: nothing is sampled
        _, m = step(dict(jax.tree.map(jnp.copy, state), step=jnp.asarray(s, jnp.int32)), batch)
        assert float(m["loss"]) == pytest.approx((float(l1) + float(l4)) / 2, rel=1e-5)
        assert float(m["grad_norm"]) == pytest.approx(want_norm, rel=1e-4)
        assert int(m["budget"]) == 0 and int(m["supervised_tokens"]) == 8 * 3


def test_matryoshka_loss_all_is_set_by_the_config_and_counted_in_flops():
    from mmlm.config_utils import ConfigError
    from mmlm.train.config import validate_config
    from mmlm.models.flops import train_step_flops

    config = tiny("--config.train.matryoshka_loss=all")
    setup = trainer.build_setup(config, 10)
    assert setup.all_budgets and not trainer.build_setup(tiny(), 10).all_budgets
    kw = dict(batch_size=4, text_len=T, budgets=setup.budgets)
    per = [train_step_flops(setup.cfg, batch_size=4, text_len=T, budgets=(m,))["total"] for m in setup.budgets]
    assert train_step_flops(setup.cfg, **kw)["total"] == pytest.approx(sum(per) / len(per))
    assert train_step_flops(setup.cfg, all_budgets=True, **kw)["total"] == pytest.approx(sum(per))
    with pytest.raises(ConfigError, match="matryoshka_loss='each'"):
        validate_config(tiny("--config.train.matryoshka_loss=each"))


def test_non_finite_loss_leaves_state_unchanged(stage2):
    config, setup, state = stage2
    batch = batch_for(setup.cfg)
    batch["images"][0, 0, 0, 0, 0, 0] = np.nan
    new, m = step_fn(setup, config)(jax.tree.map(jnp.copy, state), batch)
    assert int(m["finite"]) == 0 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # optax.apply_if_finite skipped the update: the Adam moments and counts are untouched, the skip is counted.
    for a, b in zip(jax.tree.leaves(new["opt_state"].inner_state), jax.tree.leaves(state["opt_state"].inner_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not bool(new["opt_state"].last_finite) and int(new["opt_state"].total_notfinite) == 1
    assert int(new["step"]) == int(state["step"]) + 1
    # The next finite batch is applied again (the wrapper does not stay stuck).
    after, m2 = step_fn(setup, config)(new, batch_for(setup.cfg))
    assert int(m2["finite"]) == 1 and bool(after["opt_state"].last_finite)
    assert int(after["opt_state"].total_notfinite) == 1
    # (the learning rate is still 0 at the first schedule step, so the params do not move yet; the moments do)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(after["opt_state"].inner_state), jax.tree.leaves(state["opt_state"].inner_state)))


def test_init_follows_the_seed(stage2):
    config, setup, s1 = stage2
    s3 = trainer.init_state(setup, 1)
    assert not np.array_equal(np.asarray(s1["params"]["llm"]["embed_tokens"]["embedding"]),
                              np.asarray(s3["params"]["llm"]["embed_tokens"]["embedding"]))


def test_metrics_rows_after_a_resume_point_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)] + [{"step": 5, "eval/accuracy": 0.5}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 9, \"lo")  # a line cut by a kill
    truncate_rows_after(str(path), 5)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 5]


def test_first_questions_cut_at_the_first_answer():
    ids = np.array([[1, IMAGE_TOKEN_ID, 7, 8, 9, 2, 10, 11, 12, 2, 0, 0],
                    [0] * 12], np.int32)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[0, 4:6] = ids[0, 4:6]      # first answer "9 </s>"
    labels[0, 8:10] = ids[0, 8:10]    # second answer
    batch = {"input_ids": ids, "labels": labels, "example_id": np.array([3, -1], np.int32),
             "images": np.ones((2, 1, 1, 4, 4, 3), np.float32), "frame_mask": np.array([[True], [False]])}
    (q,) = first_questions(batch, stop_ids=[2])
    assert q.example_id == 3
    assert q.prompt == [1, IMAGE_TOKEN_ID, 7, 8]
    assert q.answer == [9]
    assert q.media.shape == (1, 1, 4, 4, 3)


def test_eval_categories_follow_the_synthetic_question_ids(tmp_path):
    """example_id (record index) -> category of the record's first question, single- and multi-turn ids."""
    from mmlm.train.data import write_categories

    lines = [{"question_id": "shapes-val-000000-q0", "category": "color"},
             {"question_id": "shapes-val-000000-q1", "category": "count"},
             {"question_id": "shapes-val-000007-q0", "category": "shape"},
             {"question_id": "moving_shapes-val-000002", "category": "direction"}]
    src = tmp_path / "val_questions.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    write_categories(src, tmp_path / "cats.json")
    assert json.loads((tmp_path / "cats.json").read_text()) == {"0": "color", "7": "shape", "2": "direction"}


def test_results_table_lists_accuracy_by_category():
    table = trainer.format_results({
        "steps": 5, "wall_time_s": 2.0, "train_time_s": 1.0, "params": 100, "trainable_params": 100,
        "mesh": "data=1", "train": {}, "eval": {"eval/accuracy": 0.9, "eval/accuracy/color": 1.0, "eval/accuracy/shape": 0.8,
                              "eval/num_questions": 10},
        "samples": [{"question": "What color is the circle?", "answer": "red", "reference": "red",
                     "category": "color", "correct": "yes"}]})
    assert "held-out exact match" in table and "90.0% of 10 questions" in table
    assert "color" in table and "80.0%" in table and "What color is the circle?" in table


def test_train_category_weights_reach_the_train_split_only(tmp_path, monkeypatch):
    """`synthetic.train_category_weights` shapes the train split; the eval split keeps the uniform mix."""
    from mmlm.data import build, synth
    from mmlm.train import data as data_lib

    calls = {}

    def fake_synthesize(kind, out, num, seed, split, **kw):
        calls[split] = kw["category_weights"]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}_questions.jsonl").write_text("")
        return out / f"{split}.json"

    monkeypatch.setattr(synth, "synthesize", fake_synthesize)
    monkeypatch.setattr(build, "build_dataset", lambda *a, **k: None)
    config = load_config("configs/demo.py", [f"--config.synthetic.cache_dir={tmp_path}"])
    data_lib.prepare_synthetic(config, str(tmp_path))
    weights = synth.parse_category_weights(config.synthetic.train_category_weights)
    assert weights and calls == {config.data.train_split: weights, config.data.eval_split: None}
    first = config.data.dataset_dir

    # Another mix is another dataset (the cache key holds the weights); a bad mix fails up front.
    config = load_config("configs/demo.py", [f"--config.synthetic.cache_dir={tmp_path}",
                                             "--config.synthetic.train_category_weights=count=2"])
    data_lib.prepare_synthetic(config, str(tmp_path))
    assert config.data.dataset_dir != first
    config = load_config("configs/demo.py", [f"--config.synthetic.cache_dir={tmp_path}",
                                             "--config.synthetic.train_category_weights=counting=2"])
    with pytest.raises(ValueError, match="'counting'"):
        data_lib.prepare_synthetic(config, str(tmp_path))


@pytest.fixture(scope="module")
def video_dataset(tmp_path_factory):
    """4 synthetic moving-shapes videos (6 s, stored at 1 fps), built with TFDS."""
    from mmlm.data import build, synth

    root = tmp_path_factory.mktemp("videos")
    path = synth.synthesize("moving_shapes", root / "raw", 4, 0, "train", image_size=32, progress=False)
    build.build_dataset({"train": path}, None, root / "ds", videos_dir=root / "raw", name="moving", progress=False)
    return root / "ds"


def test_frame_buckets_give_the_loss_of_full_frame_batches(stage2, video_dataset):
    """A video batch (3 real frames of max_frames 8, uint8 pixels) cut by data.frame_buckets=(2, 4) to 4
    frames trains exactly like the uncut batch: same loss, gradient norm and updated params."""
    from mmlm.train.data import global_batch, make_pipeline
    from mmlm.train.step import model_inputs

    config, setup, state = stage2
    data = tiny(f"--config.data.dataset_dir={video_dataset}", "--config.data.max_frames=8",
                "--config.data.video_fps=0.5", "--config.data.max_text_len=48")
    local = model_inputs(next(iter(make_pipeline(data, "train", train=False, local_only=True))))
    # 4 videos and 4 evaluation padding rows (no frames, no labels) in a batch of 8.
    assert local["images"].dtype == np.uint8 and local["frame_mask"].sum(1).tolist() == [3] * 4 + [0] * 4
    full = global_batch(local, setup.mesh)
    cut = global_batch(local, setup.mesh, frame_buckets=(2, 4))
    assert full["images"].shape[1] == 8 and cut["images"].shape[1] == 4 and cut["frame_mask"].shape == (8, 4)
    new_full, m_full = step_fn(setup, config)(jax.tree.map(jnp.copy, state), full)
    new_cut, m_cut = step_fn(setup, config)(jax.tree.map(jnp.copy, state), cut)
    assert int(m_cut["supervised_tokens"]) == int(m_full["supervised_tokens"]) > 0
    assert float(m_cut["loss"]) == pytest.approx(float(m_full["loss"]), rel=1e-6)
    np.testing.assert_allclose(float(m_cut["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_cut["params"]), jax.tree.leaves(new_full["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_prefusion_blocks_start_as_copies_of_the_llm_blocks(scan):
    """train.init_prefusion_from_llm: pre-fusion block i = LLM block i mod L, in both stack layouts."""
    from mmlm.models.layers import unstack_layers

    config = tiny(f"--config.model.scan_layers={scan}", "--config.model.prefusion_layers=3",
                  "--config.train.init_prefusion_from_llm=true")
    setup, state = setup_and_state(config)
    new = trainer.init_prefusion_if_configured(config, setup, state)["params"]
    llm, blocks = unstack_layers(new["llm"]["decoder"]), unstack_layers(new["prefusion"]["blocks"])
    assert len(llm) == 2 and len(blocks) == 3 and ("layers" in new["prefusion"]["blocks"]) == scan
    for i in range(3):
        jax.tree.map(np.testing.assert_array_equal, blocks[f"layers_{i}"], llm[f"layers_{i % 2}"])
    old = unstack_layers(state["params"]["prefusion"]["blocks"])
    assert not np.array_equal(old["layers_0"]["q_proj"]["kernel"], blocks["layers_0"]["q_proj"]["kernel"])
    for part in ("llm", "vision", "compressor", "projector"):  # nothing else moves
        jax.tree.map(np.testing.assert_array_equal, new[part], state["params"][part])
    off = tiny("--config.model.prefusion_layers=3")
    assert trainer.init_prefusion_if_configured(off, setup, state) is state  # off by default
    # The train step donates the state: the copies must be buffers of their own.
    step = jax.jit(make_train_step(setup.model, setup.tx, setup.parts, setup.budgets, 1, setup.schedules,
                                   setup.mesh), donate_argnums=(0,), compiler_options=FAST_COMPILE)
    after, metrics = step({**state, "params": new}, batch_for(setup.cfg))
    assert np.isfinite(float(metrics["loss"]))


def test_load_init_from_refuses_a_directory_that_is_not_a_model_checkpoint(tmp_path):
    # Callers other than `mmlm train` (the demo-learning tool) get the same message, not an Orbax error.
    with pytest.raises(trainer.TrainError, match="is not a model checkpoint"):
        trainer.load_init_from(None, {}, str(tmp_path))
