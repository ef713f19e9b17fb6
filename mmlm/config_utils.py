"""Loading `ml_collections` config files and applying command-line overrides.

A config file is a Python file under `configs/` defining `get_config()` that
returns a `ConfigDict`. A study file (`configs/experiments/`) declares `ROWS`
and `get_config(row)`; `FILE.py:ROW` picks a row. Overrides use the
ml_collections flag syntax:
`--config.train.steps=100`, `--config.model.compressor.budgets=(1,4)`.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Any, Iterable

import ml_collections

from mmlm.errors import UserError
from mmlm.models.config import PARTS


class ConfigError(UserError, ValueError):
    """A mistake in a config file or a `--config.a.b=value` override (a `UserError`)."""


def split_row(spec: str) -> tuple[str, str | None]:
    """`"configs/x.py:row"` -> ("configs/x.py", "row"); a plain path (or one that exists as given) -> (path, None).

    The row is the text after the last colon when the text before it names a
    `.py` file, so a path that merely contains a colon is still read whole.
    """
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, row = spec.rpartition(":")
    if not path.endswith(".py"):
        return spec, None
    return path, row


def load_config_module(path: str) -> Any:
    """Imports the Python file `path` as a fresh module (a config file, or a base it shares).

    Raises `ConfigError` when the file is missing, is a directory, does not
    compile or raises while running.
    """
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist; pass a file such as configs/tiny.py")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} is not a file; pass a Python file such as configs/tiny.py")
    spec = importlib.util.spec_from_file_location(
        f"mmlm_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} is not a Python file (it must end in .py and define "
                          "get_config())")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r} has a syntax error at line {e.lineno}: {e.msg}") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from None
    except ConfigError:
        raise
    except Exception as e:  # the user's file failed while being imported
        raise ConfigError(f"config file {path!r} raised {type(e).__name__} while loading: {e}") from None
    return module


def config_rows(module: Any) -> tuple[str, ...]:
    """The rows a config module declares (`ROWS`, a sequence or mapping of names); () when it has none."""
    rows = getattr(module, "ROWS", ())
    return tuple(str(r) for r in rows)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`, or `get_config(row)` for `FILE.py:ROW`.

    A file with rows (an experiment study, `configs/experiments/`) defines
    `ROWS` (the row names) and `get_config(row)`; `FILE.py:ROW` selects one.
    Raises `ConfigError` when the file is missing, is a directory, does not
    compile, raises while running, has no `get_config`, returns something
    other than a `ConfigDict`, or when the row is missing or not one of `ROWS`
    (the message lists them).
    """
    path, row = split_row(spec)
    module = load_config_module(path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {path!r} defines no get_config() function")
    rows = config_rows(module)
    if row is not None and not rows:
        raise ConfigError(f"config file {path!r} has no rows (no ROWS), so {spec!r} cannot select row {row!r}; "
                          f"pass {path!r} alone")
    if rows and row is None:
        raise ConfigError(f"config file {path!r} is a study with rows; pick one as {path}:ROW, ROW one of "
                          f"{list(rows)}")
    if rows and row not in rows:
        raise ConfigError(f"config file {path!r} has no row {row!r}; its rows are {list(rows)}")
    try:
        config = get_config() if row is None else get_config(row)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"get_config({'' if row is None else repr(row)}) of {path!r} raised "
                          f"{type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of {path!r} returned {type(config).__name__}, expected an "
                          "ml_collections.ConfigDict")
    return config


def _parse_value(text: str, current: Any) -> Any:
    """Parses an override string to the type of the value it replaces.

    The field keeps its type: an int field takes an integer (`2.0` is read as
    2, `2.5` is refused), a float field an int or float, a bool field
    true/false, a tuple a sequence (a single value becomes a 1-tuple), a
    section a dict; a None field takes any literal (or the raw text).
    """
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if current is None:
            return text  # a None default with a free-form string value
        raise ValueError(f"expected {_type_name(current)}, got {text!r}") from None
    if current is None:
        return value
    if isinstance(current, int):
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {text!r}"
                             + (" (a fractional number for an integer field)" if isinstance(value, float) else ""))
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {text!r}")
        return float(value)
    if isinstance(current, (tuple, list)):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"expected a sequence such as (1,4), got {text!r}")
        return tuple(value) if isinstance(current, tuple) else list(value)
    if isinstance(current, (ml_collections.ConfigDict, dict)):
        if not isinstance(value, dict):
            raise ValueError(f"this is a config section; set its fields (a.b.field=value) or give a dict, "
                             f"got {text!r}")
        return value
    return value


