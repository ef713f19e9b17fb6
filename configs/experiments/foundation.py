"""The shared foundation of the paper-trend studies (the analogue of the paper's pretrained CLIP and LLM).

    mmlm train --config configs/experiments/foundation.py --workdir W

A LLaVA-1.5-style model trained from scratch on grid_shapes; its vision
tower and LLM initialise every row of the studies (`base.py`,
`foundation_config`). `experiments/paper_trends/run.py` trains it once
before the rows and exports those parts as a model checkpoint for
`--init_from`.
"""

import os

from mmlm.config_utils import load_config_module

_base = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
    return _base.foundation_config()
