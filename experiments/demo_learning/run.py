"""Learning curves of the demo task per question category, for config variants.

Trains a config (default `configs/demo.py`) in process for `--steps` steps
and, every `--every` steps, scores the first answer token of every question
of a fixed held-out batch under teacher forcing, per category (colour,
shape, count, position, existence). This is the fast diagnostic behind the
demo's tuning: which categories a variant learns, and how soon.

    python experiments/demo_learning/run.py --name demo
    python experiments/demo_learning/run.py --name lr2e-3 -- --config.optim.learning_rate.vision=2e-3 ...
    python experiments/demo_learning/run.py --name baseline9 -- --config.model.mode=llava15 \
        --config.model.prefusion_layers=0 --config.model.compressor.tokens=9

Everything after `--` is an ml_collections override of the config. Rows go
to `WORKDIR/NAME.jsonl` (`step`, `seconds`, `loss`, `acc/<category>`); the
synthetic data is built once under `WORKDIR/data` and shared by variants.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmlm import IGNORE_INDEX
from mmlm.config_utils import load_config
from mmlm.data import synth
from mmlm.data.tokenizer import load_tokenizer
from mmlm.errors import UserError
from mmlm.models.loss import targets_from_labels
from mmlm.train import data as data_lib
from mmlm.train import trainer
from mmlm.train.step import make_train_step, model_inputs

def answer_categories(tok) -> dict[int, str]:
    """Token id of every one-word `shapes` answer -> its question category.

    The categories' answer vocabularies are disjoint (colour words, shape
    words, number words, left/right/above/below, yes/no), so the reference
    answer token names the question's category; no position bookkeeping
    between the text and the LLM sequence (which holds the vision tokens) is
    needed.
    """
    words = {**{w: "color" for w in synth.COLORS}, **{w: "shape" for w in synth.SHAPES},
             **{w: "count" for w in synth.NUMBER_WORDS},
             **{w: "position" for w in ("left", "right", "above", "below")}, "yes": "exist", "no": "exist"}
    out = {}
    for word, cat in words.items():
        ids = tok.encode(word)
        if len(ids) != 1:
            raise ValueError(f"answer {word!r} is {len(ids)} tokens in this tokenizer; expected one")
        out[int(ids[0])] = cat
    return out


def answer_starts(targets: np.ndarray) -> list[tuple[int, int]]:
    """(row, position) of the first supervised target of every answer in a (B, L) target array."""
    out = []
    for i, row in enumerate(targets):
        sup = row != IGNORE_INDEX
        starts = np.nonzero(sup & ~np.concatenate([[False], sup[:-1]]))[0]
        out += [(i, int(j)) for j in starts]
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.py", help="config file (default: the demo)")
    ap.add_argument("--name", required=True, help="variant name: rows go to WORKDIR/NAME.jsonl")
    ap.add_argument("--workdir", default="/tmp/demo_learning", help="output and data directory")
    ap.add_argument("--steps", type=int, default=800, help="optimizer steps")
    ap.add_argument("--every", type=int, default=200, help="steps between evaluations")
    ap.add_argument("--eval_size", type=int, default=250, help="held-out conversations scored")
    ap.add_argument("--budget", type=int, default=0, help="vision-token budget scored (0 = model default)")
    args = ap.parse_args(argv)

    config = load_config(args.config, overrides)
    os.makedirs(args.workdir, exist_ok=True)
    data_lib.prepare_synthetic(config, args.workdir)
    data_lib.resolve_data_config(config)
    setup = trainer.build_setup(config, args.steps)
    state, _ = trainer.fresh_state(config, setup)  # the same start as `mmlm train` without a checkpoint
    step_fn = jax.jit(make_train_step(setup.model, setup.tx, setup.parts, setup.budgets, 1, setup.schedules,
                                      setup.mesh, all_budgets=setup.all_budgets), donate_argnums=(0,))
    train_iter = iter(data_lib.make_pipeline(config, "train", train=True))
    eval_cfg = config.copy_and_resolve_references()
    eval_cfg.data.eval_batch_size = args.eval_size
    held_out = next(iter(data_lib.make_pipeline(eval_cfg, config.data.eval_split, train=False)))
    budget = args.budget or None

    @jax.jit
    def predict(params, batch):
        out = setup.model.apply({"params": params}, batch, budget)
        return jnp.argmax(out["logits"], -1), targets_from_labels(batch["labels"], out["text_index"])

    tok = load_tokenizer(config.data.get("tokenizer") or None)
    by_token = answer_categories(tok)
    _, targets = map(np.asarray, predict(state["params"], model_inputs(held_out)))
    cats = {(i, j): by_token.get(int(targets[i, j]), "other") for i, j in answer_starts(targets)}

    def score(params) -> dict[str, float]:
        pred, targets = map(np.asarray, predict(params, model_inputs(held_out)))
        hits = collections.defaultdict(list)
        for (i, j), cat in cats.items():
            hits[cat].append(bool(pred[i, j] == targets[i, j]))
        return {f"acc/{k}": round(float(np.mean(v)), 3) for k, v in sorted(hits.items())}

    out_path = os.path.join(args.workdir, f"{args.name}.jsonl")
    t0 = time.time()
    with open(out_path, "w") as out:
        for step in range(1, args.steps + 1):
            state, metrics = step_fn(state, model_inputs(next(train_iter)))
            if step % args.every == 0 or step == args.steps:
                row = {"step": step, "seconds": round(time.time() - t0, 1), "loss": round(float(metrics["loss"]), 4),
                       **score(state["params"])}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(json.dumps(row), flush=True)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a mistake in the arguments or config: the message, not a traceback
        print(f"demo_learning: {e}", file=sys.stderr)
        sys.exit(2)
