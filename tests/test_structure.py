"""The package's structure, read from the source with `ast` (nothing is imported):

* no module imports another module's private names (`from mmlm.x import _name`);
* argument parsing lives in the command layer (`mmlm.cli`) only;
* no library module sets the environment when it is imported;
* imports run one way down the layers of `LAYERS`.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmlm"

# Each top-level part of the package (a subpackage or a module directly under mmlm/) and its layer. A module
# may import from a lower layer and from its own part; parts of the same layer do not import each other,
# except in the bottom layer (basic utilities that build on one another: errors <- safe_io, ...).
LAYERS: dict[str, int] = {
    # 0: basic utilities (no model, no data), including loading config files and checking their fields
    "mmlm": 0, "errors": 0, "pixels": 0, "safe_io": 0, "host_memory": 0, "sharding": 0,
    "configs": 0, "config_utils": 0, "accelerators": 0,
    # 1-2: compute kernels, then the models built on them
    "kernels": 1,
    "models": 2,
    # 3: the data pipeline, and checkpoints of models
    "data": 3, "checkpoint": 3,
    # 4: the configuration's defaults (they name the model's parameter groups); each section is typed and
    # validated by its owner (models, data, sharding, train, eval)
    "config": 4, "config_defaults": 4,
    # 5-7: inference and conversion, then what runs on inference (evaluation, serving), then training
    "infer": 5, "convert": 5,
    "eval": 6, "serve": 6,
    "train": 7,
    # 8-9: benchmarks and compile reports, then the command layer on top of everything
    "bench": 8,
    "cli": 9,
}
BOTTOM = 0


def _modules() -> list[tuple[str, pathlib.Path, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path, ast.parse(path.read_text(), str(path))))
    return out


MODULES = _modules()


def _part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def _imports(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every absolute import of mmlm, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "mmlm":
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "mmlm")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _python_files(*dirs: str) -> list[pathlib.Path]:
    return [p for d in dirs for p in sorted((REPO / d).rglob("*.py"))]


def test_every_part_has_a_layer():
    parts = {_part(name) for name, _, _ in MODULES}
    assert parts <= set(LAYERS), f"parts of mmlm without a layer in LAYERS: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize("where", ["mmlm", "tests", "experiments", "colab"])
def test_no_private_names_imported(where):
    bad = []
    for path in _python_files(where):
        for line, module, names in _imports(ast.parse(path.read_text(), str(path))):
            bad += [f"{path.relative_to(REPO)}:{line}: from {module} import {n}" for n in names if _private(n)]
            bad += [f"{path.relative_to(REPO)}:{line}: import {module}"
                    for piece in module.split(".") if _private(piece)]
    assert not bad, "imports of another module's private names:\n" + "\n".join(bad)


def test_argument_parsing_only_in_the_command_layer():
    bad = []
    for name, path, tree in MODULES:
        if _part(name) == "cli":
            continue
        for node in ast.walk(tree):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.relative_to(REPO)}:{node.lineno}" for m in imported if m.split(".")[0] == "argparse"]
    assert not bad, "argparse outside mmlm/cli/ (parse arguments in mmlm/cli/<command>.py):\n" + "\n".join(bad)


def _sets_environment(node: ast.stmt) -> bool:
    """Whether a module-level statement writes os.environ (or calls os.putenv) outside any function."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return False  # a definition runs nothing on import
        call = sub.func if isinstance(sub, ast.Call) else None
        if isinstance(call, ast.Attribute) and (call.attr == "putenv" or (
                call.attr in ("setdefault", "update", "pop") and "environ" in ast.unparse(call.value))):
            return True
        if isinstance(sub, (ast.Assign, ast.AugAssign)):
            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
            if any(isinstance(t, ast.Subscript) and "environ" in ast.unparse(t.value) for t in targets):
                return True
    return False


def test_no_library_module_sets_the_environment_on_import():
    bad = [f"{path.relative_to(REPO)}:{node.lineno}" for name, path, tree in MODULES if _part(name) != "cli"
           for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
           and _sets_environment(node)]
    assert not bad, "modules that set environment variables when imported:\n" + "\n".join(bad)


def test_imports_run_down_the_layers():
    bad = []
    for name, path, tree in MODULES:
        part = _part(name)
        for line, module, _ in _imports(tree):
            other = _part(module)
            if other == part or other not in LAYERS:
                continue
            if LAYERS[other] > LAYERS[part] or (LAYERS[other] == LAYERS[part] != BOTTOM):
                bad.append(f"{path.relative_to(REPO)}:{line}: {part} (layer {LAYERS[part]}) imports {module} "
                           f"(layer {LAYERS[other]})")
    assert not bad, "imports up (or across) the layers:\n" + "\n".join(bad)


def test_the_checks_see_violations():
    """The checks above find what they look for (guards against a check that silently passes)."""
    tree = ast.parse("import os\nos.environ.setdefault('X', '1')\nfrom mmlm.bench.compile import _fmt\n"
                     "def f():\n    os.environ['Y'] = '1'\n")
    assert [n.lineno for n in tree.body if _sets_environment(n)] == [2]
    assert [names for _, _, names in _imports(tree)] == [["_fmt"]] and _private("_fmt") and not _private("__version__")
