"""Typed `config.train` / `config.optim` sections, and the check of a whole config before a run.

The ConfigDict stays the user's format (config files, `--config.a.b=value`
overrides, a workdir's config.json); each section's owner turns it into a
frozen dataclass and checks it: `ModelConfig.from_config`
(`mmlm.models.config`), `MeshConfig.from_config` (`mmlm.sharding`),
`DataConfig.from_config` (`mmlm.data.config`), `EvalConfig.from_config`
(`mmlm.eval.config`), and `TrainConfig` / `OptimConfig` here. Defaults, with
the meaning and units of every knob, stay where the ConfigDicts are built
(`mmlm.config_defaults`, `mmlm.data.config.default_data_config`): a field a
section lacks (a config saved before it existed) takes that default.

`validate_config` builds every section a config has and checks what spans
sections (budgets against the model, the batch against the mesh), returning
the typed sections as a `RunConfig`. It lives here because training is the
level that reads all of them; nothing below imports it.
"""

from __future__ import annotations

import dataclasses
import ml_collections

from mmlm import config_defaults
from mmlm.config_utils import MAX_SEED, ConfigError, check_number, section_with_defaults, typed_fields
from mmlm.data.config import DataConfig, check_synthetic_section
from mmlm.eval.config import EvalConfig
from mmlm.models.config import PARTS, ModelConfig
from mmlm.sharding import MeshConfig

SCHEDULES = ("cosine", "linear", "wsd", "constant")
MATRYOSHKA_LOSSES = ("sample", "all", "distill", "largest")  # train.matryoshka_loss (mmlm.train.recipe)


@dataclasses.dataclass(frozen=True)
class VisionPretrainConfig:
    """The typed `config.train.vision_pretrain` (`config_defaults.vision_pretrain_config`; steps 0 = off)."""

    steps: int
    batch_size: int
    learning_rate: float
    num_images: int
    eval_images: int
    position_weight: float

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict, *, synthetic_kind: str = "") -> "VisionPretrainConfig":
        """Ranges, and (when it runs) a synthetic still-image dataset (`synthetic_kind`) for its labels."""
        vp = section_with_defaults(section, config_defaults.vision_pretrain_config())
        w = "config.train.vision_pretrain"
        check_number(vp, "steps", where=w, low=0, hint="0 turns ViT pretraining off")
        for key in ("batch_size", "num_images", "eval_images"):
            check_number(vp, key, where=w, low=1)
        check_number(vp, "learning_rate", where=w, kind=float, low=0, low_open=True)
        check_number(vp, "position_weight", where=w, kind=float, low=0, hint="0 turns the position heads off")
        if int(vp.steps):
            from mmlm.data.synth import IMAGE_KINDS

            if synthetic_kind not in IMAGE_KINDS:
                raise ConfigError(
                    f"config.train.vision_pretrain.steps={int(vp.steps)} needs per-patch labels from a synthetic "
                    f"still-image dataset (config.synthetic.kind one of {IMAGE_KINDS}), got "
                    f"synthetic.kind={synthetic_kind!r}; set --config.train.vision_pretrain.steps=0 for other data")
        return cls(**typed_fields(cls, vp))


def check_vision_pretrain(config: ml_collections.ConfigDict) -> VisionPretrainConfig:
    """`config.train.vision_pretrain` of a whole config (its synthetic dataset is `config.synthetic`)."""
    return VisionPretrainConfig.from_config(config.train.vision_pretrain,
                                            synthetic_kind=config.get("synthetic", {}).get("kind", ""))


