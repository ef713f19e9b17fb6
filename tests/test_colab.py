"""colab/*.ipynb: valid nbformat 4, valid Python, every `mmlm` command in them exists, and each
notebook is what colab/build_notebook.py writes.

The notebooks are read as plain JSON here (tests/test_notebooks.py executes them).
The cheapest of the quickstart's commands (`mmlm summary`, `mmlm data synth`, and
`mmlm bench flops --analytic_only`) are run for real, in parallel subprocesses.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colab" / "mmlm_quickstart.ipynb"
NOTEBOOKS = ("mmlm_quickstart.ipynb", "explore_compression.ipynb", "cloud_tpu.ipynb")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")


@functools.lru_cache(maxsize=None)
def _notebook(name: str = NOTEBOOK.name) -> dict:
    return json.loads((REPO / "colab" / name).read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _code_cells(name: str = NOTEBOOK.name) -> list[str]:
    return [_source(c) for c in _notebook(name)["cells"] if c["cell_type"] == "code"]


def _as_python(src: str) -> str:
    """IPython `!shell` / `%magic` lines become `pass` (kept indented: they may sit in a block)."""
    out = []
    for line in src.splitlines():
        stripped = line.lstrip()
        out.append(line[: len(line) - len(stripped)] + "pass" if stripped[:1] in ("!", "%") else line)
    return "\n".join(out)


def _string_commands(tree: ast.AST) -> list[str]:
    """`mmlm ...` command lines written as Python strings (f-string fields become `{X}`)."""
    found = []
    # The literal pieces of an f-string are Constant nodes too: read them only as part of their f-string.
    pieces = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in pieces:
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{X}" for v in node.values)
        else:
            continue
        if text.startswith("mmlm "):
            found.append(text)
    return found


def _commands(name: str = NOTEBOOK.name) -> list[str]:
    """Every `mmlm` command line of the notebook: `!mmlm ...` shell lines and Python strings."""
    cmds = []
    for src in _code_cells(name):
        for line in src.splitlines():
            s = line.strip()
            if s.startswith("!mmlm"):
                cmds.append(s[1:])
        cmds += _string_commands(ast.parse(_as_python(src)))
    return cmds


def _help_text(words: tuple[str, ...]) -> str:
    """`mmlm WORDS --help`, in process (argparse exits after printing)."""
    from mmlm import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main([*words, "--help"])
        except SystemExit:
            pass
    return buf.getvalue()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_nbformat4_json(name):
    nb = _notebook(name)
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int) and nb["nbformat_minor"] >= 4
    assert isinstance(nb["metadata"], dict) and nb["metadata"]["kernelspec"]["language"] == "python"
    assert nb["cells"], "empty notebook"
    ids = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code", "raw"), cell
        assert isinstance(cell["metadata"], dict)
        src = cell["source"]
        assert isinstance(src, str) or (isinstance(src, list) and all(isinstance(s, str) for s in src))
        if cell["cell_type"] == "code":
            # Stored clean: no outputs, never executed.
            assert cell["outputs"] == [] and cell["execution_count"] is None
        else:
            assert "outputs" not in cell and "execution_count" not in cell
        if nb["nbformat_minor"] >= 5:
            assert CELL_ID.match(cell["id"]), cell.get("id")
            ids.append(cell["id"])
    assert len(ids) == len(set(ids)), "duplicate cell ids"
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert kinds.count("markdown") >= kinds.count("code") // 2, "explain the cells"
    try:
        import nbformat
    except ImportError:
        return
    nbformat.validate(nbformat.from_dict(nb))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_code_cells_are_python(name):
    for i, src in enumerate(_code_cells(name)):
        try:
            ast.parse(_as_python(src))
        except SyntaxError as e:
            pytest.fail(f"code cell {i} is not valid Python: {e}\n{src}")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_shell_placeholders_are_defined(name):
    """`{NAME}` in a `!` line is expanded by IPython: NAME must be assigned in some code cell."""
    assigned = set()
    for src in _code_cells(name):
        for node in ast.walk(ast.parse(_as_python(src))):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                assigned.add(node.id)
    for src in _code_cells(name):
        for line in src.splitlines():
            if line.strip().startswith("!"):
                missing = {n for n in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)", line)} - assigned
                assert not missing, f"{line.strip()!r} uses undefined {sorted(missing)}"


NOTEBOOK_COMMANDS = {
    "mmlm_quickstart.ipynb": {"summary", "bench", "data", "train", "chat", "eval"},
    "explore_compression.ipynb": {"train", "data", "eval"},
    "cloud_tpu.ipynb": {"train", "compile"},
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_commands_exist_with_their_options_and_configs(name):
    from mmlm.cli.bench import BENCHES
    from mmlm.cli import COMMANDS

    data_help = _help_text(("data",))
    cmds = _commands(name)
    names = {shlex.split(c)[1] for c in cmds}
    assert NOTEBOOK_COMMANDS[name] <= names, names
    if "compile" not in COMMANDS:  # cloud_tpu.ipynb skips its `mmlm compile` cell when the command is missing
        cmds = [c for c in cmds if shlex.split(c)[1] != "compile"]
    helps: dict[tuple[str, ...], str] = {}
    for cmd in cmds:
        argv = shlex.split(PLACEHOLDER.sub("X", cmd))
        assert argv[0] == "mmlm"
        if argv[1] in ("--help", "-h"):
            continue
        assert argv[1] in COMMANDS, f"{cmd!r}: no command {argv[1]!r} in mmlm.cli.COMMANDS"
        words = tuple(argv[1:2])
        if argv[1] == "bench":
            assert argv[2] in BENCHES, f"{cmd!r}: no benchmark {argv[2]!r} in mmlm.cli.bench.BENCHES"
            words = tuple(argv[1:3])
        elif argv[1] == "data":
            assert re.search(rf"^\s+{re.escape(argv[2])}\s", data_help, re.M), f"{cmd!r}: no data subcommand"
            words = tuple(argv[1:3])
        if words not in helps:
            helps[words] = _help_text(words)
            assert "usage:" in helps[words], f"mmlm {' '.join(words)} --help printed no usage"
        for j, tok in enumerate(argv):
            if not tok.startswith("--") or tok.startswith("--config."):
                continue
            flag = tok.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[words]), \
                f"{cmd!r}: `mmlm {' '.join(words)}` has no option {flag}"
            if flag == "--config":
                path = tok.split("=", 1)[1] if "=" in tok else argv[j + 1]
                if path != "X":  # a Python variable: its default is checked by test_config_defaults_exist
                    assert (REPO / path).is_file(), f"{cmd!r}: {path} does not exist"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_config_defaults_exist(name):
    """Config files named as defaults of notebook variables (`os.environ.get("...", "configs/x.py")`)."""
    text = "\n".join(_code_cells(name))
    for path in re.findall(r'"(configs/[\w.]+\.py)"', text):
        assert (REPO / path).is_file(), f"{name}: {path} does not exist"


def test_demo_steps_default_is_the_full_demo():
    from mmlm.config_utils import load_config

    text = "\n".join(_code_cells())
    m = re.search(r'STEPS = int\(os\.environ\.get\("MMLM_COLAB_STEPS", (\d+)\)\)', text)
    assert m, "STEPS must default to the full demo and read MMLM_COLAB_STEPS"
    assert int(m.group(1)) == load_config(str(REPO / "configs" / "demo.py")).train.steps


def test_cheap_commands_run(tmp_path):
    """The notebook's `summary` and `data synth` commands as written, `bench flops` analytic only."""
    cmds = _commands()
    summaries = [c for c in cmds if c.startswith("mmlm summary")]
    flops = [c for c in cmds if c.startswith("mmlm bench flops")]
    synths = [c for c in cmds if c.startswith("mmlm data synth")]
    assert len(summaries) == 2 and flops and synths
    runs = {c: c for c in summaries + synths}
    runs[flops[-1]] = flops[-1] + " --analytic_only"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    # Notebook variables: the run directory, a small question count, no extra flops flags ({X}: an f-string field).
    values = {"RUN_DIR": str(tmp_path), "NUM_QUESTIONS": "5", "X": ""}

    def fill(cmd: str) -> str:
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), cmd)

    procs = {}
    for key, cmd in runs.items():
        argv = shlex.split(fill(cmd))
        assert not PLACEHOLDER.search(" ".join(argv)), cmd
        procs[key] = subprocess.Popen([sys.executable, "-m", "mmlm.cli", *argv[1:]], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"{runs[key]!r} failed:\n{stderr[-2000:]}"
        out[key] = stdout

    parts = ("vision", "projector", "compressor", "prefusion", "llm", "total")
    tokens = {}
    for c in summaries:
        s = json.loads(out[c])  # the keys the notebook's table reads
        assert all(s["params"][p] >= 0 for p in parts) and s["sequence_lengths"]["llm"] > 0
        tokens[re.search(r"configs/(\w+)\.py", c).group(1)] = s["llm_vision_tokens"]
    assert tokens == {"llava15_vicuna7b": 576, "llava_mini_vicuna7b": 1}
    r = json.loads(out[flops[-1]])
    assert all(r["analytic"][p] >= 0 for p in parts) and r["analytic"]["total"] > 0

    for c in synths:
        argv = shlex.split(fill(c))
        opt = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
        root, split, num = Path(opt["--out"]), opt["--split"], int(opt["--num"])
        records = json.loads((root / f"{split}.json").read_text())
        assert len(records) == num and all((root / r["image"]).is_file() for r in records)
        assert records[0]["conversations"][0]["from"] == "human"
        lines = (root / f"{split}_questions.jsonl").read_text().splitlines()
        q = json.loads(lines[0])
        assert (root / q["image"]).is_file() and q["text"] and q["answer"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_generator(name):
    """colab/*.ipynb are written by colab/build_notebook.py: edit the script, then run it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("colab_build_notebook", REPO / "colab" / "build_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(module.NOTEBOOKS) == sorted(NOTEBOOKS)
    want = [(c["cell_type"], _source(c)) for c in module.build(name)["cells"]]
    have = [(c["cell_type"], _source(c)) for c in _notebook(name)["cells"]]
    assert have == want, "stale notebook: run `python colab/build_notebook.py`"
