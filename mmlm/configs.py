"""Finding a config file: a path, a bare name (`demo`, `experiments/budget`), or `FILE.py:ROW`.

The repository keeps its configs in the top-level `configs/` (README commands
pass `configs/demo.py`); a wheel ships the same files as the package
`mmlm._configs` (setup.py maps the directory). `resolve_config_path` looks, in
order, at the text as a path, at `configs/` under the working directory, at
the shipped package and at the `configs/` beside a source checkout, so that
`--config demo`, `--config configs/demo.py` and
`--config experiments/prefusion.py:pf2_t1` work from a checkout and from an
installed package alike. Every command that takes `--config` resolves it here
(through `mmlm.config_utils.load_config`, or directly where it needs the path).
"""

from __future__ import annotations

import importlib.util
import os

from mmlm.errors import ConfigError

CONFIGS_PACKAGE = "mmlm._configs"  # the shipped copy of configs/ (setup.py, pyproject.toml package-data)
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a source checkout's root (or site-packages)


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """A `--config` that is neither a file nor the name of a shipped config (the message lists the names)."""


def split_row(spec: str) -> tuple[str, str | None]:
    """`"configs/x.py:row"` -> ("configs/x.py", "row"); a plain path (or one that exists as given) -> (path, None).

    The row is the text after the last colon when the text before it names a
    `.py` file, so a path that merely contains a colon is still read whole.
    """
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, row = spec.rpartition(":")
    if not path.endswith(".py"):
        return spec, None
    return path, row


def config_dirs() -> list[str]:
    """Directories searched for a config name: ./configs, the shipped package, a checkout's configs/ (existing
    ones, without repeats)."""
    dirs = [os.path.join(os.getcwd(), "configs")]
    spec = importlib.util.find_spec(CONFIGS_PACKAGE)  # None in a checkout (its configs/ is found below)
    if spec is not None and spec.submodule_search_locations:
        dirs += list(spec.submodule_search_locations)
    if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")):  # running from a checkout, not a wheel
        dirs.append(os.path.join(_CHECKOUT, "configs"))
    out: list[str] = []
    for d in dirs:
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in [os.path.realpath(o) for o in out]:
            out.append(d)
    return out


def _defines_get_config(path: str) -> bool:
    """Whether a file is a config (it defines get_config), not a base the configs share (experiments/base.py)."""
    try:
        with open(path, encoding="utf-8") as f:
            return "def get_config(" in f.read()
    except OSError:
        return False


def config_names() -> list[str]:
    """Names a `--config` may give (`demo`, `experiments/budget`, ...): every config file found, sorted."""
    names: set[str] = set()
    for d in config_dirs():
        for root, subdirs, files in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith(("_", ".")))
            for f in files:
                if f.endswith(".py") and not f.startswith("_") and _defines_get_config(os.path.join(root, f)):
                    rel = os.path.relpath(os.path.join(root, f[:-3]), d)
                    names.add(rel.replace(os.sep, "/"))
    return sorted(names)


def _candidates(file: str) -> list[str]:
    """Where a name or relative path may live: `configs/demo.py` is also looked up as `demo.py` in the config
    directories (an installed package has no ./configs)."""
    rels = [file]
    norm = file.replace(os.sep, "/")
    if norm.startswith("configs/"):
        rels.append(norm[len("configs/"):])
    out = []
    for d in config_dirs():
        for rel in rels:
            for name in (rel, rel + ".py"):
                out.append(os.path.join(d, name))
    return out


def resolve_config_path(spec: str) -> str:
    """The file a `--config` names, with its `:ROW` (a study row) kept: `FILE.py:ROW` -> `PATH.py:ROW`.

    `spec` is a path (`configs/demo.py`, absolute or relative to the working
    directory), or a name looked up in the config directories (`demo`,
    `llava_mini_vicuna7b`, `experiments/budget`, with or without `.py`; a row
    as `experiments/budget:largest` or `experiments/budget.py:largest`);
    `configs/NAME.py` also finds the shipped copy when the working directory
    has no configs/. Raises `ConfigNotFoundError` (a `ConfigError`) listing the
    available names.
    """
    if os.path.exists(spec):
        return spec  # a directory is refused by the loader, naming it
    file, row = split_row(spec)
    suffix = "" if row is None else f":{row}"
    if os.path.exists(file):
        return file + suffix
    if not os.path.isabs(file):
        for path in _candidates(file):
            if os.path.isfile(path):
                return path + suffix
        if row is None and ":" in file:  # a name with a row: experiments/budget:largest
            name, _, named_row = file.rpartition(":")
            for path in _candidates(name):
                if os.path.isfile(path) and path.endswith(".py"):
                    return f"{path}:{named_row}"
    names = config_names()
    raise ConfigNotFoundError(
        f"no config {file!r}: the file does not exist and it is not a config name; pass a file such as "
        f"configs/tiny.py" + (f" or one of the names {names}" if names else ""))