def _budgets(model: ModelConfig | None) -> list[int]:
    """The Matryoshka budgets a model trains (smallest first); [] when it has none."""
    if model is None or model.mode != "llava_mini" or not model.compressor.matryoshka:
        return []
    return sorted(set(int(b) for b in model.compressor.budgets))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The typed `config.train` (`config_defaults.train_config`: meanings and units of every field)."""

    steps: int
    epochs: float
    grad_accum_steps: int
    matryoshka_loss: str
    matryoshka_probs: tuple[float, ...]
    matryoshka_weights: tuple[float, ...]
    distill_weight: float
    trainable: tuple[str, ...]
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    init_from: str
    init_prefusion_from_llm: bool
    peak_tflops_per_device: float
    progress_bar: bool
    vision_pretrain: VisionPretrainConfig

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict, *, model: ModelConfig | None = None,
                    synthetic_kind: str = "") -> "TrainConfig":
        """Checks `config.train`; `model` (the typed model section) for the Matryoshka recipe's budgets."""
        t = section_with_defaults(section, config_defaults.train_config())
        w = "config.train"
        check_number(t, "steps", where=w, low=1, allow=(-1,), hint="-1 means train.epochs passes over the data")
        if int(t.steps) == -1:
            check_number(t, "epochs", where=w, kind=float, low=0, low_open=True)
        for key in ("grad_accum_steps", "checkpoint_every", "log_every"):
            check_number(t, key, where=w, low=1)
        check_number(t, "keep_checkpoints", where=w, low=0, hint="0 keeps every checkpoint")
        if t.matryoshka_loss not in MATRYOSHKA_LOSSES:
            raise ConfigError(f"config.train.matryoshka_loss={t.matryoshka_loss!r}: choose "
                              f"{' or '.join(repr(k) for k in MATRYOSHKA_LOSSES)} (one budget drawn per step, "
                              "every budget each step, a drawn budget taught by the largest, or the largest plus a "
                              "drawn one)")
        _check_matryoshka_recipe(t, model)
        trainable = t.trainable
        if isinstance(trainable, str) or not isinstance(trainable, (tuple, list)):
            raise ConfigError(f"config.train.trainable must be a tuple of parts such as {PARTS[1:]}, "
                              f"got {trainable!r}")
        unknown = sorted(set(trainable) - set(PARTS))
        if unknown or not trainable:
            raise ConfigError(f"config.train.trainable={tuple(trainable)!r}: "
                              + (f"unknown part(s) {unknown}; " if unknown else "nothing to train; ")
                              + f"parts are {list(PARTS)}")
        vp = VisionPretrainConfig.from_config(t.vision_pretrain, synthetic_kind=synthetic_kind)
        fields = typed_fields(cls, t)
        fields.update(vision_pretrain=vp, trainable=tuple(trainable),
                      matryoshka_probs=tuple(float(v) for v in t.matryoshka_probs or ()),
                      matryoshka_weights=tuple(float(v) for v in t.matryoshka_weights or ()))
        return cls(**fields)


