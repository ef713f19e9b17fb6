"""The `mmlm` model for lmms-eval: any mmlm checkpoint at one vision-token budget, or `auto`.

    python -m lmms_eval --model mmlm --model_args workdir=W,num_vision_tokens=4 --tasks gqa,pope --batch_size 16

Model args (`--model_args k=v,...`): `workdir=DIR` (a training run; `step=N`
picks a checkpoint, default the latest) or `checkpoint=DIR` (a model
checkpoint), `num_vision_tokens=M` (the Matryoshka budget of this run;
default: the model's), `weights=float|int8` (as stored, or weight-only int8
as `mmlm chat --weights`), `max_frames=N` (video frame cap; default: the
model's), `batch_size=N` (or lmms-eval's `--batch_size`), `max_new_tokens=N`
(when a task sets none; default 128), `seed=N` (sampling), `tokenizer=`,
`template=` (for checkpoints without data settings), `multi_image=frames` (see
below), `num_vision_tokens=auto` with `auto_threshold=T` or
`calibration_data=FILE` (`calibration_images=DIR`) (see below). A mistake
raises `mmlm.errors.UserError` naming the argument before any weights load.

Requests are answered in batches of `batch_size`, grouped by media kind and
prompt length and padded to fixed shapes (prompt length to a multiple of 16,
batch to `batch_size`, videos to `max_frames`) as `mmlm eval` does, so a run
compiles a handful of programs. Media follow the project's preprocessing
(`mmlm.data.preprocess`, `mmlm.infer.loading.load_media`): a PIL image from
a task's `doc_to_visual`, an image path, or a video path. A prompt holds one
image or one video (LLaVA-Mini's format has a single media placeholder), so a
request with several visuals is an error that says so, unless
`multi_image=frames`: then several images are read as the frames of one
video (in order, at most `max_frames`, sampled evenly), which is how
LLaVA-Mini sees a video (e.g. SEED-Bench's video questions, given as frames).

`generate_until` runs `mmlm.infer.generate.generate` (greedy, or sampled
with `temperature` / `top_p` when `do_sample` is set or `temperature` > 0),
stops at the template's stop tokens or `max_new_tokens`, and cuts the text
at the first `until` string. `loglikelihood` scores the continuation as the
assistant's answer to the context (the template supplies the separator, so
the continuation's leading whitespace is dropped): one forward pass over
prompt + continuation, the summed log-probabilities of the continuation's
tokens and whether each is the argmax.

`num_vision_tokens=auto` (a Matryoshka model only): the confidence cascade of
`mmlm chat` / `mmlm eval --num_vision_tokens auto` (`mmlm.infer.cascade`)
chooses the budget per request: the smallest budget answers unless the
probability of its greedy first answer token is below the threshold, then the
next one. The threshold is `auto_threshold=T` (strictly between 0 and 1;
default 0.5), or calibrated at start-up on `calibration_data=FILE` (questions
drawn from the training data, in `mmlm eval`'s JSONL format, media under
`calibration_images=DIR`, default the file's directory) exactly as `mmlm eval
--calibration_data` calibrates it (`mmlm.eval.auto.calibrate`); calibration
questions that overlap the shipped `mmlm_questions` task's file
(`MMLM_QUESTIONS`) are refused. `generate_until` runs
`mmlm.infer.cascade.generate_cascade`: the vision tower once per batch, one
prefill per budget tried (decoding continues from it where requests stop), and
each answer is the fixed-budget answer at the budget its request stopped at (a
sampled request chooses its budget by the greedy first token's probability,
then samples there).
`loglikelihood` scores a continuation at the budget the cascade stops at for
its context (the same prompt and image `generate_until` would answer): the
budget depends on the question, not on the continuation being scored, so the
options of a multiple-choice question are compared at one budget. Requests
without media have no vision tokens and no cascade. The budgets used are
counted per request type in `MMLM.budgets_used` and logged after each call.

Several processes (lmms-eval's `accelerate launch` / `torchrun`, one per host
or per accelerator): lmms-eval gives each rank its share of the documents;
each process answers its share on one local JAX device (`LOCAL_RANK` picks
it), on whatever backend JAX has (CPU, GPU, TPU).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from mmlm import IGNORE_INDEX
from mmlm.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 128
PAD_LEN_TO = 16  # prompt lengths are rounded up to a multiple of this (fewer compiled shapes)
MODEL_ARGS = ("workdir", "checkpoint", "step", "num_vision_tokens", "weights", "max_frames", "batch_size",
              "max_new_tokens", "seed", "tokenizer", "template", "multi_image", "auto_threshold", "calibration_data",
              "calibration_images")
MULTI_IMAGE = ("error", "frames")  # several images in one request: refuse, or read them as a video's frames
_HARNESS_ARGS = ("max_batch_size", "device")  # lmms-eval passes these to every model; mmlm does not need them


def _positive_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool) or (isinstance(value, float) and value != n):
        raise UserError(f"mmlm model args: {name}={value!r} must be a positive integer")
    return n


def _config_early(source: str) -> Any:
    """The model config from config.json alone (before the weights load)."""
    from mmlm.checkpoint import load_config_json
    from mmlm.models.config import model_config_from_dict

    try:
        return model_config_from_dict(load_config_json(source).model)
    except FileNotFoundError as e:
        raise UserError(f"mmlm model args: {e}") from None


def check_budget_early(source: str, num_vision_tokens: Any) -> int | None:
    """The budget from config.json alone (before the weights load): the model's default for None."""
    m = _positive_int("num_vision_tokens", num_vision_tokens)
    cfg = _config_early(source)
    try:
        return cfg.check_budget(m)
    except ValueError as e:
        raise UserError(f"mmlm model args: num_vision_tokens={num_vision_tokens}: {e}. "
                        f"Supported budgets: {list(cfg.supported_budgets)}") from None


