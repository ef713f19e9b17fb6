"""Study: one Matryoshka {1, 4, 16} model at every budget for the training cost of one fixed model.

    mmlm train --config configs/experiments/budget.py:weighted --workdir W --config.seed=0
    python experiments/paper_trends/run.py --study budget     # every row x 3 seeds, tables, plots

The Matryoshka study's setting (`matryoshka.py`: grid_shapes, no pre-fusion,
1,200 steps from the shared foundation). There one uniform-draw Matryoshka
model matches the fixed-budget models at 1 and 4 tokens but not at 16; M3's
every-budget loss costs about 2.9x a fixed-16 training and 3x the steps
cost 3x. Every recipe row here takes the same 1,200 optimizer steps and at
most 1.5x the fixed-16 row's training FLOPs (`train_flops` in results.json:
the analytic model FLOPs of all its steps, teacher forwards included):

* `matryoshka`: the uniform draw (the Matryoshka study's row, shared).
* `weighted`: draws weighted toward the largest budget, probabilities
  0.2 / 0.2 / 0.6 for 1 / 4 / 16 tokens (`train.matryoshka_probs`): 16
  tokens trains on 720 steps instead of 400, 1 and 4 on 240.
* `distill`: uniform draws; a draw of 1 or 4 tokens also runs the 16-token
  answer distribution forward (stop-gradient) and learns it beside the
  labels (`train.matryoshka_loss="distill"`, KL weight 1).
* `weighted_distill`: both.
* `largest`: 16 tokens on every step (as the fixed16 model trains) and,
  beside it on the same batch, 1 token on 30% of the steps and 4 tokens on
  another 30% (`train.matryoshka_loss="largest"`, draws 0.3 / 0.3 / 0.4;
  the loss the mean of the two budgets'): 1.49x fixed16's FLOPs.
* `largest_b`: the same with 1 token beside 16 on 45% of the steps and 4
  tokens on 15% (draws 0.45 / 0.15 / 0.4; 1.49x fixed16's FLOPs): more
  steps for the 1-token budget, which `largest` trains on 360.
* `largest_1`: 16 tokens every step and 1 token beside it on 60% of the steps, 4 tokens never drawn
  (draws 0.6 / 0 / 0.4; 1.49x fixed16's FLOPs): from `largest` (1 token on 30% of the steps) to
  `largest_b` (45%) the 1-token accuracy rose and the 16-token one held; this row asks whether all of
  the budget beside 16 going to 1 token closes the 1-token gap (budget 4 then only rides on the nesting).
* `largest_b_w2`: `largest_b` with the drawn budget's loss weighted 2:1
  against the largest's on the steps that pair them
  (`train.matryoshka_weights=(2, 2, 1)`): in `largest` and `largest_b` the
  1-token budget trails the uniform draw's (46-48 against 51), though it
  trains on more steps; this row asks whether its half of a shared loss is
  what holds it back.
* `pooled`: uniform draws with M3's nesting (`model.compressor.nesting="pool"`):
  every step runs all 16 queries and average-pools their outputs to the
  drawn budget (2 x 2 for 4 tokens, the mean of all 16 for 1), so each query
  trains on every step and no query has to be both the whole image (budget 1)
  and one cell (budget 16), as the first query must with prefix nesting.
* `pooled_largest_b`: `largest_b`'s draws and loss with pooled nesting.
* `offset_largest_b`: `largest_b` with prefix nesting plus a learned offset
  on the queries of budgets 1 and 4 (`model.compressor.nesting="offset"`,
  5 vectors): the 1-token query keeps its place in the 16-query grid but may
  move away from that cell's role when it answers alone.
* `heavy_distill`: draws 0.1 / 0.1 / 0.8 (16 tokens on 960 steps) with the
  self-distillation keeping the rarely drawn small budgets close to it.
* `fixed1`, `fixed4`, `fixed16`: the fixed-budget models (shared with the
  Matryoshka study).

The runner adds the oracle (best of 1 / 4 / 16 tokens per question of the
`matryoshka` row).
"""

