"""Study: modality pre-fusion depth at 1 token, tokens without pre-fusion, and LLaVA-1.5.

    mmlm train --config configs/experiments/prefusion.py:pf2_t1 --workdir W --config.seed=0
    python experiments/paper_trends/run.py --study prefusion

Rows (the shared small model of `base.py`, grid_shapes, one fixed budget each):

* `pf0_t1`, `pf1_t1`, `pf2_t1`, `pf4_t1`: 0 / 1 / 2 / 4 pre-fusion layers, 1 token.
* `pf0_t4`, `pf0_t16`: no pre-fusion, 4 and 16 tokens; 16 compressed
  tokens are as many as there are patches ("all" here: the 4x4 patch grid).
* `llava15`: the LLaVA-1.5 baseline, all 16 patch features projected
  straight to the LLM (no compressor, no pre-fusion).
"""

import os

from mmlm.config_utils import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))

ROWS = {
    "pf0_t1": "0 pre-fusion layers",
    "pf0_t4": "0 pre-fusion layers",
    "pf0_t16": "0 pre-fusion layers",
    "pf1_t1": "1 pre-fusion layer",
    "pf2_t1": "2 pre-fusion layers",
    "pf4_t1": "4 pre-fusion layers",
    "llava15": "LLaVA-1.5 (all patches)",
}


def get_config(row: str):
    if row == "llava15":
        config = _base.base_config(prefusion_layers=0, tokens=1)
        config.model.mode = "llava15"  # the compressor settings are unused in this mode
        config.eval.budgets = (_base.num_patches(),)
        return config
    depth, budget = row.split("_")  # "pf<layers>_t<tokens>"
    layers, tokens = int(depth[len("pf"):]), int(budget[len("t"):])
    config = _base.base_config(prefusion_layers=layers, tokens=tokens)
    config.eval.budgets = (tokens,)
    return config
