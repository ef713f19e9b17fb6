"""The typed `config.eval` section: the evaluation a training run does on its eval split.

Defaults, with the meaning and units of each field, are in
`mmlm.config_defaults.eval_config`; `EvalConfig.from_config` checks a section
(a field it lacks takes that default).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mmlm import config_defaults
from mmlm.config_utils import ConfigError, check_number, section_with_defaults, typed_fields
from mmlm.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`config.eval`: how often and on how much of the eval split a run reports eval/loss and eval/accuracy."""

    every: int
    loss_batches: int
    num_questions: int
    max_new_tokens: int
    budgets: tuple[int, ...]
    print_samples: int
    categories_file: str

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict, *, model: ModelConfig | None = None) -> "EvalConfig":
        """Checks the ranges, and each of `budgets` against `model` (a budget the model supports)."""
        e = section_with_defaults(section, config_defaults.eval_config())
        w = "config.eval"
        check_number(e, "every", where=w, low=-1, hint="0 = only after the last step, -1 = never")
        for key in ("loss_batches", "num_questions", "print_samples"):
            check_number(e, key, where=w, low=0)
        check_number(e, "max_new_tokens", where=w, low=1)
        if model is not None:
            for b in e.budgets:
                try:
                    model.check_budget(int(b))
                except (ValueError, TypeError) as err:
                    raise ConfigError(f"config.eval.budgets: {err}") from None
        fields = typed_fields(cls, e)
        fields["budgets"] = tuple(int(b) for b in e.budgets)
        return cls(**fields)