def _check_matryoshka_recipe(t: ml_collections.ConfigDict, model: ModelConfig | None) -> None:
    """train.matryoshka_probs / matryoshka_weights (one non-negative number per budget, not all 0) and
    train.distill_weight (>= 0)."""
    budgets = _budgets(model)
    for key in ("matryoshka_probs", "matryoshka_weights"):
        values = tuple(t.get(key, ()) or ())
        if not values:
            continue
        if len(values) != len(budgets) or any(float(v) < 0 for v in values) or not sum(float(v) for v in values) > 0:
            raise ConfigError(f"config.train.{key}={values!r}: give one non-negative number per Matryoshka budget "
                              f"{budgets} (smallest first, not all 0), or () for "
                              f"{'uniform draws' if key == 'matryoshka_probs' else 'the plain mean'}")
    weights = tuple(t.get("matryoshka_weights", ()) or ())
    if t.matryoshka_loss == "largest" and weights and not float(weights[-1]) > 0:
        raise ConfigError(f"config.train.matryoshka_weights={weights!r}: with matryoshka_loss='largest' the largest "
                          "budget (the last weight) trains on every step and needs a weight > 0")
    if float(t.distill_weight) < 0:
        raise ConfigError(f"config.train.distill_weight={t.distill_weight!r}: must be >= 0")
    if t.matryoshka_loss == "distill" and model is not None and model.loss_positions > 0:
        raise ConfigError("config.train.matryoshka_loss='distill' needs the logits of every position: set "
                          "config.model.loss_positions=0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The typed `config.optim` (`config_defaults.optim_config`: meanings and units of every field)."""

    learning_rate: dict[str, float]  # peak LR per part (PARTS); a dict, so compared but not hashed
    schedule: str
    warmup_ratio: float
    decay_ratio: float
    end_lr_ratio: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict) -> "OptimConfig":
        """Checks `config.optim`: the schedule's name, non-negative rates, ratios in range."""
        o = section_with_defaults(section, config_defaults.optim_config())
        w = "config.optim"
        if o.schedule not in SCHEDULES:
            raise ConfigError(f"config.optim.schedule={o.schedule!r} is not a schedule; choose one of "
                              f"{list(SCHEDULES)}")
        for part in o.learning_rate.keys():
            check_number(o, f"learning_rate.{part}", where=w, kind=float, low=0,
                         hint="a learning rate cannot be negative")
        check_number(o, "warmup_ratio", where=w, kind=float, low=0, high=1)
        check_number(o, "end_lr_ratio", where=w, kind=float, low=0)
        if o.schedule == "wsd":
            check_number(o, "decay_ratio", where=w, kind=float, low=0, high=1, low_open=True)
        for key in ("b1", "b2"):
            check_number(o, key, where=w, kind=float, low=0, high=1)
        check_number(o, "eps", where=w, kind=float, low=0, low_open=True)
        check_number(o, "weight_decay", where=w, kind=float, low=0)
        check_number(o, "grad_clip_norm", where=w, kind=float, low=0, hint="0 means no clipping")
        fields = typed_fields(cls, o)
        fields["learning_rate"] = {k: float(v) for k, v in o.learning_rate.items()}
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The typed sections of a checked config; a section the config lacks is None (e.g. `mmlm summary` of a
    model-only config)."""

    model: ModelConfig
    mesh: MeshConfig | None = None
    mesh_shape: dict[str, int] | None = None  # mesh axis sizes on the devices validate_config was given
    data: DataConfig | None = None
    train: TrainConfig | None = None
    optim: OptimConfig | None = None
    eval: EvalConfig | None = None
    seed: int | None = None


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    process_count: int = 1) -> RunConfig:
    """Checks a whole config before anything is built: types, ranges, divisibility; returns its typed sections.

    Sections that a config lacks (e.g. `train` in a model-only config read by
    `mmlm summary`) are skipped. With `num_devices` the mesh must multiply to
    it and the batch must split over its data-parallel axes. Raises
    `ConfigError` (a `UserError`) naming the key, the value and what is
    expected.
    """
    if "model" not in config:
        raise ConfigError("the config has no 'model' section")
    model = ModelConfig.from_config(config.model)
    if "text_len" in config:
        check_number(config, "text_len", where="config", low=1)
    mesh = MeshConfig.from_config(config.mesh) if config.get("mesh") is not None else None
    sizes = mesh.shape(num_devices) if mesh is not None and num_devices is not None else None
    seed = check_number(config, "seed", where="config", low=0, high=MAX_SEED) if "seed" in config else None
    synthetic = config.get("synthetic")
    if synthetic is not None and synthetic.get("kind"):
        check_synthetic_section(synthetic)
        if "data" in config and "train" in config:
            n, b = int(synthetic.num_train), int(config.data.batch_size)
            if n < b:
                raise ConfigError(f"config.synthetic.num_train={n} is fewer than one batch "
                                  f"(config.data.batch_size={b}); raise num_train or lower the batch size")
    kind = synthetic.get("kind", "") if synthetic is not None else ""
    train = TrainConfig.from_config(config.train, model=model, synthetic_kind=kind) if "train" in config else None
    optim = OptimConfig.from_config(config.optim) if "optim" in config else None
    ev = EvalConfig.from_config(config.eval, model=model) if "eval" in config else None
    data = None
    if "data" in config:
        data = DataConfig.from_config(config.data)
        _check_pixels_match(config)
        _check_batch_split(data, train, sizes, process_count)
    return RunConfig(model=model, mesh=mesh, mesh_shape=sizes, data=data, train=train, optim=optim, eval=ev,
                     seed=seed)


def _check_pixels_match(config: ml_collections.ConfigDict) -> None:
    """data.image_mean / image_std equal model.image_mean / image_std.

    The pipeline normalises float images with the data's constants and the model uint8 images with its own:
    different constants would feed the model differently scaled pixels depending on data.pixels_on_device.
    """
    d = config.data
    if "image_mean" not in d or "image_std" not in d:
        return
    for key in ("image_mean", "image_std"):
        model_value = config.model.get(key)
        if model_value is not None and tuple(map(float, d[key])) != tuple(map(float, model_value)):
            raise ConfigError(f"config.data.{key}={tuple(d[key])} differs from config.model.{key}="
                              f"{tuple(model_value)}: the model normalises uint8 pixels with its own constants; "
                              f"set both to the same values (--config.model.{key}=... sets data.{key} too in "
                              "configs built by mmlm.config_defaults)")


def _check_batch_split(data: DataConfig, train: TrainConfig | None, sizes: dict[str, int] | None,
                       process_count: int) -> None:
    """The global batch splits over processes, gradient-accumulation micro-batches and data-parallel devices."""
    b = data.batch_size
    if b % process_count:
        raise ConfigError(f"config.data.batch_size={b} must be a multiple of the number of processes "
                          f"({process_count})")
    if train is None:
        return
    k = train.grad_accum_steps
    if b % k:
        raise ConfigError(f"config.data.batch_size={b} must be a multiple of config.train.grad_accum_steps={k}")
    if sizes is not None:
        dp = sizes["data"] * sizes["fsdp"]
        if (b // k) % dp:
            raise ConfigError(
                f"the micro-batch {b // k} (config.data.batch_size / config.train.grad_accum_steps) must be "
                f"a multiple of the data-parallel size {dp} (config.mesh.data x config.mesh.fsdp = "
                f"{sizes['data']} x {sizes['fsdp']}); change the batch size or the mesh")

