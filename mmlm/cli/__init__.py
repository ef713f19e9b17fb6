"""`mmlm` console script: dispatches `mmlm COMMAND ...` to the command's module.

The command layer: each command lives in its own module `mmlm.cli.COMMAND` with a
`main(argv: list[str]) -> int` function and its own argparse parser, which calls the
library's functions. A command's module is imported only when the command runs so that
`mmlm --help` stays instant and one command's heavy imports never slow another. No
module outside `mmlm.cli` parses arguments.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, one-line help). Modules define `main(argv) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "summary": ("mmlm.cli.summary", "parameter counts, vision tokens and sequence lengths of a config"),
    "train": ("mmlm.cli.train", "train a model from a config (the demo: --config configs/demo.py)"),
    "eval": ("mmlm.cli.eval", "evaluate a checkpoint on a question JSONL across token budgets"),
    "chat": ("mmlm.cli.chat", "ask a model about an image or a video"),
    "serve": ("mmlm.cli.serve", "OpenAI-compatible HTTP API with batched decoding, and a web page"),
    "convert": ("mmlm.cli.convert", "import HF CLIP / LLaMA / LLaVA-Mini weights, or export to HF"),
    "verify": ("mmlm.cli.verify", "compare a converted checkpoint against transformers"),
    "data": ("mmlm.cli.data", "synthesise, build, inspect and benchmark datasets"),
    "compile": ("mmlm.cli.compile", "compile the train step for a Cloud TPU slice (no TPU): memory, fit, MFU"),
    "bench": ("mmlm.cli.bench", "benchmarks: flops, compress, latency, video-memory, data"),
}
# Commands that run compiled steps on this host: glibc keeps XLA's freed step buffers (mmlm.host_memory).
RUNS_STEPS = ("train", "eval", "chat", "serve", "bench")


def _usage() -> str:
    lines = ["usage: mmlm COMMAND [options]   (mmlm COMMAND --help for details)", "", "commands:"]
    width = max(len(c) for c in COMMANDS)
    for name, (_, doc) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {doc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the console script, not an in-process call (tests, notebooks)
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv), own_process)
    except BrokenPipeError:  # `mmlm ... | head`: the reader left early, which is not an error
        if not own_process:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


def _dispatch(argv: list[str], own_process: bool) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mmlm import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmlm: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    if name in RUNS_STEPS and own_process:
        from mmlm.host_memory import keep_freed_memory

        keep_freed_memory()  # before the XLA backend starts its threads
    from mmlm.cli.platform import choose_platform, tpu_compile_environment

    if name == "compile":
        tpu_compile_environment()  # before the command's module imports jax
    choose_platform()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
