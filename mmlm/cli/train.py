"""`mmlm train`: train (or resume) a model from a config.

    mmlm train --config configs/demo.py --workdir /tmp/demo
    mmlm train --config configs/tiny.py --config.train.steps=100 --config.mesh.fsdp=4 --workdir W
    mmlm train ... --init_from converted_checkpoint/         # start from `mmlm convert` output

Rerunning the same command resumes from the latest checkpoint in the
workdir. Multi-host: start one process per host with the same arguments plus
`--coordinator_address HOST:PORT --num_processes N --process_id I` (on Cloud
TPU VMs and SLURM, `jax.distributed.initialize()` finds these by itself:
pass `--multihost`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mmlm.cli.common import number, run_command
from mmlm.config_utils import load_config, split_config_overrides
from mmlm.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm train",
        description="Train a model from an ml_collections config; override any field with "
                    "--config.a.b=value. Rerun the same command to resume from the latest checkpoint.")
    p.add_argument("--config", required=True, help="config file, e.g. configs/demo.py")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events, config.json")
    p.add_argument("--init_from", default=None,
                   help="model checkpoint directory (mmlm convert output) to initialise params from "
                        "(sets train.init_from; ignored when resuming)")
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num_processes", type=number(int, 1), default=None, help="number of processes (hosts)")
    g.add_argument("--process_id", type=number(int, 0), default=None, help="this process's index, 0..num_processes-1")
    g.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() with automatic cluster detection (Cloud TPU, SLURM)")
    g.add_argument("--cpu_collectives", default="gloo", choices=("gloo", "mpi", "none"),
                   help="collectives implementation for multi-process CPU runs (default gloo)")
    p.add_argument("--log_level", default="INFO", help="Python logging level (DEBUG, INFO, WARNING)")
    return p


def init_distributed(args: argparse.Namespace) -> None:
    """Starts jax.distributed before anything touches a JAX backend (no-op for one process)."""
    import jax

    explicit = args.coordinator_address is not None or (args.num_processes or 1) > 1
    if not (explicit or args.multihost):
        return
    if args.cpu_collectives != "none":
        # Only the CPU client reads this; it must be set before backends start.
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if explicit:
        if args.coordinator_address is None or args.num_processes is None or args.process_id is None:
            raise UserError("--coordinator_address, --num_processes and --process_id go together")
        jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    else:
        jax.distributed.initialize()


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Orbax, absl and grain log every save/restore at INFO; keep the console for our messages.
    for name in ("absl", "orbax", "grain", "jax._src", "tensorflow", "etils"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.init_from:
        config.train.init_from = args.init_from
    init_distributed(args)

    from mmlm.train.trainer import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, NonFiniteLossError, train

    try:
        results = train(config, args.workdir)
    except NonFiniteLossError as e:  # not a usage mistake: the run diverged (exit status 1)
        print(f"mmlm train: {e}", file=sys.stderr)
        return 1
    return {"preempted": PREEMPTED_EXIT_CODE, "interrupted": INTERRUPTED_EXIT_CODE}.get(results["status"], 0)


def main(argv: list[str]) -> int:
    argv, overrides = split_config_overrides(argv)
    args = build_parser().parse_args(argv)
    args.overrides = overrides
    _setup_logging(args.log_level)
    # Ctrl-C inside the train loop saves a checkpoint (see PreemptionWatch); before it, or a second
    # Ctrl-C, ends the command quietly with exit status 130.
    return run_command("train", run, args, quiet_logs=False, interruptible=True)
