"""`mmlm data inspect`: decoded examples with supervised spans marked, plus images.

Examples go through the same `ExampleProcessor` as training batches, so what
is printed (ids, label mask, truncation, frames) is what the model sees.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.data import preprocess
from mmlm.data.tokenizer import Tokenizer
from mmlm.safe_io import atomic_file, refuse_existing

_SPECIAL_RE = re.compile(r"^<\|.*\|>$|^<s>$|^</s>$|^<pad>$|^<unk>$")
_GREEN, _RESET = "\033[32m", "\033[0m"


def _is_special(tok: Tokenizer, i: int) -> bool:
    return i in (tok.bos_id, tok.eos_id, tok.pad_id) or bool(_SPECIAL_RE.match(tok.id_to_token(i)))


def render_tokens(tok: Tokenizer, input_ids: Sequence[int], labels: Sequence[int],
                  attention_mask: Sequence[bool], *, color: bool = False, num_frames: int = 1) -> str:
    """Text of an example with supervised spans marked.

    Supervised text is wrapped in `[[...]]` (or green with `color`), special
    tokens are shown by name (`<s>`, `</s>`, `<|eot_id|>`), the placeholder as
    `<image>` (or `<video:F frames>`); padding is omitted.
    """
    segments: list[tuple[str, bool]] = []  # (text, supervised)
    run: list[int] = []
    run_sup = False

    def flush() -> None:
        if run:
            text = tok.decode(run)
            # Decoders drop the `▁` of a chunk's first piece; keep the space.
            if segments and tok.id_to_token(run[0]).startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            segments.append((text, run_sup))
            run.clear()

    for i, lab, att in zip(input_ids, labels, attention_mask):
        i, sup = int(i), int(lab) != IGNORE_INDEX
        if not att:
            continue
        if i == IMAGE_TOKEN_ID or _is_special(tok, i):
            flush()
            name = (("<image>" if num_frames <= 1 else f"<video:{num_frames} frames>")
                    if i == IMAGE_TOKEN_ID else tok.id_to_token(i))
            segments.append((name, sup))
            continue
        if sup != run_sup:
            flush()
            run_sup = sup
        run.append(i)
    flush()
    out: list[str] = []
    for sup, group in itertools.groupby(segments, key=lambda s: s[1]):
        text = "".join(t for t, _ in group)
        if sup:
            text = (_GREEN + text + _RESET) if color else f"[[{text}]]"
        out.append(text)
    return "".join(out)


def display_pixels(view: np.ndarray, mean, std) -> np.ndarray:
    """One view (H, W, 3) as uint8 for display: uint8 pixels as they are, float images denormalised."""
    return view if view.dtype == np.uint8 else preprocess.denormalize(view, mean, std)


def contact_sheet(images: np.ndarray, frame_mask: np.ndarray, mean, std, gap: int = 2):
    """PIL image: one row per real frame, one column per view.

    images: (F, K, H, W, 3) uint8 pixels or normalised floats (denormalised with `mean` / `std`);
    frame_mask: (F,).
    """
    from PIL import Image

    frames = [f for f, m in zip(images, frame_mask) if m]
    if not frames:
        return None
    k, h, w = frames[0].shape[0], frames[0].shape[1], frames[0].shape[2]
    sheet = Image.new("RGB", (k * w + (k - 1) * gap, len(frames) * h + (len(frames) - 1) * gap), (255, 255, 255))
    for r, views in enumerate(frames):
        for c, view in enumerate(views):
            sheet.paste(Image.fromarray(display_pixels(view, mean, std)), (c * (w + gap), r * (h + gap)))
    return sheet


def describe(example: Mapping[str, Any], record: Mapping[str, Any], tok: Tokenizer, *,
             color: bool, mean, std) -> str:
    """Header lines and the marked-up text of one example."""
    from mmlm.data.pipeline import record_text
    from mmlm.data.build import MEDIA_NAMES

    n_tokens = int(np.sum(example["attention_mask"]))
    n_sup = int(np.sum(example["labels"] != IGNORE_INDEX))
    n_frames = int(np.sum(example["frame_mask"]))
    media = MEDIA_NAMES[int(record["media"])]
    head = (f"example_id {int(example['example_id'])}  id {record_text(record['id'])!r}  media {media}"
            + (f" {record_text(record['media_path'])!r}" if media != "none" else "")
            + f"  frames {n_frames}  tokens {n_tokens}/{len(example['input_ids'])}"
            + f" (supervised {n_sup})")
    if "truncated" in example and bool(example["truncated"]):
        head += f"  TRUNCATED from {int(example['num_tokens'])}"
    text = render_tokens(tok, example["input_ids"], example["labels"], example["attention_mask"],
                         color=color, num_frames=n_frames if media == "video" else 1)
    return head + "\n" + text


def sheet_name(split: str, index: int) -> str:
    """The file name of example `index`'s image sheet."""
    return f"{split}_{index:06d}.png"


