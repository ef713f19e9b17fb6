"""Loading `ml_collections` config files, applying command-line overrides, checking a field.

A config file is a Python file under `configs/` defining `get_config()` that
returns a `ConfigDict`; `--config` may also name it (`demo`,
`experiments/budget`: `mmlm.configs`). A study file (`configs/experiments/`)
declares `ROWS` and `get_config(row)`; `FILE.py:ROW` picks a row. Overrides use
the ml_collections flag syntax:
`--config.train.steps=100`, `--config.model.compressor.budgets=(1,4)`.

This module sits below every config section's owner: each section is a typed
dataclass built and validated by the package that reads it
(`ModelConfig.from_config` in `mmlm.models.config`, `DataConfig` in
`mmlm.data.config`, `MeshConfig` in `mmlm.sharding`, `TrainConfig` /
`OptimConfig` in `mmlm.train.config`, `EvalConfig` in `mmlm.eval.config`) with
`check_number` from here; `mmlm.train.config.validate_config` checks a whole
config.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Any, Iterable

import ml_collections

from mmlm.configs import resolve_config_path, split_row  # noqa: F401 - split_row: re-exported for callers
from mmlm.errors import ConfigError

MAX_SEED = 2**32 - 1  # seeds: what numpy and jax.random accept


def load_config_module(path: str) -> Any:
    """Imports the Python file `path` as a fresh module (a config file, or a base it shares).

    Raises `ConfigError` when the file is missing, is a directory, does not
    compile or raises while running.
    """
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist; pass a file such as configs/tiny.py")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} is not a file; pass a Python file such as configs/tiny.py")
    spec = importlib.util.spec_from_file_location(
        f"mmlm_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} is not a Python file (it must end in .py and define "
                          "get_config())")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r} has a syntax error at line {e.lineno}: {e.msg}") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from None
    except ConfigError:
        raise
    except Exception as e:  # the user's file failed while being imported
        raise ConfigError(f"config file {path!r} raised {type(e).__name__} while loading: {e}") from None
    return module


def config_rows(module: Any) -> tuple[str, ...]:
    """The rows a config module declares (`ROWS`, a sequence or mapping of names); () when it has none."""
    rows = getattr(module, "ROWS", ())
    return tuple(str(r) for r in rows)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`, or `get_config(row)` for `FILE.py:ROW`.

    `spec` is a path or a config name (`mmlm.configs.resolve_config_path`).
    A file with rows (an experiment study, `configs/experiments/`) defines
    `ROWS` (the row names) and `get_config(row)`; `FILE.py:ROW` selects one.
    Raises `ConfigError` when the file is missing, is a directory, does not
    compile, raises while running, has no `get_config`, returns something
    other than a `ConfigDict`, or when the row is missing or not one of `ROWS`
    (the message lists them).
    """
    spec = resolve_config_path(spec)
    path, row = split_row(spec)
    module = load_config_module(path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {path!r} defines no get_config() function")
    rows = config_rows(module)
    if row is not None and not rows:
        raise ConfigError(f"config file {path!r} has no rows (no ROWS), so {spec!r} cannot select row {row!r}; "
                          f"pass {path!r} alone")
    if rows and row is None:
        raise ConfigError(f"config file {path!r} is a study with rows; pick one as {path}:ROW, ROW one of "
                          f"{list(rows)}")
    if rows and row not in rows:
        raise ConfigError(f"config file {path!r} has no row {row!r}; its rows are {list(rows)}")
    try:
        config = get_config() if row is None else get_config(row)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"get_config({'' if row is None else repr(row)}) of {path!r} raised "
                          f"{type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of {path!r} returned {type(config).__name__}, expected an "
                          "ml_collections.ConfigDict")
    return config


