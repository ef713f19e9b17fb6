"""Loading `ml_collections` config files and applying command-line overrides.

A config file is a Python file under `configs/` defining `get_config()` that
returns a `ConfigDict`. Overrides use the ml_collections flag syntax:
`--config.train.steps=100`, `--config.model.compressor.budgets=(1,4)`.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Iterable

import ml_collections


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports `path` and returns its `get_config()`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config file {path!r} does not exist; pass a file such as configs/tiny.py")
    spec = importlib.util.spec_from_file_location(
        f"mmlm_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config() function")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"{path}: get_config() returned {type(config).__name__}, expected ConfigDict")
    return config


def _parse_value(text: str, current: Any) -> Any:
    """Parses an override string to the type of the value it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text  # a None default with a free-form string value
        raise ValueError(f"cannot parse {text!r} as a Python literal") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (int, float)):
        value = (value,)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies `a.b.c=value` strings (a leading `--config.` is accepted)."""
    for item in overrides:
        text = item
        for prefix in ("--config.", "config."):
            if text.startswith(prefix):
                text = text[len(prefix):]
        if "=" not in text:
            raise ValueError(f"override {item!r} must look like --config.a.b=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                raise KeyError(f"override {item!r}: config has no field {'.'.join(parts[:i + 1])!r}")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise KeyError(
                f"override {item!r}: config has no field {key!r}; "
                f"fields here are {sorted(node.keys())}")
        current = node[leaf]
        try:
            value = _parse_value(raw, current)
        except ValueError as e:
            raise ValueError(f"override {item!r}: {e}") from None
        with node.ignore_type():
            node[leaf] = value
    return config


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file and applies overrides; the result is unlocked."""
    return apply_overrides(load_config_file(path), overrides)


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x=y` arguments (overrides) from the others."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides
