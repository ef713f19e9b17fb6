"""`mmlm compile`: compile the train step (or inference) for a Cloud TPU slice on this machine (`mmlm.bench.compile`).

    mmlm compile --config llava_mini_vicuna7b --topology v5p-64 [--config.a.b=v ...] [--json]

The dispatcher (`mmlm.cli.main`) sets `mmlm.cli.platform.TPU_COMPILE_ENVIRONMENT` before jax is
imported; `main` sets the libtpu part of it again for in-process calls (libtpu reads it when it loads).
"""

from __future__ import annotations

import argparse
import json
import sys

from mmlm.bench.compile import compile_train_step, format_report, parse_topology, require_libtpu
from mmlm.cli.common import number, run_command
from mmlm.cli.platform import tpu_compile_environment
from mmlm.config_utils import load_config, split_config_overrides
from mmlm.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmlm compile",
        description="Compile the train step of a config for a Cloud TPU slice on this machine (libtpu, no TPU): "
                    "per-chip memory, fit, analytic model FLOPs, estimated step time and MFU, collectives; or "
                    "(--what infer) the prefill and decode step of inference on one chip. "
                    "Config overrides: --config.a.b=value.")
    parser.add_argument("--config", required=True, help="config file or name in configs/ (e.g. llava_mini_vicuna7b)")
    parser.add_argument("--topology", required=True,
                        help="Cloud TPU slice name: v4-N / v5p-N (N TensorCores = 2 x chips), v5litepod-N (alias "
                             "v5e-N) / v6e-N (N chips); e.g. v5p-64 = 32 v5p chips")
    parser.add_argument("--frames", type=number(int, 1), default=None,
                        help="train: images / video frames per sample (the pipeline's max_frames for a video "
                             "dataset; default 1). infer: compile the chunked long-video path of mmlm chat --video "
                             "for this many frames instead of one image (the config's data.video_chunk_frames per "
                             "vision chunk, data.prefill_chunk_tokens per LLM prefill chunk), with the KV cache size")
    parser.add_argument("--what", default="train", choices=("train", "infer"),
                        help="train: the train step on the whole slice (default); infer: prefill and one decode "
                             "step of mmlm chat on one chip, for the model and its LLaVA-1.5 baseline")
    parser.add_argument("--new_tokens", type=number(int, 1), default=64,
                        help="--what infer: answer tokens the KV cache holds after the prompt (default 64)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="--what infer: weight and compute dtype (default bfloat16)")
    parser.add_argument("--weights", default="float", choices=("float", "int8"),
                        help="--what infer: 'int8' stores the LLM and pre-fusion kernels as int8 with one scale per "
                             "output channel (weight-only; about half the bf16 bytes), as `mmlm chat --weights "
                             "int8` serves them (default: float, every weight in --dtype)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--dump_hlo", default="", help="also write the compiled HLO text to this file")
    return parser


def _run(args: argparse.Namespace) -> int:
    from mmlm.configs import resolve_config_path

    s = parse_topology(args.topology)
    if args.what != "infer" and args.weights != "float":
        raise UserError(f"--weights {args.weights} applies to --what infer (serving); training keeps float weights")
    require_libtpu()
    try:
        config = load_config(resolve_config_path(args.config), args.overrides)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise UserError(str(e)) from e
    if args.what == "infer":
        from mmlm.bench import compile_infer as CI

        if args.frames is not None:
            report = CI.compile_long_video(config, s, args.frames, new_tokens=args.new_tokens, dtype=args.dtype,
                                           weights=args.weights)
            formatter = CI.format_long_video_report
        else:
            report = CI.compile_inference(config, s, new_tokens=args.new_tokens, dtype=args.dtype,
                                          weights=args.weights)
            formatter = CI.format_inference_report
    else:
        report = compile_train_step(config, s, frames=1 if args.frames is None else args.frames,
                                    dump_hlo=args.dump_hlo)
        formatter = format_report
    report["config"] = args.config
    if args.overrides:
        report["overrides"] = list(args.overrides)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(formatter(report))
    return 0


def main(argv: list[str]) -> int:
    tpu_compile_environment()
    argv, overrides = split_config_overrides(argv)
    args = build_parser().parse_args(argv)
    args.overrides = overrides
    return run_command("compile", _run, args)
