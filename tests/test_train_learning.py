"""A learning test: the full training recipe overfits 8 examples to near-zero loss.

Every end-to-end test compares one run with another (resume, meshes, hosts),
so a deterministic learning bug (a wrong loss mask, a gradient that never
reaches a part, an optimizer that does not step) would pass them all. Here a
model smaller than configs/tiny.py (1 LLM block, 1 pre-fusion block, 2 ViT
blocks, vocabulary 128) memorises 8 fixed conversations: 3 supervised answer
tokens each, after an image and a random question. Everything is seeded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.config_utils import load_config
from mmlm.models.summary import dummy_batch
from mmlm.train import trainer
from mmlm.train.step import make_train_step, model_inputs

STEPS = 150
LR = 3e-3
T = 16  # tokens per example: BOS, <image>, question 2..9, answer 10..12, end 13, padding 14..15


def overfit_config():
    config = load_config("configs/tiny.py", [])
    m = config.model
    m.vision.layers = 2     # features of block 1 (select_layer -2)
    m.llm.layers = 1
    m.llm.vocab_size = 128
    m.prefusion_layers = 1
    m.compressor.budgets = ()  # one budget (all 4 queries): one branch to compile
    o = config.optim
    o.schedule = "constant"
    o.warmup_ratio = 0.0
    o.weight_decay = 0.0
    for part in o.learning_rate:
        o.learning_rate[part] = LR
    return config


def examples(cfg, n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = dummy_batch(cfg, n, T, abstract=False)  # every model input, in the model's shapes
    ids = rng.integers(4, cfg.llm.vocab_size, (n, T)).astype(np.int32)
    ids[:, 1] = IMAGE_TOKEN_ID
    labels = np.full((n, T), IGNORE_INDEX, np.int32)
    labels[:, 10:13] = ids[:, 10:13]
    mask = np.ones((n, T), bool)
    mask[:, 14:] = False
    s = cfg.image_size
    batch.update(input_ids=ids, labels=labels, attention_mask=mask,
                 images=rng.standard_normal((n, 1, 1, s, s, 3)).astype(np.float32))
    return batch


def test_tiny_model_overfits_eight_examples():
    config = overfit_config()
    setup = trainer.build_setup(config, STEPS)
    assert setup.budgets == (4,) and setup.parts == ("projector", "compressor", "prefusion", "llm")
    state = trainer.init_state(setup, int(config.seed))
    step = jax.jit(make_train_step(setup.model, setup.tx, setup.parts, setup.budgets, 1, setup.schedules,
                                   setup.mesh),
                   donate_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
    batch = jax.tree.map(jnp.asarray, model_inputs(examples(setup.cfg)))
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert int(metrics["finite"]) == 1
    assert int(metrics["supervised_tokens"]) == 8 * 3
    assert losses[0] > 3.0                      # chance level is ln(128) = 4.85
    assert losses[-1] < 0.05, losses[::10]
    assert float(metrics["token_accuracy"]) == 1.0
    assert int(state["step"]) == STEPS