def _type_name(value: Any) -> str:
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, (tuple, list)):
        return "a sequence such as (1,4)"
    return f"a Python literal ({type(value).__name__})"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies `a.b.c=value` strings (a leading `--config.` is accepted); mistakes raise `ConfigError`."""
    for item in overrides:
        text = item
        for prefix in ("--config.", "config."):
            if text.startswith(prefix):
                text = text[len(prefix):]
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --config.a.b=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"override {item!r}: config has no field {'.'.join(parts[:i + 1])!r}")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            near = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"override {item!r}: config has no field {key!r}"
                + (f"; fields here are {near}" if near else ""))
        current = node[leaf]
        try:
            value = _parse_value(raw, current)
        except ValueError as e:
            raise ConfigError(f"override {item!r}: config.{key}: {e}") from None
        with node.ignore_type():
            node[leaf] = value
    return config


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file and applies overrides; the result is unlocked."""
    return apply_overrides(load_config_file(path), overrides)


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x=y` arguments (overrides) from the others."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides


# ----------------------------------------------------------------------------- validation

SCHEDULES = ("cosine", "linear", "wsd", "constant")
MATRYOSHKA_LOSSES = ("sample", "all", "distill", "largest")  # train.matryoshka_loss (mmlm.train.recipe)
MAX_SEED = 2**32 - 1  # seeds: what numpy and jax.random accept


def _check_matryoshka_recipe(config: ml_collections.ConfigDict, cfg: Any) -> None:
    """train.matryoshka_probs / matryoshka_weights (one non-negative number per budget, not all 0) and
    train.distill_weight (>= 0)."""
    t = config.train
    budgets = sorted(set(int(b) for b in cfg.compressor.budgets)) if cfg is not None and \
        cfg.mode == "llava_mini" and cfg.compressor.matryoshka else []
    for key in ("matryoshka_probs", "matryoshka_weights"):
        values = tuple(t.get(key, ()) or ())
        if not values:
            continue
        if len(values) != len(budgets) or any(float(v) < 0 for v in values) or not sum(float(v) for v in values) > 0:
            raise ConfigError(f"config.train.{key}={values!r}: give one non-negative number per Matryoshka budget "
                              f"{budgets} (smallest first, not all 0), or () for "
                              f"{'uniform draws' if key == 'matryoshka_probs' else 'the plain mean'}")
    if float(t.get("distill_weight", 1.0)) < 0:
        raise ConfigError(f"config.train.distill_weight={t.distill_weight!r}: must be >= 0")
    if t.get("matryoshka_loss", "sample") == "distill" and cfg is not None and cfg.loss_positions > 0:
        raise ConfigError("config.train.matryoshka_loss='distill' needs the logits of every position: set "
                          "config.model.loss_positions=0")


def _num(config: ml_collections.ConfigDict, key: str, *, kind: type = int, low: float | None = None,
         high: float | None = None, low_open: bool = False, allow: tuple = (), hint: str = "") -> Any:
    """`config.<key>` checked for type and range; raises `ConfigError` naming the key."""
    node: Any = config
    for part in key.split("."):
        node = node[part]
    value = node
    if value in allow and not isinstance(value, bool):
        return value
    ok_type = (isinstance(value, int) and not isinstance(value, bool)) if kind is int else (
        isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok_type:
        raise ConfigError(f"config.{key} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r} ({type(value).__name__})")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"config.{key} must be finite, got {value!r}")
    bad = (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        rng = (f"> {low}" if low_open else f">= {low}") if high is None else \
            f"in {'(' if low_open else '['}{low}, {high}]"
        extra = f" or one of {list(allow)}" if allow else ""
        raise ConfigError(f"config.{key} must be {rng}{extra}, got {value!r}" + (f"; {hint}" if hint else ""))
    return value


def _check_model(config: ml_collections.ConfigDict) -> Any:
    import dataclasses

    from mmlm.models.config import model_config_from_dict

    try:
        cfg = model_config_from_dict(config.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None

    def check_types(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value, default = getattr(obj, f.name), f.default
            key = f"{prefix}.{f.name}"
            if dataclasses.is_dataclass(value):
                check_types(value, key)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"config.{key} must be true or false, got {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"config.{key} must be an integer, got {value!r} ({type(value).__name__})")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ConfigError(f"config.{key} must be a number, got {value!r}")
            elif isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f"config.{key} must be a string, got {value!r}")

    check_types(cfg, "model")
    for key in ("vision.image_size", "vision.patch_size", "vision.width", "vision.layers", "vision.heads",
                "vision.mlp_dim", "llm.vocab_size", "llm.width", "llm.layers", "llm.heads", "llm.kv_heads",
                "llm.head_dim", "llm.mlp_dim", "compressor.tokens", "compressor.heads", "image_size", "hd_grid"):
        _num(config, f"model.{key}", low=1)
    _num(config, "model.prefusion_layers", low=0)
    # Zeros that make the forward non-finite: a norm eps of 0 divides a zero (e.g. padding) row by 0, a RoPE
    # base of 0 gives infinite frequencies.
    for key in ("vision.layer_norm_eps", "llm.rms_eps", "compressor.ln_eps", "llm.rope_theta"):
        _num(config, f"model.{key}", kind=float, low=0, low_open=True, hint="0 makes the model's output NaN")
    _num(config, "model.init_std", kind=float, low=0, hint="0 means lecun normal")
    for key in ("scan_unroll", "loss_chunk", "loss_positions"):
        _num(config, f"model.{key}", low=0, hint="0 means all")
    v = cfg.vision
    if v.width % v.heads:
        raise ConfigError(f"config.model.vision.heads={v.heads} does not divide config.model.vision.width="
                          f"{v.width}; choose heads that divide the width")
    try:
        v.grid
        v.blocks_used
        if cfg.mode == "llava_mini":
            cfg.compressor.grid
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    if cfg.mode == "llava_mini" and cfg.compressor.kind == "query" and v.width % cfg.compressor.heads:
        raise ConfigError(f"config.model.compressor.heads={cfg.compressor.heads} does not divide the vision "
                          f"width config.model.vision.width={v.width}")
    if cfg.compressor.kind not in ("query", "avgpool"):
        raise ConfigError(f"config.model.compressor.kind must be 'query' or 'avgpool', got {cfg.compressor.kind!r}")
    return cfg


def _check_mesh(config: ml_collections.ConfigDict, num_devices: int | None) -> dict[str, int] | None:
    from mmlm.sharding import MESH_AXES, MESH_OPTIONS, mesh_shape

    mesh = config.get("mesh")
    if mesh is None:
        return None
    unknown = sorted(set(mesh.keys()) - set(MESH_AXES) - set(MESH_OPTIONS))
    if unknown:
        raise ConfigError(f"config.mesh has unknown axes {unknown}; the axes are {list(MESH_AXES)} (options: "
                          f"{list(MESH_OPTIONS)})")
    for option in MESH_OPTIONS:
        if option in mesh and not isinstance(mesh[option], bool):
            raise ConfigError(f"config.mesh.{option} must be True or False, got {mesh[option]!r}")
    for axis in MESH_AXES:
        value = mesh.get(axis, 1)
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ConfigError(f"config.mesh.{axis} must be a positive integer or -1 (the remaining devices), "
                              f"got {value!r}")
    if num_devices is None:
        return None
    try:
        return mesh_shape(mesh, num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def check_vision_pretrain(config: ml_collections.ConfigDict) -> None:
    """`train.vision_pretrain`: ranges, and (when it runs) a synthetic still-image dataset for its labels."""
    _num(config, "train.vision_pretrain.steps", low=0, hint="0 turns ViT pretraining off")
    for key in ("batch_size", "num_images", "eval_images"):
        _num(config, f"train.vision_pretrain.{key}", low=1)
    _num(config, "train.vision_pretrain.learning_rate", kind=float, low=0, low_open=True)
    if "position_weight" in config.train.vision_pretrain:
        _num(config, "train.vision_pretrain.position_weight", kind=float, low=0, hint="0 turns the position heads off")
    if int(config.train.vision_pretrain.steps) == 0:
        return
    from mmlm.data.synth import IMAGE_KINDS

    kind = config.get("synthetic", {}).get("kind", "")
    if kind not in IMAGE_KINDS:
        raise ConfigError(
            f"config.train.vision_pretrain.steps={int(config.train.vision_pretrain.steps)} needs per-patch labels "
            f"from a synthetic still-image dataset (config.synthetic.kind one of {IMAGE_KINDS}), got "
            f"synthetic.kind={kind!r}; set --config.train.vision_pretrain.steps=0 for other data")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    process_count: int = 1) -> None:
    """Checks a whole config before anything is built: types, ranges, divisibility.

    Sections that a config lacks (e.g. `train` in a model-only config read by
    `mmlm summary`) are skipped. With `num_devices` the mesh must multiply to
    it and the batch must split over its data-parallel axes. Raises
    `ConfigError` (a `UserError`) naming the key, the value and what is
    expected.
    """
    if "model" not in config:
        raise ConfigError("the config has no 'model' section")
    cfg = _check_model(config)
    if "text_len" in config:
        _num(config, "text_len", low=1)
    sizes = _check_mesh(config, num_devices)
    if "seed" in config:
        _num(config, "seed", low=0, high=MAX_SEED)
    if config.get("synthetic") is not None and config.synthetic.get("kind"):
        _check_synthetic(config)
    if "train" in config:
        _num(config, "train.steps", low=1, allow=(-1,), hint="-1 means train.epochs passes over the data")
        if int(config.train.steps) == -1:
            _num(config, "train.epochs", kind=float, low=0, low_open=True)
        for key in ("grad_accum_steps", "checkpoint_every", "log_every"):
            _num(config, f"train.{key}", low=1)
        _num(config, "train.keep_checkpoints", low=0, hint="0 keeps every checkpoint")
        if config.train.get("matryoshka_loss", "sample") not in MATRYOSHKA_LOSSES:
            raise ConfigError(f"config.train.matryoshka_loss={config.train.matryoshka_loss!r}: choose "
                              f"{' or '.join(repr(k) for k in MATRYOSHKA_LOSSES)} (one budget drawn per step, "
                              "every budget each step, a drawn budget taught by the largest, or the largest plus a drawn one)")
        _check_matryoshka_recipe(config, cfg)
        trainable = config.train.trainable
        if isinstance(trainable, str) or not isinstance(trainable, (tuple, list)):
            raise ConfigError(f"config.train.trainable must be a tuple of parts such as {PARTS[1:]}, "
                              f"got {trainable!r}")
        unknown = sorted(set(trainable) - set(PARTS))
        if unknown or not trainable:
            raise ConfigError(f"config.train.trainable={tuple(trainable)!r}: "
                              + (f"unknown part(s) {unknown}; " if unknown else "nothing to train; ")
                              + f"parts are {list(PARTS)}")
        if "vision_pretrain" in config.train:
            check_vision_pretrain(config)
    if "optim" in config:
        o = config.optim
        if o.schedule not in SCHEDULES:
            raise ConfigError(f"config.optim.schedule={o.schedule!r} is not a schedule; choose one of "
                              f"{list(SCHEDULES)}")
        for part in o.learning_rate.keys():
            _num(config, f"optim.learning_rate.{part}", kind=float, low=0,
                 hint="a learning rate cannot be negative")
        _num(config, "optim.warmup_ratio", kind=float, low=0, high=1)
        _num(config, "optim.end_lr_ratio", kind=float, low=0)
        if o.schedule == "wsd":
            _num(config, "optim.decay_ratio", kind=float, low=0, high=1, low_open=True)
        for key in ("b1", "b2"):
            _num(config, f"optim.{key}", kind=float, low=0, high=1)
        _num(config, "optim.eps", kind=float, low=0, low_open=True)
        _num(config, "optim.weight_decay", kind=float, low=0)
        _num(config, "optim.grad_clip_norm", kind=float, low=0, hint="0 means no clipping")
    if "eval" in config:
        _num(config, "eval.every", low=-1, hint="0 = only after the last step, -1 = never")
        for key in ("loss_batches", "num_questions", "print_samples"):
            _num(config, f"eval.{key}", low=0)
        _num(config, "eval.max_new_tokens", low=1)
        for b in config.eval.budgets:
            try:
                cfg.check_budget(int(b))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config.eval.budgets: {e}") from None
    if "data" in config:
        _check_data(config, sizes, process_count)


def _check_synthetic(config: ml_collections.ConfigDict) -> None:
    """`config.synthetic` (a dataset rendered on first use): sizes, seed, and at least one batch of records."""
    for key in ("num_train", "num_eval", "questions_per_image"):
        _num(config, f"synthetic.{key}", low=1)
    _num(config, "synthetic.seed", low=0, high=MAX_SEED)
    _num(config, "synthetic.image_size", low=0, hint="0 means the synthesiser's default")
    if "data" in config and "train" in config:
        n, b = int(config.synthetic.num_train), int(config.data.batch_size)
        if n < b:
            raise ConfigError(f"config.synthetic.num_train={n} is fewer than one batch "
                              f"(config.data.batch_size={b}); raise num_train or lower the batch size")


def _check_pixels(config: ml_collections.ConfigDict) -> None:
    """data.image_mean / image_std: 3 numbers each, std > 0, equal to model.image_mean / image_std.

    The pipeline normalises float images with the data's constants and the model uint8 images with its own:
    different constants would feed the model differently scaled pixels depending on data.pixels_on_device.
    """
    from mmlm.pixels import check_mean_std

    d = config.data
    if "image_mean" not in d or "image_std" not in d:
        return
    try:
        check_mean_std(d.image_mean, d.image_std, "config.data")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("image_mean", "image_std"):
        model_value = config.model.get(key)
        if model_value is not None and tuple(map(float, d[key])) != tuple(map(float, model_value)):
            raise ConfigError(f"config.data.{key}={tuple(d[key])} differs from config.model.{key}="
                              f"{tuple(model_value)}: the model normalises uint8 pixels with its own constants; "
                              f"set both to the same values (--config.model.{key}=... sets data.{key} too in "
                              "configs built by mmlm.config_defaults)")


def _check_data(config: ml_collections.ConfigDict, sizes: dict[str, int] | None, process_count: int) -> None:
    d = config.data
    b = _num(config, "data.batch_size", low=1)
    _num(config, "data.eval_batch_size", low=0, hint="0 means data.batch_size")
    _num(config, "data.max_text_len", low=2)
    _num(config, "data.max_frames", low=1)
    _num(config, "data.video_fps", kind=float, low=0, low_open=True)
    if "seed" in d:
        _num(config, "data.seed", low=0, high=MAX_SEED)
    if d.get("num_epochs") is not None:
        _num(config, "data.num_epochs", low=1, hint="None repeats forever")
    if "worker_buffer_size" in d:
        _num(config, "data.worker_buffer_size", low=1)
    for key in ("video_chunk_frames", "prefill_chunk_tokens"):
        if key in d:
            _num(config, f"data.{key}", low=1)
    for key in ("worker_count", "prefetch_buffer_size"):
        if key in d:
            _num(config, f"data.{key}", low=0)
    if "read_threads" in d:
        _num(config, "data.read_threads", low=1)
    if d.get("image_size") is not None:
        _num(config, "data.image_size", low=1)
    if d.get("hd_grid") is not None:
        _num(config, "data.hd_grid", low=0)
    _check_pixels(config)
    from mmlm.data.pipeline import frame_buckets, length_buckets, pixels_on_device
    from mmlm.data.templates import TEMPLATES

    for check in (length_buckets, frame_buckets, pixels_on_device):
        check(d)  # a UserError naming the key

    if d.template not in TEMPLATES:
        raise ConfigError(f"config.data.template={d.template!r} is not a template; choose one of {list(TEMPLATES)}")
    if b % process_count:
        raise ConfigError(f"config.data.batch_size={b} must be a multiple of the number of processes "
                          f"({process_count})")
    if "train" in config:
        k = int(config.train.grad_accum_steps)
        if b % k:
            raise ConfigError(f"config.data.batch_size={b} must be a multiple of config.train.grad_accum_steps={k}")
        if sizes is not None:
            dp = sizes["data"] * sizes["fsdp"]
            if (b // k) % dp:
                raise ConfigError(
                    f"the micro-batch {b // k} (config.data.batch_size / config.train.grad_accum_steps) must be "
                    f"a multiple of the data-parallel size {dp} (config.mesh.data x config.mesh.fsdp = "
                    f"{sizes['data']} x {sizes['fsdp']}); change the batch size or the mesh")
