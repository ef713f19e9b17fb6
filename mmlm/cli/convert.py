"""`mmlm convert`: HF CLIP / HF LLaMA / LLaVA-Mini release -> mmlm, or mmlm -> HF.

Import:
    mmlm convert --from hf-llama   --src Meta-Llama-3.1-8B-Instruct --dst ckpt/llama31
    mmlm convert --from hf-clip    --src clip-vit-large-patch14-336 --dst ckpt/clip
    mmlm convert --from llava-mini --src llava-mini-llama-3.1-8b --vision clip-vit-large-patch14-336 --dst ckpt/mini
Export:
    mmlm convert --to hf --src ckpt/mini --dst hf/mini [--vision clip-vit-large-patch14-336]
Then always:
    mmlm verify --hf SRC --mmlm DST
"""

from __future__ import annotations

import argparse
import os
import sys

from mmlm.cli.common import number, run_command
from mmlm.convert.io import DTYPE_CHOICES, parse_size
from mmlm.errors import DiskFullError, UserError, disk_full_message, is_disk_full

EPILOG = """\
Imports write DST/config.json (a complete mmlm config) and DST/params (Orbax).
hf-clip writes only params['vision'] and hf-llama only params['llm'], with the
other config sections from --base_config (default: CLIP ViT-L/14-336 +
Vicuna-7B shapes); the trainer's --init_from merges such a partial checkpoint
into a fresh initialisation of the rest. mmlm builds CLIP only up to the
selected layer, without post-LayerNorm: those weights are skipped and counted.

Exports write the LLM as LlamaForCausalLM; a LLaVA-Mini model in the release
layout (LLM + mm_projector + compressor + prefusion_layers, the CLIP tower
named by mm_vision_tower as in the release). --vision CLIP_DIR additionally
writes the tower as a loadable CLIPVisionModel, taking the blocks mmlm does not
keep (after the selected layer) and the post-LayerNorm from CLIP_DIR.

Run `mmlm verify --hf SRC --mmlm DST` after every conversion.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm convert", description="Convert checkpoints between HF layouts and mmlm.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_kind", choices=("hf-clip", "hf-llama", "llava-mini"),
                           help="import: the layout of --src")
    direction.add_argument("--to", dest="to_kind", choices=("hf",), help="export an mmlm checkpoint (--src)")
    p.add_argument("--src", required=True, help="source directory (HF: config.json + safetensors/.bin; "
                                                "export: an mmlm checkpoint)")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--vision", metavar="CLIP_DIR",
                   help="HF CLIP directory: the tower of a LLaVA-Mini import (when the release does not "
                        "contain it), or the source of the unused CLIP blocks when exporting a vision tower")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                   help="weight dtype to write (default: keep each tensor's dtype, e.g. bf16 stays bf16)")
    p.add_argument("--select_layer", type=number(int), default=-2,
                   help="hf-clip: HF hidden_states index used as features (default -2, as LLaVA); LLaVA-Mini "
                        "takes it from mm_vision_select_layer")
    p.add_argument("--base_config", metavar="FILE",
                   help="import: an mmlm config file (e.g. configs/llava_mini_vicuna7b.py) whose model section "
                        "supplies the parts the checkpoint does not define")
    p.add_argument("--hd_grid", type=number(int, 1), metavar="N",
                   help="llava-mini: the model is HD with N x N crops (plus the whole image), for a release "
                        "config.json that lacks resolution_ratio; 1 = not HD. An error if config.json or the "
                        "checkpoint's compressor says otherwise")
    p.add_argument("--ignore_unknown", action="store_true",
                   help="import: drop source tensors with no mmlm counterpart instead of failing")
    p.add_argument("--max_shard_size", default="2GB",
                   help="export: safetensors shard size (default 2GB; memory holds one shard besides the weights)")
    p.add_argument("--mm_vision_tower",
                   help="export: mm_vision_tower to write (default: recorded at import, else "
                        "openai/clip-vit-large-patch14-336)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --dst holding an earlier conversion: an import replaces the mmlm "
                        "checkpoint there, an export a previous export (a directory holding anything else is "
                        "refused). The new one is written beside it and swapped in when complete, so an "
                        "interrupted conversion leaves the old one intact")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="import: write tensors that hold NaN or inf (named in the report) instead of refusing "
                        "the conversion")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not os.path.isdir(args.src):
        parser.error(f"--src {args.src!r} is not a directory")
    if args.vision and args.from_kind in ("hf-clip", "hf-llama"):
        parser.error(f"--vision applies to --from llava-mini and --to hf, not --from {args.from_kind}")
    if args.vision and not os.path.isdir(args.vision):
        parser.error(f"--vision {args.vision!r} is not a directory (pass an HF CLIP directory)")
    if os.path.isdir(args.dst) and os.listdir(args.dst) and not args.overwrite:
        parser.error(f"--dst {args.dst!r} is not empty; choose another directory or pass --overwrite")
    if args.hd_grid is not None and args.from_kind != "llava-mini":
        parser.error("--hd_grid applies to --from llava-mini only (an export takes it from the mmlm config)")
    if args.hd_grid is not None and args.hd_grid < 1:
        parser.error(f"--hd_grid must be >= 1 (1 = not HD, 2 = 2x2 crops), got {args.hd_grid}")
    if args.base_config and not os.path.isfile(args.base_config):
        parser.error(f"--base_config {args.base_config!r} is not a file (e.g. configs/llava_mini_vicuna7b.py)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_paths(args, parser)
    if args.to_kind:
        try:
            args.max_shard_bytes = parse_size(args.max_shard_size)
        except ValueError as e:
            parser.error(f"--max_shard_size: {e}")
    return run_command("convert", _run, args)


def _run(args: argparse.Namespace) -> int:
    from mmlm.safe_io import check_not_input

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    # --dst is replaced as a whole: it must not be, hold or lie inside an input (symlinks resolved).
    check_not_input(args.dst, "--dst", {"--src": args.src, "--vision": args.vision,
                                        "--base_config": args.base_config})
    try:
        if args.from_kind:
            from mmlm.convert.importer import import_checkpoint

            report = import_checkpoint(
                args.from_kind, args.src, args.dst, vision=args.vision, dtype=args.dtype,
                select_layer=args.select_layer, base_config=args.base_config,
                ignore_unknown=args.ignore_unknown, hd_grid=args.hd_grid, overwrite=args.overwrite,
                progress=not args.quiet, allow_nonfinite=args.allow_nonfinite, log=log)
            print(report.summary())
            print(f"next: mmlm verify --hf {args.src} --mmlm {args.dst}"
                  + (f" --vision {args.vision}" if args.vision else ""))
        else:
            from mmlm.convert.exporter import export_checkpoint

            report = export_checkpoint(args.src, args.dst, vision=args.vision, dtype=args.dtype,
                                       max_shard_bytes=args.max_shard_bytes, mm_vision_tower=args.mm_vision_tower,
                                       overwrite=args.overwrite, progress=not args.quiet, log=log)
            print(report.summary())
            print(f"next: mmlm verify --hf {args.dst} --mmlm {args.src}")
    except (ValueError, OSError) as e:
        # The converters report what is wrong with a checkpoint (its config, tensors or files) this way;
        # OSError: a file or directory that cannot be read or written.
        if is_disk_full(e):
            raise DiskFullError(disk_full_message(getattr(e, "filename", None) or args.dst)) from None
        raise UserError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
