"""Helpers shared by the benchmarks and `mmlm compile`: the LLaVA-1.5 baseline of a config, byte
formatting, and the temporaries figure of a compiler's out-of-memory message."""

from __future__ import annotations

import dataclasses
import re

from mmlm.accelerators import GIB
from mmlm.models.config import ModelConfig


def baseline_of(cfg: ModelConfig) -> ModelConfig:
    """The LLaVA-1.5 baseline with the same vision tower and LLM: all N patch tokens, no compressor/pre-fusion."""
    return dataclasses.replace(cfg, mode="llava15", prefusion_layers=0, hd_grid=1,
                               compressor=dataclasses.replace(cfg.compressor, budgets=()))


_SIZE_RE = r"([\d.]+)\s*([KMGT]?)"


def _size(num: str, unit: str) -> float:
    return float(num) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]


def oom_temporaries(message: str) -> float | None:
    """The temporaries figure of the compiler's "does not fit in HBM" error, if that is the error."""
    m = re.search(r"temporaries \(" + _SIZE_RE + r"\)", message)
    if m:
        return _size(*m.groups())
    m = re.search(r"Used " + _SIZE_RE + r" of " + _SIZE_RE + r" hbm", message)
    return _size(m.group(1), m.group(2)) if m else None


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