def check_auto_early(source: str, auto_threshold: Any, calibration_data: Any, calibration_images: Any
                     ) -> tuple[tuple[int, ...], float | None, list[dict[str, Any]] | None]:
    """`num_vision_tokens=auto`'s arguments, checked before the weights load, as `mmlm eval` checks them:
    (the cascade's budgets, the threshold given or None, the calibration questions or None)."""
    from mmlm.eval.evaluate import read_jsonl
    from mmlm.eval.lmms_eval.questions import QUESTIONS_ENV
    from mmlm.infer import cascade

    try:
        budgets = cascade.cascade_budgets(_config_early(source))
    except UserError as e:
        raise UserError(f"mmlm model args: {e}") from None
    if auto_threshold is not None and calibration_data is not None:
        raise UserError("mmlm model args: give auto_threshold= or calibration_data= (which calibrates the "
                        "threshold), not both")
    if calibration_images is not None and calibration_data is None:
        raise UserError("mmlm model args: calibration_images= is the media root of calibration_data=; "
                        "give calibration_data= too")
    threshold = None
    if auto_threshold is not None:
        try:
            value = float(auto_threshold)
        except (TypeError, ValueError):
            raise UserError(f"mmlm model args: auto_threshold={auto_threshold!r} must be a number strictly between "
                            "0 and 1, e.g. 0.5") from None
        threshold = cascade.check_threshold(value, flag="mmlm model args: auto_threshold")
    calibration = None
    if calibration_data is not None:
        calibration = read_jsonl(str(calibration_data))
        if calibration_images is not None and not os.path.isdir(str(calibration_images)):
            raise UserError(f"mmlm model args: calibration_images={str(calibration_images)!r} is not a directory")
        evaluated = os.environ.get(QUESTIONS_ENV)  # the mmlm_questions task's questions, when it is the task
        if evaluated and os.path.isfile(evaluated):
            cascade.check_disjoint(calibration, read_jsonl(evaluated))
    return budgets, threshold, calibration


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The decoding knobs of one `generate_until` request (rows with equal settings share a batch)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float


