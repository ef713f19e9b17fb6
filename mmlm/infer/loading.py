"""Loading a model for inference and turning questions + media into prompts.

A model comes from a training workdir (`--workdir`: the latest Orbax
checkpoint + WORKDIR/config.json) or a standalone model checkpoint
(`--checkpoint`: `mmlm convert` / `save_model` output). Everything the
prompt needs besides the weights comes from the saved config: tokenizer,
conversation template, system prompt, image size / HD grid, video frame cap
and sampling rate, normalisation constants. A checkpoint whose config has no
`data` section (e.g. converted from Hugging Face) gets the data defaults, and
`--tokenizer` / `--template` override them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np

from mmlm.checkpoint import load_config_json, load_model_params, load_params_from_workdir
from mmlm.errors import UserError
from mmlm.models.config import ModelConfig, model_config_from_dict


@dataclasses.dataclass
class InferenceModel:
    """Everything needed to answer questions with one model."""

    cfg: ModelConfig
    params: Any
    config: ml_collections.ConfigDict
    tokenizer: Any  # mmlm.data.tokenizer.Tokenizer
    template: str
    system_prompt: str | None
    stop_ids: list[int]
    image_size: int
    hd_grid: int  # n x n HD crops + the whole image; 1 = no HD (as model.hd_grid)
    max_frames: int
    max_text_len: int  # prompt tokens the model was trained for (data.max_text_len); longer prompts are refused
    video_fps: float
    video_chunk_frames: int  # frames per chunk of the chunked video encoder (data.video_chunk_frames)
    prefill_chunk_tokens: int  # LLM prefill chunk of the chunked path (data.prefill_chunk_tokens)
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    source: str  # where the weights came from (for messages)

    def budget(self, m: int | None) -> int | None:
        """Validated vision-token budget (None -> the model's default) with a user-facing error."""
        try:
            return self.cfg.check_budget(m)
        except ValueError as e:
            raise UserError(f"{e}. Supported budgets: {list(self.cfg.supported_budgets)}") from None


def _data_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    from mmlm.data.config import default_data_config

    data = default_data_config()
    if "data" in config:
        with data.ignore_type():
            for key, value in config.data.items():
                data[key] = value
    return data


def load_inference_model(*, workdir: str | None = None, checkpoint: str | None = None, step: int | None = None,
                         tokenizer: str | None = None, template: str | None = None,
                         weights: str = "float") -> InferenceModel:
    """Loads params + config from a workdir or a model checkpoint (exactly one of them).

    `weights="int8"` serves the LLM and pre-fusion kernels as weight-only int8 (`mmlm.models.quant`):
    about half the memory of bf16 weights, answers close to but not bit-equal with the float model's.
    """
    if (workdir is None) == (checkpoint is None):
        raise UserError("pass exactly one of --workdir DIR (a training run) or --checkpoint DIR "
                        "(a model checkpoint)")
    if checkpoint is not None and step is not None:  # a model checkpoint holds one set of weights
        raise UserError(f"--step {step} picks a training step of a --workdir; --checkpoint {checkpoint!r} is a "
                        "model checkpoint with one set of weights: drop --step, or pass the run's --workdir")
    source = workdir or checkpoint
    assert source is not None
    if not os.path.isdir(source):
        raise UserError(f"{'--workdir' if workdir else '--checkpoint'} {source!r} is not a directory")
    try:
        check_model_section(load_config_json(source), source)  # before any weight is read
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    try:
        if workdir is not None:
            params, config = load_params_from_workdir(workdir, step)
        else:
            config = load_config_json(checkpoint)
            params = load_model_params(checkpoint)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    return inference_model(config, params, source, tokenizer=tokenizer, template=template, weights=weights)


def check_model_section(config: ml_collections.ConfigDict, source: str) -> None:
    """The saved model config passes the trainer's checks (types, ranges: e.g. a hand-edited norm eps of 0,
    which would make every answer NaN); a `UserError` naming the file and the key otherwise."""
    from mmlm.config_utils import ConfigError

    try:
        ModelConfig.from_config(ml_collections.ConfigDict(config.model.to_dict()))
    except ConfigError as e:
        raise UserError(f"{os.path.join(source, 'config.json')}: {e}") from None


def inference_model(config: ml_collections.ConfigDict, params: Any, source: str, *, tokenizer: str | None = None,
                    template: str | None = None, allow_plain: bool = False,
                    weights: str = "float") -> InferenceModel:
    """An `InferenceModel` from a resolved config and its params (`source` names them in messages).

    Used by `load_inference_model` and by the training loop's evaluator, so
    both prompt and preprocess exactly alike. `allow_plain`: accept the
    captioning template (stage-1 evaluation, whose prompts come pre-built).
    `weights`: "float" as stored, or "int8" (see `load_inference_model`).
    """
    from mmlm.data import templates
    from mmlm.data.config import hd_grid_value
    from mmlm.data.tokenizer import load_tokenizer
    from mmlm.infer.generate import decoding_layout
    from mmlm.models.quant import WEIGHT_FORMATS, quantize_params

    if weights not in WEIGHT_FORMATS:
        raise UserError(f"--weights {weights!r}: choose from {WEIGHT_FORMATS}")

    try:
        cfg = model_config_from_dict(config.model)
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: the model section of its config is not a valid model config ({e})") from None
    missing = [p for p in ("vision", "projector", "llm") if p not in params]
    if cfg.mode == "llava_mini":
        # Average pooling (`compressor.kind="avgpool"`) has no parameters, so no `compressor` entry.
        needed = (("compressor",) if cfg.compressor.kind == "query" else ()) + \
            (("prefusion",) if cfg.prefusion_layers else ())
        missing += [p for p in needed if p not in params]
    if missing:
        raise UserError(f"{source!r} lacks the {missing} parameters: it is a partial checkpoint "
                        "(e.g. one converted part); it cannot answer questions")
    data = _data_section(config)
    tok_path = tokenizer or data.tokenizer
    if tokenizer is None and "data" not in config:
        # No data settings saved with the weights: the data defaults' tiny tokenizer would be a silent
        # mismatch, so use tokenizer files next to the weights or ask for one.
        if any((Path(source) / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            tok_path = source
        else:
            raise UserError(f"{source!r} has no tokenizer settings (config.data) and no tokenizer file; "
                            "pass --tokenizer PATH (and --template vicuna_v1|llama_3_1)")
    try:
        tok = load_tokenizer(tok_path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot open the tokenizer: {e} (pass --tokenizer PATH)") from None
    if tok.vocab_size > cfg.llm.vocab_size:
        raise UserError(f"tokenizer {tok_path!r} has {tok.vocab_size} ids but the model's vocabulary has "
                        f"{cfg.llm.vocab_size}: wrong --tokenizer?")
    tmpl = template or data.template
    if tmpl not in templates.TEMPLATES:
        raise UserError(f"unknown template {tmpl!r}; choose from {templates.TEMPLATES}")
    if tmpl == "plain" and not allow_plain:
        raise UserError("this model was trained with the 'plain' (captioning) template, which has no "
                        "question; pass --template vicuna_v1 or llama_3_1")
    # A config.json saved before hd_grid had one convention may hold data.hd_grid = 0 ("no HD"): read as 1.
    hd = cfg.hd_grid if data.get("hd_grid") is None else hd_grid_value(data.hd_grid, f"{source}: data.hd_grid")
    if hd != cfg.hd_grid:
        raise UserError(f"{source}: data.hd_grid={hd} but model.hd_grid={cfg.hd_grid} in its config; "
                        "the model reads the views the data makes, so the saved config is inconsistent")
    cfg, params = decoding_layout(cfg, params)  # one buffer per layer: decoding updates its KV cache in place
    if weights == "int8":
        params = quantize_params(params)
    return InferenceModel(
        cfg=cfg, params=params, config=config, tokenizer=tok, template=tmpl,
        system_prompt=data.get("system_prompt"), stop_ids=templates.stop_token_ids(tok, tmpl),
        image_size=int(data.get("image_size") or cfg.image_size), hd_grid=hd,
        max_frames=int(data.max_frames), max_text_len=int(data.max_text_len), video_fps=float(data.video_fps),
        video_chunk_frames=int(data.video_chunk_frames), prefill_chunk_tokens=int(data.prefill_chunk_tokens),
        image_mean=tuple(data.image_mean), image_std=tuple(data.image_std), source=source)


# ------------------------------------------------------------------------------ media

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")


def check_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory, not a file")
    if not p.exists():
        raise UserError(f"{what} {str(path)!r} does not exist")
    if not p.is_file():
        raise UserError(f"{what} {str(path)!r} is not a regular file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} {str(path)!r} is not readable (check its permissions)")
    return p


def load_image_pixels(im: InferenceModel, path: str | os.PathLike) -> np.ndarray:
    """An image file -> pixels (1, K, H, W, 3) float32, as in training."""
    from mmlm.data import preprocess

    p = check_file(path, "image")
    try:
        img = preprocess.decode_image(p.read_bytes())
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {str(path)!r}: {e}") from None
    pixels = preprocess.preprocess_image(img, im.image_size, im.hd_grid, im.image_mean, im.image_std)
    return pixels[None]


def load_video_pixels(im: InferenceModel, path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """A video file -> pixels (T, K, H, W, 3) float32: T <= max_frames frames sampled at the model's fps."""
    from mmlm.data import preprocess

    p = check_file(path, "video")
    cap = int(max_frames or im.max_frames)
    try:
        frames, count = preprocess.load_video_frames(p, cap, im.image_size, target_fps=im.video_fps,
                                                     hd_grid=im.hd_grid, mean=im.image_mean, std=im.image_std)
    except Exception as e:
        # PyAV's FFmpegError family (some subclass ValueError): the file is not a decodable video.
        if type(e).__module__.split(".")[0] == "av":
            raise UserError(f"cannot decode video {str(path)!r}: {e}") from None
        if isinstance(e, ValueError):  # no video stream / no decodable frame
            raise UserError(f"video {str(path)!r} has no frames ({e})") from None
        raise
    if count < 1:
        raise UserError(f"video {str(path)!r} has no frames")
    return frames[:count]


def load_media(im: InferenceModel, path: str | os.PathLike, kind: str | None = None,
               max_frames: int | None = None) -> np.ndarray:
    """Image or video pixels (F, K, H, W, 3); `kind` "image"/"video" or None (from the suffix)."""
    if kind is None:
        kind = "video" if str(path).lower().endswith(VIDEO_SUFFIXES) else "image"
    if kind == "video":
        return load_video_pixels(im, path, max_frames)
    if kind == "image":
        return load_image_pixels(im, path)
    raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")


def encode_question(im: InferenceModel, question: str, has_media: bool,
                    history: Sequence[tuple[str, str]] = (), return_fuse_mask: bool = False
                    ) -> list[int] | tuple[list[int], list[bool]]:
    """Prompt ids in the model's template, ending where the answer starts (and, optionally, the fuse mask:
    the history's answers are response tokens, which pre-fusion does not read, as in training)."""
    from mmlm.data.templates import encode_prompt

    text = question.replace("<video>", "<image>")
    return encode_prompt(im.tokenizer, text, im.template, has_media, history=list(history),
                         system=im.system_prompt, return_fuse_mask=return_fuse_mask)
