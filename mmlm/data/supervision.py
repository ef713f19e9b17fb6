"""Conversations that the text length cuts: counted at `mmlm data build` and at train start.

A conversation longer than `data.max_text_len` tokens is cut at that length
(`templates.encode_conversation`). Cut inside an answer, it still trains on
the answer's first tokens; cut before the first answer, it keeps no
supervised token and trains nothing, at the full cost of its row. Neither is
an error, but both must be said: the build report and the trainer's first
lines count them and name examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from mmlm import IGNORE_INDEX
from mmlm.data import templates

MAX_NAMED = 20  # record ids kept per kind in a report
TRUNCATED = "truncated"        # longer than the text length: cut, some answer tokens left
UNSUPERVISED = "unsupervised"  # cut before any answer token (or the image placeholder cannot fit): trains nothing


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """What decides where a conversation is cut: tokenizer, template, system prompt, text length."""

    tokenizer: str
    template: str
    max_text_len: int
    system_prompt: str | None = None

    @classmethod
    def from_data_config(cls, data: Any) -> "TextSettings":
        """The settings of a `config.data` section (`mmlm.data.config.default_data_config`)."""
        return cls(str(data.tokenizer), str(data.template), int(data.max_text_len), data.get("system_prompt"))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def classify(tokenizer: Any, conversations: Sequence[Mapping[str, Any]], settings: TextSettings) -> str | None:
    """None when the conversation fits, else TRUNCATED or UNSUPERVISED."""
    try:
        enc = templates.encode_conversation(tokenizer, conversations, settings.template, settings.max_text_len,
                                            system=settings.system_prompt)
    except ValueError:  # the prompt before the image placeholder alone exceeds the text length
        return UNSUPERVISED
    if not np.any(enc["labels"] != IGNORE_INDEX):
        return UNSUPERVISED
    return TRUNCATED if enc["truncated"] else None


@dataclasses.dataclass
class Counts:
    """Per split: examples checked, cut (TRUNCATED + UNSUPERVISED), and left with no supervised token."""

    checked: int = 0
    truncated: int = 0     # every cut example, the unsupervised ones included
    unsupervised: int = 0
    examples: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {TRUNCATED: [], UNSUPERVISED: []})

    def add(self, kind: str | None, record_id: str) -> None:
        self.checked += 1
        if kind is None:
            return
        self.truncated += 1
        self.unsupervised += kind == UNSUPERVISED
        if len(self.examples[kind]) < MAX_NAMED:
            self.examples[kind].append(record_id)

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "truncated": self.truncated, "unsupervised": self.unsupervised,
                "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Counts":
        return cls(int(d["checked"]), int(d["truncated"]), int(d["unsupervised"]),
                   {TRUNCATED: list(d["examples"][TRUNCATED]), UNSUPERVISED: list(d["examples"][UNSUPERVISED])})

    def summary(self, what: str, settings: TextSettings, *, total: int | None = None) -> str | None:
        """One line on the cut examples of `what` (e.g. "split 'train'"), or None when none is cut.

        `total`: the split's size when only a sample of it was checked.
        """
        if not self.truncated:
            return None
        sample = f" (in a sample of {self.checked} of {total})" if total is not None and total > self.checked else ""
        line = (f"{what}: {self.truncated} of {self.checked} examples{sample} are longer than "
                f"max_text_len={settings.max_text_len} tokens ({settings.template}, tokenizer "
                f"{settings.tokenizer or 'tiny'}) and are cut")
        if self.unsupervised:
            line += (f"; {self.unsupervised} of them keep no supervised (answer) token and train nothing "
                     f"(e.g. {', '.join(self.examples[UNSUPERVISED][:5])})")
        elif self.examples[TRUNCATED]:
            line += f" (e.g. {', '.join(self.examples[TRUNCATED][:5])})"
        return line + "; raise the text length (data.max_text_len) or shorten those conversations"