def _parse_value(text: str, current: Any) -> Any:
    """Parses an override string to the type of the value it replaces.

    The field keeps its type: an int field takes an integer (`2.0` is read as
    2, `2.5` is refused), a float field an int or float, a bool field
    true/false, a tuple a sequence (a single value becomes a 1-tuple), a
    section a dict; a None field takes any literal (or the raw text).
    """
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if current is None:
            return text  # a None default with a free-form string value
        raise ValueError(f"expected {_type_name(current)}, got {text!r}") from None
    if current is None:
        return value
    if isinstance(current, int):
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {text!r}"
                             + (" (a fractional number for an integer field)" if isinstance(value, float) else ""))
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {text!r}")
        return float(value)
    if isinstance(current, (tuple, list)):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"expected a sequence such as (1,4), got {text!r}")
        return tuple(value) if isinstance(current, tuple) else list(value)
    if isinstance(current, (ml_collections.ConfigDict, dict)):
        if not isinstance(value, dict):
            raise ValueError(f"this is a config section; set its fields (a.b.field=value) or give a dict, "
                             f"got {text!r}")
        return value
    return value


def _type_name(value: Any) -> str:
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, (tuple, list)):
        return "a sequence such as (1,4)"
    return f"a Python literal ({type(value).__name__})"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies `a.b.c=value` strings (a leading `--config.` is accepted); mistakes raise `ConfigError`."""
    for item in overrides:
        text = item
        for prefix in ("--config.", "config."):
            if text.startswith(prefix):
                text = text[len(prefix):]
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --config.a.b=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"override {item!r}: config has no field {'.'.join(parts[:i + 1])!r}")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            near = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"override {item!r}: config has no field {key!r}"
                + (f"; fields here are {near}" if near else ""))
        current = node[leaf]
        try:
            value = _parse_value(raw, current)
        except ValueError as e:
            raise ConfigError(f"override {item!r}: config.{key}: {e}") from None
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


# ----------------------------------------------------------------------------- checking a field


def check_number(section: Any, key: str, *, where: str, kind: type = int, low: float | None = None,
                 high: float | None = None, low_open: bool = False, allow: tuple = (), hint: str = "") -> Any:
    """`section.<key>` (a dotted key) checked for type and range; returns it or raises `ConfigError`.

    `where` names the section in messages (`config.data`): the message says
    `config.data.<key> must be ...`. `kind` int wants an integer (not a bool),
    float any finite number; `allow` lists values accepted outside the range
    (e.g. -1 for "all").
    """
    node: Any = section
    for part in key.split("."):
        node = node[part]
    value = node
    name = f"{where}.{key}"
    if value in allow and not isinstance(value, bool):
        return value
    ok_type = (isinstance(value, int) and not isinstance(value, bool)) if kind is int else (
        isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok_type:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r} ({type(value).__name__})")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    bad = (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        rng = (f"> {low}" if low_open else f">= {low}") if high is None else \
            f"in {'(' if low_open else '['}{low}, {high}]"
        extra = f" or one of {list(allow)}" if allow else ""
        raise ConfigError(f"{name} must be {rng}{extra}, got {value!r}" + (f"; {hint}" if hint else ""))
    return value


def section_with_defaults(section: ml_collections.ConfigDict | dict | None,
                          defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`defaults` with the fields of `section` written over them (keys the defaults lack are kept too).

    A config saved before a field existed (a workdir's config.json) still
    builds its typed section: the missing field takes its default.
    """
    out = ml_collections.ConfigDict(defaults.to_dict())
    if section is not None:
        with out.ignore_type():
            for key, value in section.items():
                nested = isinstance(out.get(key), ml_collections.ConfigDict)
                if nested and isinstance(value, (ml_collections.ConfigDict, dict)):
                    out[key] = section_with_defaults(value, out[key])
                else:
                    out[key] = value
    return out


def typed_fields(cls: type, section: Any) -> dict[str, Any]:
    """The values of `section` for the fields of the dataclass `cls` (as plain values: tuples, not lists).

    Keys the dataclass does not name are left out (a study may keep notes of its own in a section).
    """
    import dataclasses

    def plain(value: Any) -> Any:
        if isinstance(value, ml_collections.ConfigDict):
            return {k: plain(v) for k, v in value.items()}
        return tuple(value) if isinstance(value, list) else value

    return {f.name: plain(section[f.name]) for f in dataclasses.fields(cls) if f.name in section}