def generation_settings(gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int, where: str
                        ) -> tuple[GenerationSettings, tuple[str, ...]]:
    """(settings, until strings) from an lmms-eval request's generation kwargs.

    Sampling happens when `do_sample` is true, or when it is absent and
    `temperature` > 0 (lmms-eval tasks write both conventions); a sampled
    request without a temperature uses 1. Beam search is refused.
    """
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise UserError(f"{where}: generation kwarg until={until!r} must be a string or a list of strings")
    if int(kw.get("num_beams") or 1) > 1:
        raise UserError(f"{where}: num_beams={kw['num_beams']}: mmlm decodes greedily or by sampling, "
                        "not by beam search (pass --gen_kwargs num_beams=1)")
    max_new = kw.get("max_new_tokens")
    max_new = default_max_new_tokens if max_new is None else _positive_int("max_new_tokens", max_new, False)
    temperature = float(kw.get("temperature") or 0.0)
    do_sample = kw.get("do_sample")
    sample = bool(do_sample) if do_sample is not None else temperature > 0
    if sample and temperature <= 0:
        temperature = 1.0
    top_p = float(kw["top_p"]) if sample and kw.get("top_p") is not None else 1.0
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"{where}: top_p={top_p} must be in (0, 1]")
    settings = GenerationSettings(int(max_new), temperature if sample else 0.0, top_p)
    return settings, tuple(s for s in until if s)


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any `until` string."""
    cuts = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def flatten_visuals(visuals: Any) -> list[Any]:
    """A `doc_to_visual` result as a flat list (tasks return None, one item, or nested lists)."""
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in flatten_visuals(item)]
    return [visuals]


@functools.partial(jax.jit, static_argnames=("cfg", "num_vision_tokens", "k"))
def continuation_scores(cfg: Any, params: Any, batch: dict[str, jax.Array], labels: jax.Array, *,
                        num_vision_tokens: int | None, k: int) -> tuple[jax.Array, jax.Array]:
    """Summed log-probability (B,) of each row's labelled tokens, and whether every one is the argmax (B,).

    One forward pass over prompt + continuation (`LlavaMini.hidden_states`);
    the LM head runs only on the first `k` labelled positions of each row
    (`labels` (B, T): the continuation's ids, IGNORE_INDEX elsewhere; k >= the
    longest continuation).
    """
    from mmlm.models.llava_mini import LlavaMini
    from mmlm.models.loss import first_supervised, targets_from_labels

    model = LlavaMini(cfg)
    variables = {"params": params}
    out = model.apply(variables, batch, num_vision_tokens, method=LlavaMini.hidden_states)
    hidden, targets = first_supervised(out["hidden"], targets_from_labels(labels, out["text_index"]), k)
    logits = model.apply(variables, hidden, method=LlavaMini.lm_logits)  # (B, k, V) fp32
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    token_logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(mask, token_logp, 0.0), axis=1)
    greedy = jnp.all(~mask | (jnp.argmax(logits, axis=-1) == safe), axis=1)
    return total, greedy


@dataclasses.dataclass
class _Row:
    """One request, prepared: its prompt ids and its visual (not yet turned into pixels)."""

    index: int  # position in the request list
    where: str  # names the request in messages
    kind: str | None  # "image", "video" or None (text only)
    visual: Any  # a PIL image, a file path, a list of PIL images (frames); None for text only
    ids: list[int]
    fuse: list[bool] | None = None  # loglikelihood: the fuse mask of prompt + continuation
    labels: list[int] | None = None  # loglikelihood: continuation ids at their positions, else IGNORE_INDEX
    settings: GenerationSettings | None = None  # generate_until
    until: tuple[str, ...] = ()
    prompt: list[int] | None = None  # loglikelihood with num_vision_tokens=auto: the context as a question
    context: Any = None  # loglikelihood with auto: what identifies the context and its visual (its cascade)


class MMLM(lmms):
    """lmms-eval's `mmlm` model: `generate_until` and `loglikelihood` on an mmlm checkpoint (module docstring)."""

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> "MMLM":
        """`--model_args` plus lmms-eval's own settings; a `batch_size` in the model args wins over `--batch_size`."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None and key not in args:
                args[key] = value
        return cls(**args)

    def __init__(self, workdir: str | None = None, checkpoint: str | None = None, step: int | None = None,
                 num_vision_tokens: int | None = None, weights: str = "float", max_frames: int | None = None,
                 batch_size: int | str = 1, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0,
                 tokenizer: str | None = None, template: str | None = None, multi_image: str = "error",
                 auto_threshold: float | None = None, calibration_data: str | None = None,
                 calibration_images: str | None = None, **harness: Any) -> None:
        super().__init__()
        from mmlm.infer import cascade
        from mmlm.infer.loading import load_inference_model
        from mmlm.models.quant import WEIGHT_FORMATS

        unknown = sorted(k for k in harness if k not in _HARNESS_ARGS)
        if unknown:
            raise UserError(f"mmlm model args: unknown {', '.join(unknown)}; accepted: {', '.join(MODEL_ARGS)}")
        if (workdir is None) == (checkpoint is None):
            raise UserError("mmlm model args: pass exactly one of workdir=DIR (a training run) or checkpoint=DIR "
                            "(a model checkpoint), e.g. --model_args workdir=/path/to/run,num_vision_tokens=1")
        source = str(workdir if workdir is not None else checkpoint)
        if not os.path.isdir(source):
            raise UserError(f"mmlm model args: {'workdir' if workdir is not None else 'checkpoint'}={source!r} "
                            "is not a directory")
        if step is not None and workdir is None:
            raise UserError("mmlm model args: step= picks a checkpoint of a workdir; it needs workdir=, "
                            "not checkpoint=")
        if weights not in WEIGHT_FORMATS:
            raise UserError(f"mmlm model args: weights={weights!r}: choose from {', '.join(WEIGHT_FORMATS)} "
                            "('float': the stored dtype, e.g. bf16)")
        if multi_image not in MULTI_IMAGE:
            raise UserError(f"mmlm model args: multi_image={multi_image!r}: choose from {', '.join(MULTI_IMAGE)}")
        self.multi_image = multi_image
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise UserError(f"mmlm model args: batch_size={batch_size!r}: give a number (--batch_size 16)")
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size, allow_none=False)
        self.max_frames = _positive_int("max_frames", max_frames)
        self.default_max_new_tokens = _positive_int("max_new_tokens", max_new_tokens, allow_none=False)
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise UserError(f"mmlm model args: step={step!r} must be a checkpoint step (an integer >= 0)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"mmlm model args: seed={seed!r} must be an integer")
        # num_vision_tokens=auto: the cascade's budgets (None: one fixed budget, `num_vision_tokens`).
        self.auto_budgets: tuple[int, ...] | None = None
        calibration = None
        if cascade.is_auto(num_vision_tokens):
            self.auto_budgets, threshold, calibration = check_auto_early(source, auto_threshold, calibration_data,
                                                                         calibration_images)
            self.num_vision_tokens = None
        else:
            if auto_threshold is not None or calibration_data is not None or calibration_images is not None:
                raise UserError("mmlm model args: auto_threshold=, calibration_data= and calibration_images= go "
                                "with num_vision_tokens=auto")
            self.num_vision_tokens = check_budget_early(source, num_vision_tokens)
        im = load_inference_model(workdir=None if workdir is None else source,
                                  checkpoint=None if checkpoint is None else source, step=step,
                                  tokenizer=tokenizer, template=template, weights=weights)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        local = jax.local_devices()
        self.jax_device = local[int(os.environ.get("LOCAL_RANK", 0)) % len(local)]
        # Committed params: every batch of this process runs on `jax_device` (the batches follow them there).
        self.im = dataclasses.replace(im, params=jax.device_put(im.params, self.jax_device))
        self._rng = jax.random.fold_in(jax.random.PRNGKey(seed), self._rank)
        self._batches = 0
        # Requests (generate_until) or distinct contexts (loglikelihood) per budget used; 0: no media.
        self.budgets_used: dict[str, collections.Counter] = {}
        self.auto_threshold: float | None = None
        self.calibration: dict[str, Any] | None = None
        if self.auto_budgets is not None:
            self.auto_threshold = cascade.DEFAULT_THRESHOLD if threshold is None else threshold
            if calibration is not None:
                self._calibrate(calibration, str(calibration_data), calibration_images)

    def _calibrate(self, rows: list[dict[str, Any]], path: str, images: str | None) -> None:
        """The threshold calibrated on `rows` as `mmlm eval --calibration_data` does (`mmlm.eval.auto.calibrate`)."""
        from mmlm.eval.auto import calibrate
        from mmlm.eval.evaluate import prepare_questions

        root = images or os.path.dirname(os.path.abspath(path))
        cal = calibrate(self.im, prepare_questions(self.im, rows, root), self.auto_budgets,
                        batch_size=self.batch_size, max_new_tokens=self.default_max_new_tokens)
        self.auto_threshold = float(cal["threshold"])
        self.calibration = {**cal, "data": os.path.abspath(path)}
        self._log(f"num_vision_tokens=auto: threshold {self.auto_threshold:g} calibrated on {cal['questions']} "
                  f"questions of {path}")

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[mmlm] {message}", file=sys.stderr)

    def _count_budgets(self, request_type: str, used: Sequence[int]) -> None:
        """Adds `used` (budgets, 0 for no media) to `budgets_used` and logs this call's histogram."""
        counts = collections.Counter(int(m) for m in used)
        self.budgets_used.setdefault(request_type, collections.Counter()).update(counts)
        media = {m: c for m, c in sorted(counts.items()) if m}
        n = sum(media.values())
        mean = sum(m * c for m, c in media.items()) / max(n, 1)
        self._log(f"num_vision_tokens=auto (threshold {self.auto_threshold:g}, budgets {list(self.auto_budgets)}): "
                  f"{request_type} {'requests' if request_type == 'generate_until' else 'contexts'} per budget "
                  f"{media}, mean {mean:.2f} vision tokens" + (f"; {counts[0]} without media" if counts[0] else ""))

    # ------------------------------------------------------------------ harness properties

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        """Where lmms-eval's rank collectives put their tensors: the host (mmlm's compute is on `jax_device`)."""
        import torch

        return torch.device("cpu")

    @property
    def eot_token_id(self) -> int:
        return int(self.im.stop_ids[0])

    # ------------------------------------------------------------------ inputs

    def _visual(self, doc_to_visual: Callable[[Any], Any] | None, task: str, split: str, doc_id: int,
                where: str) -> tuple[str | None, Any]:
        from PIL import Image

        from mmlm.infer.loading import VIDEO_SUFFIXES

        if doc_to_visual is None:
            return None, None
        items = flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
        if not items:
            return None, None
        if len(items) > 1:
            if self.multi_image == "frames" and all(isinstance(v, Image.Image) for v in items):
                return "video", items
            raise UserError(f"{where}: {len(items)} images/videos for one prompt, but mmlm's prompt format holds "
                            "one image or one video (a single media placeholder, as LLaVA-Mini); pass "
                            "multi_image=frames in --model_args to read several images as one video's frames")
        item = items[0]
        if isinstance(item, Image.Image):
            return "image", item
        if isinstance(item, (str, os.PathLike)):
            return ("video" if str(item).lower().endswith(VIDEO_SUFFIXES) else "image"), str(item)
        raise UserError(f"{where}: a {type(item).__name__} visual; mmlm reads images (PIL or a file path) and "
                        f"video files {VIDEO_SUFFIXES}")

    def _pixels(self, row: _Row) -> np.ndarray | None:
        """(F, K, H, W, 3) float32, as `mmlm eval` and training preprocess (None for text only)."""
        from PIL import Image

        from mmlm.data import preprocess
        from mmlm.infer.loading import load_media

        if row.kind is None:
            return None
        im = self.im
        try:
            if isinstance(row.visual, Image.Image):
                img = preprocess._to_rgb(row.visual)  # the same 8-bit RGB conversion as decoded files get
                return preprocess.preprocess_image(img, im.image_size, im.hd_grid, im.image_mean, im.image_std)[None]
            if isinstance(row.visual, list):  # images as a video's frames (multi_image=frames)
                frames = [preprocess._to_rgb(v) for v in row.visual]
                pixels, count = preprocess.preprocess_frames(frames, self.max_frames or im.max_frames, im.image_size,
                                                             im.hd_grid, im.image_mean, im.image_std)
                return pixels[:count]
            return load_media(im, row.visual, row.kind, self.max_frames)
        except UserError as e:
            raise UserError(f"{row.where}: {e}") from None

    def _check_length(self, n: int, where: str) -> None:
        if n > self.im.max_text_len:
            raise UserError(f"{where} is {n} tokens long with its template; the model takes at most "
                            f"{self.im.max_text_len} (data.max_text_len)")

    def _prompt_ids(self, context: str, has_media: bool, where: str) -> list[int]:
        from mmlm.infer.loading import encode_question

        try:
            ids = encode_question(self.im, context, has_media)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        self._check_length(len(ids), where)
        return ids

    def _scored_ids(self, context: str, continuation: str, has_media: bool, where: str
                    ) -> tuple[list[int], list[bool], list[int]]:
        """ids, fuse mask and labels of the context as the question and the continuation as the answer.

        Built by the template's own conversation encoder (as training builds a
        sample), without the end-of-turn token that follows an answer.
        """
        from mmlm.data import templates

        text = context.replace(templates.VIDEO_MARKER, templates.IMAGE_MARKER)
        markers = templates.count_markers(text)
        if has_media and not markers:
            text = templates.IMAGE_MARKER + "\n" + text
        elif markers and not has_media:
            raise UserError(f"{where}: the context has an {templates.IMAGE_MARKER} marker but no image or video")
        turns = [{"from": "human", "value": text}, {"from": "gpt", "value": continuation.lstrip()}]
        try:
            enc = templates.encode_conversation(self.im.tokenizer, turns, self.im.template, max_len=1 << 30,
                                                system=self.im.system_prompt)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        ids, fuse, labels = (enc[k].tolist()[:-1] for k in ("input_ids", "fuse_mask", "labels"))
        self._check_length(len(ids), where)
        return ids, fuse, labels

    # ------------------------------------------------------------------ batching

    def _batches_of(self, rows: Sequence[_Row], key: Callable[[_Row], Any]) -> list[list[_Row]]:
        """Rows grouped by `key` (which includes the media kind), by prompt length, in batches of `batch_size`."""
        groups: dict[Any, list[_Row]] = {}
        for row in rows:
            groups.setdefault(key(row), []).append(row)
        out = []
        for group in groups.values():
            group = sorted(group, key=lambda r: (len(r.ids), r.index))
            out += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        return out

    def _make_batch(self, chunk: Sequence[_Row], with_fuse: bool) -> dict[str, np.ndarray]:
        from mmlm.infer.batching import make_batch

        video = chunk[0].kind == "video"
        return make_batch(self.im.cfg, [r.ids for r in chunk], [self._pixels(r) for r in chunk],
                          pad_id=self.im.tokenizer.pad_id, pad_len_to=PAD_LEN_TO,
                          frames=(self.max_frames or self.im.max_frames) if video else None,
                          batch_size=self.batch_size, fuse_masks=[r.fuse for r in chunk] if with_fuse else None)

    def _progress(self, total: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=self.rank != 0)

    # ------------------------------------------------------------------ the harness API

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers, one per request, in request order (module docstring)."""
        from mmlm.infer.cascade import generate_cascade
        from mmlm.infer.generate import generate, trim_answer

        rows = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            where = f"task {task!r} document {doc_id}"
            kind, visual = self._visual(doc_to_visual, task, split, doc_id, where)
            settings, until = generation_settings(gen_kwargs, self.default_max_new_tokens, where)
            rows.append(_Row(i, where, kind, visual, self._prompt_ids(context, kind is not None, where),
                             settings=settings, until=until))
        results: list[str] = [""] * len(rows)
        used: list[int] = []
        bar = self._progress(len(rows), "mmlm generate_until")
        for chunk in self._batches_of(rows, key=lambda r: (r.kind or "", r.settings)):
            s = chunk[0].settings
            batch = self._make_batch(chunk, with_fuse=False)
            self._batches += 1
            kw = dict(max_new_tokens=s.max_new_tokens, eos_id=self.im.stop_ids, temperature=s.temperature,
                      top_p=s.top_p, rng=jax.random.fold_in(self._rng, self._batches), pad_id=self.im.tokenizer.pad_id)
            if self.auto_budgets is None:
                tokens, lengths = generate(self.im.cfg, self.im.params, batch, num_vision_tokens=self.num_vision_tokens,
                                           **kw)
            else:
                tokens, lengths, budget, _ = generate_cascade(self.im.cfg, self.im.params, batch, self.auto_threshold,
                                                              budgets=self.auto_budgets, rows=len(chunk), **kw)
                used += budget[: len(chunk)].tolist()
            for j, row in enumerate(chunk):
                text = self.im.tokenizer.decode(trim_answer(tokens[j], lengths[j]))
                results[row.index] = cut_at_stop_strings(text, row.until)
                self.cache_hook.add_partial("generate_until", (requests[row.index].args[0], row.until),
                                            results[row.index])
            bar.update(len(chunk))
        bar.close()
        if self.auto_budgets is not None and rows:
            self._count_budgets("generate_until", used)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | context, media), whether the continuation is the greedy one), per request."""
        rows = []
        for i, req in enumerate(requests):
            args = req.args
            key = None
            if len(args) == 2:  # unconditional scoring (acc_mutual_info): no media
                (context, continuation), kind, visual = args, None, None
                where = f"request {i}"
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                where = f"task {task!r} document {doc_id}"
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                kind, visual = self._visual(doc_to_visual, task, split, doc_id, where)
                key = (task, split, doc_id, context)
            ids, fuse, labels = self._scored_ids(context, str(continuation), kind is not None, where)
            prompt = None
            if self.auto_budgets is not None and kind is not None:  # the cascade runs on the context alone
                prompt = self._prompt_ids(context, True, where)
            rows.append(_Row(i, where, kind, visual, ids, fuse=fuse, labels=labels, prompt=prompt, context=key))
        budget = self._context_budgets(rows) if self.auto_budgets is not None else {}
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        bar = self._progress(len(rows), "mmlm loglikelihood")
        for chunk in self._batches_of(rows, key=lambda r: (r.kind or "", budget.get(r.index, 0))):
            batch = self._make_batch(chunk, with_fuse=True)
            labels = np.full(batch["input_ids"].shape, IGNORE_INDEX, np.int32)
            for j, row in enumerate(chunk):
                labels[j, : len(row.labels)] = row.labels
            longest = max(sum(1 for t in r.labels if t != IGNORE_INDEX) for r in chunk)
            k = max(8, -(-longest // 8) * 8)  # a few compiled sizes, not one per continuation length
            m = budget.get(chunk[0].index) or self.num_vision_tokens  # auto: the budget of the contexts' cascade
            total, greedy = continuation_scores(self.im.cfg, self.im.params, batch, labels, num_vision_tokens=m, k=k)
            total, greedy = np.asarray(total), np.asarray(greedy)
            for j, row in enumerate(chunk):
                results[row.index] = (float(total[j]), bool(greedy[j]))
            bar.update(len(chunk))
        bar.close()
        return results

    def _context_budgets(self, rows: Sequence[_Row]) -> dict[int, int]:
        """num_vision_tokens=auto for `loglikelihood`: row index -> the budget the cascade stops at for the
        row's context (its prompt and visual, as `generate_until` would answer it); rows with one
        context share its cascade. Rows without media are left out (no vision tokens)."""
        from mmlm.infer.cascade import cascade_stops
        from mmlm.infer.generate import with_vision_features

        contexts: dict[Any, _Row] = {}  # (task, split, doc_id, context) -> the context as a question
        for row in rows:
            if row.kind is not None:
                contexts.setdefault(row.context, _Row(len(contexts), row.where, row.kind, row.visual, row.prompt))
        chosen: dict[int, int] = {}
        for chunk in self._batches_of(list(contexts.values()), key=lambda r: r.kind):
            batch = with_vision_features(self.im.cfg, self.im.params, self._make_batch(chunk, with_fuse=False))
            stop, _ = cascade_stops(self.im.cfg, self.im.params, batch, self.auto_threshold, self.auto_budgets,
                                    rows=len(chunk))
            for j, c in enumerate(chunk):
                chosen[c.index] = self.auto_budgets[int(stop[j])]
        if contexts:
            self._count_budgets("loglikelihood", list(chosen.values()))
        return {row.index: chosen[contexts[row.context].index] for row in rows if row.kind is not None}

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise UserError("mmlm does not implement lmms-eval's multi-round generation (generate_until_multi_round); "
                        "choose single-turn tasks")