import os

from mmlm.config_utils import load_config_module

_here = os.path.dirname(os.path.abspath(__file__))
_matryoshka = load_config_module(os.path.join(_here, "matryoshka.py"))

WEIGHTED_PROBS = (0.2, 0.2, 0.6)  # draw probabilities of budgets 1 / 4 / 16 in the weighted rows
HEAVY_PROBS = (0.1, 0.1, 0.8)     # ... in the heavy row
LARGEST_PROBS = (0.3, 0.3, 0.4)   # the largest row: the budget trained beside 16 (0.4: 16 alone), 1.49x fixed16
LARGEST_B_PROBS = (0.45, 0.15, 0.4)  # the largest_b row: more 1-token steps, 1.49x fixed16
LARGEST_1_PROBS = (0.6, 0.0, 0.4)   # the largest_1 row: every drawn step trains 1 token beside 16, 1.49x fixed16
W2_WEIGHTS = (2.0, 2.0, 1.0)  # largest_b_w2: loss weights of budgets 1 / 4 / 16 (a paired step: 2/3 drawn, 1/3 16)

# Row -> method (one line per method in the plots). The runner trains one seed of every row first, in this order.
ROWS = {
    "largest": "Matryoshka, 16 every step + 1 or 4 on 30% of steps each",
    "largest_b": "Matryoshka, 16 every step + 1 on 45% / 4 on 15% of steps",
    "largest_1": "Matryoshka, 16 every step + 1 on 60% of steps (4 never drawn)",
    "largest_b_w2": "Matryoshka, 16 every step + 1 on 45% / 4 on 15% of steps, drawn budget's loss x2",
    "pooled": "Matryoshka, pooled nesting (M3), uniform draws",
    "pooled_largest_b": "Matryoshka, pooled nesting (M3), 16 every step + 1 on 45% / 4 on 15% of steps",
    "offset_largest_b": "Matryoshka, per-budget query offsets, 16 every step + 1 on 45% / 4 on 15% of steps",
    "weighted_distill": "Matryoshka, draws 0.2/0.2/0.6 + self-distillation",
    "heavy_distill": "Matryoshka, draws 0.1/0.1/0.8 + self-distillation",
    "weighted": "Matryoshka, draws 0.2/0.2/0.6",
    "distill": "Matryoshka, self-distillation from 16",
    "matryoshka": "Matryoshka {1,4,16}, uniform draws",
    "fixed1": "fixed budget",
    "fixed4": "fixed budget",
    "fixed16": "fixed budget",
}


def get_config(row: str):
    if row in ("matryoshka", "fixed1", "fixed4", "fixed16"):
        return _matryoshka.get_config(row)
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    config = _matryoshka.get_config("matryoshka")
    if "weighted" in row:
        config.train.matryoshka_probs = WEIGHTED_PROBS
    if row.startswith("pooled"):
        config.model.compressor.nesting = "pool"
        config.eval.budgets = (1, 4, 16)  # pools are square: no 2- or 8-token budget
        row = row[len("pooled_"):] or "matryoshka"  # the recipe it pools
    if row.startswith("offset_"):
        config.model.compressor.nesting = "offset"
        row = row[len("offset_"):]
    if row.startswith("largest"):
        config.train.matryoshka_loss = "largest"
        config.train.matryoshka_probs = {"largest": LARGEST_PROBS, "largest_b": LARGEST_B_PROBS,
                                         "largest_b_w2": LARGEST_B_PROBS, "largest_1": LARGEST_1_PROBS}[row]
        if row == "largest_b_w2":
            config.train.matryoshka_weights = W2_WEIGHTS
    if row.startswith("heavy"):
        config.train.matryoshka_probs = HEAVY_PROBS
    if "distill" in row:
        config.train.matryoshka_loss = "distill"
        config.train.distill_weight = 1.0
    return config