def inspect(dataset_dir: str, split: str, config, *, num: int, start: int, save_dir: str | None,
            show: bool, color: bool, out=None, overwrite: bool = False) -> int:
    """Prints `num` examples of `split` from `start` (to `out`, default stdout); saves/shows images.

    An image sheet already in `save_dir` is replaced only with `overwrite` (refused before anything is shown).
    """
    out = sys.stdout if out is None else out
    from mmlm.data import build as build_lib
    from mmlm.data import pipeline

    meta = build_lib.read_meta(dataset_dir)
    splits = ", ".join(f"{s} ({v['num_examples']})" for s, v in meta["splits"].items())
    print(f"dataset {meta['name']} {meta['version']} in {dataset_dir}: splits {splits}", file=out)
    report = Path(dataset_dir) / build_lib.REPORT_FILE
    if report.is_file():
        import json

        skipped = json.loads(report.read_text())["skipped"]
        if skipped:
            print(f"build skipped {sum(skipped.values())} records: {skipped} (see {report})", file=out)
    source = pipeline.open_split(dataset_dir, split)
    geometry = pipeline.batch_geometry(config, meta)
    cfg = config.data
    processor = pipeline.make_processor(config, meta, geometry, with_stats=True)
    collate = pipeline.Collator(cfg.image_mean, cfg.image_std, on_device=pipeline.pixels_on_device(cfg))
    tok = processor.tokenizer
    print(f"template {cfg.template}, tokenizer {tok}, T={geometry.max_text_len}, "
          f"F={geometry.num_frames}, K={geometry.num_views}, H=W={geometry.image_size}", file=out)
    print("supervised tokens are " + ("green" if color else "in [[double brackets]]"), file=out)
    if not 0 <= start < len(source):
        raise ValueError(f"--start {start} is outside split {split!r} of {len(source)} examples")
    truncated = 0
    stop = min(len(source), start + num)
    if save_dir:
        for k in range(start, stop):
            refuse_existing(Path(save_dir) / sheet_name(split, k), "--save-dir", overwrite, "an earlier image sheet")
    for i in range(start, stop):
        record = source[i]
        example = {k: v[0] for k, v in collate([processor(record)]).items()}
        truncated += bool(example["truncated"])
        print(f"\n--- [{i}] " + describe(example, record, tok, color=color, mean=cfg.image_mean,
                                         std=cfg.image_std), file=out)
        sheet = contact_sheet(example["images"], example["frame_mask"], cfg.image_mean, cfg.image_std)
        if sheet is not None and (save_dir or show):
            if save_dir:
                Path(save_dir).mkdir(parents=True, exist_ok=True)
                path = Path(save_dir) / sheet_name(split, i)
                with atomic_file(path, fsync=False) as tmp:
                    sheet.save(tmp)
                print(f"image: {path} ({sheet.size[0]}x{sheet.size[1]}, rows = frames, "
                      f"columns = views)", file=out)
            if show:
                sheet.show(title=f"{split}[{i}]")
    print(f"\n{stop - start} examples shown, {truncated} truncated", file=out)
    return 0
