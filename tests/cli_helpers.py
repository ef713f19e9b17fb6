"""Several `mmlm` commands in one Python process, each reported as a subprocess of its own would be.

A fresh `python -m mmlm.cli train` spends seconds importing JAX, Flax and Orbax and starting the backend
before it trains; tests that run many short commands which need no process of their own (the same device
count, no signals, nothing patched) run them one after another in one process instead. Each command's
stdout and stderr are its file descriptors 1 and 2 redirected to files, so JAX's and absl's output is
caught too; its exit status is what `mmlm.cli.main` returns (or a `SystemExit`'s code; 1 with the
traceback on its stderr for an uncaught exception, as the interpreter would).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_RUN_COMMANDS = r"""
import json, os, shutil, sys, traceback
from mmlm.cli import main


def redirected(fd, path):
    saved = os.dup(fd)
    f = open(path, "w")
    os.dup2(f.fileno(), fd)
    return saved, f


def restore(fd, saved, f):
    os.dup2(saved, fd)
    os.close(saved)
    f.close()


statuses = []
for spec in json.loads(sys.argv[1]):
    for src, dst, drop in spec.get("copy", ()):  # a workdir made from an earlier command's output
        shutil.copytree(src, dst)
        for d in drop:
            shutil.rmtree(os.path.join(dst, d))
    namespace = {}
    exec(spec.get("prelude", ""), namespace)  # e.g. a patch for this command alone, undone by its undo()
    sys.stdout.flush(); sys.stderr.flush()
    out, err = redirected(1, spec["stdout"]), redirected(2, spec["stderr"])
    try:
        code = main(spec["args"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        restore(2, *err)
        restore(1, *out)
        if "undo" in namespace:
            namespace["undo"]()
    statuses.append(int(code or 0))
with open(sys.argv[2], "w") as f:
    json.dump(statuses, f)
"""


def run_commands(commands: list[dict], env: dict[str, str], cwd: Path, logs: Path,
                 timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Runs `mmlm ARGS` for each {"args": [...]} of `commands` in order, in one process started with `env`.

    An entry's optional "copy": [(src, dst, [subdirs of dst to delete])] is done just before its command
    (a workdir made from an earlier command's output), and its optional "prelude" (Python source, e.g. a
    patch of a library function) runs just before it, in a namespace of its own whose `undo()`, if it
    defines one, runs after the command. Returns one CompletedProcess per command (its
    args, exit status, stdout and stderr); their output files are kept under `logs` (`NAME.stdout`, ...
    with NAME the entry's "name", else its index).
    """
    logs.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, c in enumerate(commands):
        name = str(c.get("name", i))
        specs.append({"args": [str(a) for a in c["args"]], "copy": [[str(s), str(d), list(x)] for s, d, x in
                                                                   c.get("copy", ())],
                      "prelude": c.get("prelude", ""),
                      "stdout": str(logs / f"{name}.stdout"), "stderr": str(logs / f"{name}.stderr")})
    statuses = logs / "statuses.json"
    proc = subprocess.run([sys.executable, "-c", _RUN_COMMANDS, json.dumps(specs), str(statuses)], check=False,
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout * len(commands))
    assert proc.returncode == 0, f"the process of the commands failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    codes = json.loads(statuses.read_text())
    return [subprocess.CompletedProcess(["mmlm", *s["args"]], code, Path(s["stdout"]).read_text(),
                                        Path(s["stderr"]).read_text()) for s, code in zip(specs, codes)]
