"""Study: one Matryoshka model vs fixed-budget models, and MQT's "any m" sampling.

    mmlm train --config configs/experiments/matryoshka.py:matryoshka --workdir W --config.seed=0
    python experiments/paper_trends/run.py --study matryoshka     # every row x 3 seeds, tables, plots

Rows (the shared small model of `base.py`, grid_shapes, no pre-fusion, MQT's
setting: the compressed tokens alone carry the image to the LLM). With 1
pre-fusion layer copied from the foundation's LLM the fused text carries the
answers and the budget does not matter: the `matryoshka` row then scored
76.8-78.0% at every budget from 1 to 16 tokens (seeds 0-2), so that setting
cannot test a budget claim.

* `matryoshka`: 16 nested queries; each step trains one budget drawn
  uniformly from {1, 4, 16}; scored at 1, 2, 4, 8 and 16 tokens.
* `matryoshka_3x`: the same with 3,600 steps, so that each budget is
  trained for about as many steps as its fixed-budget model (1,200).
* `fixed1`, `fixed4`, `fixed16`: a model per budget (C^2 = 1, 4, 16
  queries), scored at its budget (the same configs as `prefusion.py:pf0_t1`,
  `pf0_t4`, `pf0_t16`, so the runner trains them once).
* `matryoshka_all`: the `matryoshka` model trained M3's way: every budget
  on every batch, the loss the mean of the three budgets' losses
  (`train.matryoshka_loss="all"`), for the same 1,200 steps: each budget
  gets as many updates as its fixed-budget model, at the FLOPs of all three
  budgets per step (6.55 vs 2.0-2.5 model GFLOP; about twice the wall time).
* `mqt_any_m`: MQT's sampling: each step draws m uniformly from 1..16
  (the same nested query order, so the square budgets are still lattices);
  scored like `matryoshka`.

The runner adds the oracle, the best budget per question of the
`matryoshka` model (an upper bound for a per-question budget choice).
"""

import os

from mmlm.config_utils import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))

SCORED = (1, 2, 4, 8, 16)  # budgets the nested models are scored at (the trained ones and two in between)
# Row -> the method it belongs to (one line per method in the plots).
ROWS = {
    "matryoshka": "Matryoshka {1,4,16}",
    "matryoshka_3x": "Matryoshka {1,4,16}, 3x steps",
    "matryoshka_all": "Matryoshka {1,4,16}, every budget each step (M3)",
    "fixed1": "fixed budget",
    "fixed4": "fixed budget",
    "fixed16": "fixed budget",
    "mqt_any_m": "MQT any m in 1..16",
}


def get_config(row: str):
    if row in ("matryoshka", "matryoshka_3x", "matryoshka_all"):
        config = _base.base_config(prefusion_layers=0, tokens=16, budgets=(1, 4, 16))
        config.eval.budgets = SCORED
        if row == "matryoshka_3x":  # one budget per step: 3 budgets x 1,200 steps
            config.train.steps = 3 * config.train.steps
        if row == "matryoshka_all":  # every budget each step: 1,200 steps train each budget 1,200 times
            config.train.matryoshka_loss = "all"
    elif row == "mqt_any_m":
        config = _base.base_config(prefusion_layers=0, tokens=16, budgets=tuple(range(1, 17)))
        config.eval.budgets = SCORED
    elif row.startswith("fixed"):
        m = int(row[len("fixed"):])
        config = _base.base_config(prefusion_layers=0, tokens=m)
        config.eval.budgets = (m,)
    else:
        raise ValueError(f"unknown row {row!r}")
    return config
