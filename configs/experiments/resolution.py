"""Study: resolution, LLaVA-Mini-HD grid 1 vs 2 at the same budgets.

    mmlm train --config configs/experiments/resolution.py:hd2 --workdir W --config.seed=0
    python experiments/paper_trends/run.py --study resolution

The task is `grid_shapes_hd`: the grid_shapes scenes and questions rendered
at 128 px with small shapes (~9 px wide), so that at the 64 px the ViT reads
the colours survive and the shapes blur. Rows (the shared small model of
`base.py`, 1 pre-fusion layer; Matryoshka budgets {1, 4, 16} so that one
model per grid is scored at every budget):

* `hd1`: the 128 px image resized to one 64 px view (4x4 patches).
* `hd2`: LLaVA-Mini-HD with a 2x2 grid: four 64 px crops of the 128 px image
  (stitched to an 8x8 key grid for the compressor) plus the whole image,
  all read by pre-fusion.
"""

import os

from mmlm.config_utils import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))

SOURCE_SIZE = 128  # pixels of the rendered grid_shapes_hd images (the HD source of hd_grid 2)
ROWS = {
    "hd1": "HD grid 1 (64 px view)",
    "hd2": "HD grid 2 (4 crops + whole image)",
}


def get_config(row: str):
    config = _base.base_config(tokens=16, budgets=(1, 4, 16))
    config.model.hd_grid = {"hd1": 1, "hd2": 2}[row]  # n x n crops + the whole image; 1 = no HD
    config.synthetic.kind = "grid_shapes_hd"
    config.synthetic.image_size = SOURCE_SIZE
    config.eval.budgets = (1, 4, 16)
    return config
