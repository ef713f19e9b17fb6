"""Study: the query compressor vs average pooling, at 1 and 4 tokens.

    mmlm train --config configs/experiments/pooling.py:avgpool_t1 --workdir W --config.seed=0
    python experiments/paper_trends/run.py --study pooling

Rows (the shared small model of `base.py`, grid_shapes, no pre-fusion: the
paper compares the two inside LLaVA-Mini, but here pre-fusion copied from the
foundation's LLM carries the answers through the text whatever the tokens
hold, see `matryoshka.py`; without it the compressed tokens are the image):
`query_t1`, `query_t4` (learned queries, cross-attention; the same configs
as `matryoshka.py:fixed1` / `fixed4` and `prefusion.py:pf0_t1` / `pf0_t4`, so the runner trains them once) and
`avgpool_t1`, `avgpool_t4` (adaptive average pooling of the 4x4 patch grid
to 1x1 / 2x2: no parameters).
"""

import os

from mmlm.config_utils import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))

ROWS = {
    "query_t1": "query compressor",
    "query_t4": "query compressor",
    "avgpool_t1": "average pooling",
    "avgpool_t4": "average pooling",
}


def get_config(row: str):
    kind, tokens = row.split("_t")
    config = _base.base_config(prefusion_layers=0, tokens=int(tokens))
    config.model.compressor.kind = "query" if kind == "query" else "avgpool"
    config.eval.budgets = (int(tokens),)
    return config
