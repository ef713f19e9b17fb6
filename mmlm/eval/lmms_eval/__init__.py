"""mmlm in lmms-eval: the `mmlm` model and the `mmlm_questions` task.

    pip install -e ".[eval]"
    MMLM_QUESTIONS=q.jsonl MMLM_IMAGES=DIR python -m lmms_eval --model mmlm \
        --model_args workdir=W,num_vision_tokens=1 --tasks mmlm_questions \
        --include_path "$(python -c 'import mmlm.eval.lmms_eval as m; print(m.TASKS_DIR)')"

lmms-eval finds the model through the `lmms_eval.models` entry point that
pyproject.toml declares (`model_manifest` below); the class is
`mmlm.eval.lmms_eval.model.MMLM`. `TASKS_DIR` holds the task YAML for
`--include_path`; the task's code is `mmlm.eval.lmms_eval.questions`.
This package is the only place in mmlm that imports lmms_eval, and only
inside the functions and modules that need it, so `TASKS_DIR` costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_NAME = "mmlm"
MODEL_CLASS = "mmlm.eval.lmms_eval.model.MMLM"
TASKS_DIR = str(Path(__file__).resolve().parent / "tasks")


def model_manifest() -> Any:
    """The `lmms_eval.models` entry point: registers `--model mmlm` (an `lmms_eval` `ModelManifest`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)
