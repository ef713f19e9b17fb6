"""Typed, hashable model configs built from the `config.model` ConfigDict.

Flax modules take these frozen dataclasses (not ConfigDicts) so they can be
hashed by `nn.scan`/`jax.jit` and read without string lookups. Field meanings
are documented where the ConfigDict is built (`mmlm/config_defaults.py`,
`model_config` and the sections it assembles). `ModelConfig.from_config`
validates the section (types, ranges, divisibility) with messages naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import ml_collections

from mmlm import IMAGE_TOKEN_ID
from mmlm.config_utils import ConfigError, check_number
from mmlm.pixels import CLIP_MEAN, CLIP_STD, check_mean_std

MODES = ("llava_mini", "llava15")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")  # see mmlm.kernels.attention
# Top-level parameter groups of a model (the keys of its params tree); llava15 has no compressor/prefusion.
PARTS = ("vision", "projector", "compressor", "prefusion", "llm")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
POSITION_INITS = ("normal", "sincos2d")  # VisionConfig.position_init


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP-style ViT."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24  # depth of the full (checkpoint) tower
    heads: int = 16
    mlp_dim: int = 4096
    select_layer: int = -2  # HF hidden_states index whose output is used
    layer_norm_eps: float = 1e-5
    # Initial value of the learned position embeddings: "normal" (CLIP: std 0.02) or "sincos2d" (a 2-D
    # sin-cos table, as big_vision's ViTs trained from scratch use; the parameter still trains).
    position_init: str = "normal"

    def __post_init__(self):
        if self.position_init not in POSITION_INITS:
            raise ValueError(f"vision.position_init {self.position_init!r}: choose one of {POSITION_INITS}")
        if self.position_init == "sincos2d" and self.width % 4:
            raise ValueError(f"vision.position_init 'sincos2d' needs vision.width divisible by 4, got {self.width}; "
                             "use position_init='normal' or another width")

    @property
    def grid(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def blocks_used(self) -> int:
        """Blocks actually built: those whose output reaches `select_layer`.

        HF `hidden_states[k]` is the output of block k (0 = embeddings after
        the pre-LayerNorm), so blocks after the selected one and the
        post-LayerNorm never influence the features and are not built.
        """
        k = self.select_layer if self.select_layer >= 0 else self.layers + 1 + self.select_layer
        if not 0 <= k <= self.layers:
            raise ValueError(f"select_layer {self.select_layer} out of range for {self.layers} layers")
        return k


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA-family decoder (also the block config of pre-fusion layers)."""

    vocab_size: int = 32000
    width: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    mlp_dim: int = 11008
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # e.g. (("rope_type","llama3"),("factor",8.0),...)
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)


def is_square(n: int) -> bool:
    """n is a perfect square (a budget that fills a sqrt(n) x sqrt(n) grid)."""
    return n >= 0 and math.isqrt(n) ** 2 == n


NESTINGS = ("prefix", "pool", "offset")  # how a Matryoshka compressor's budgets nest (CompressorConfig.nesting)


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
    kind: str = "query"  # "query" (LLaVA-Mini resampler) or "avgpool" (ablation)
    tokens: int = 1  # C^2, or M (max queries) for Matryoshka
    budgets: tuple[int, ...] = ()  # Matryoshka budgets; empty = off
    heads: int = 8
    ln_eps: float = 1e-5
    impl: str = "auto"  # "auto" | "pallas" | "xla" (cross-attention implementation)
    stored_position_table: bool = False  # position codes from params compressor/pos_embed, not recomputed
    nesting: str = "prefix"  # Matryoshka budgets: "prefix" (the first m queries) | "pool" (all M, pooled to m)
    #                          | "offset" (the first m queries plus a learned offset per trained budget below M)

    def __post_init__(self):
        if self.nesting not in NESTINGS:
            raise ValueError(f"model.compressor.nesting must be one of {NESTINGS}, got {self.nesting!r}")
        if self.nesting != "prefix" and self.matryoshka and self.kind != "query":
            raise ValueError(f"model.compressor.nesting={self.nesting!r} acts on the query compressor's queries; "
                             f"kind={self.kind!r} has none (use nesting='prefix')")
        if self.nesting == "pool" and self.matryoshka:
            bad = [b for b in self.budgets if not is_square(int(b))]
            if bad:
                raise ValueError(f"model.compressor.nesting='pool' needs square budgets (a sqrt(m) x sqrt(m) grid "
                                 f"of pooled queries), got {bad} in budgets {self.budgets}")
        if self.stored_position_table and self.budgets:
            raise ValueError("model.compressor.stored_position_table is the release layout (a fixed C x C table); "
                             "it cannot be combined with Matryoshka budgets")

    @property
    def grid(self) -> int:
        c = int(round(self.tokens**0.5))
        if c * c != self.tokens:
            raise ValueError(f"compressor.tokens must be a perfect square (C^2), got {self.tokens}")
        return c

    @property
    def matryoshka(self) -> bool:
        return len(self.budgets) > 0

    @property
    def pooled(self) -> bool:
        """Budgets are average pools of all M queries' outputs (M3), not prefixes of the queries (MQT)."""
        return self.matryoshka and self.nesting == "pool"

    def offset_rows(self) -> dict[int, int]:
        """nesting="offset": trained budget m < M -> its first row in the offset table (rows m of them)."""
        if not (self.matryoshka and self.nesting == "offset"):
            return {}
        small = sorted({int(b) for b in self.budgets if b < self.tokens})
        return {m: sum(small[:i]) for i, m in enumerate(small)}

    def query_rows(self, m: int) -> int:
        """Queries the compressor computes for a budget of m tokens (M when the budgets are pools)."""
        return self.tokens if self.pooled else m


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    mode: str = "llava_mini"
    image_size: int = 336
    hd_grid: int = 1
    prefusion_layers: int = 4
    projector: str = "mlp2x_gelu"
    image_token_id: int = IMAGE_TOKEN_ID
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    scan_unroll: int = 1  # scanned layers per loop iteration; 0 = all (same parameters, no loop)
    init_std: float = 0.02  # std of every dense kernel at init (HF initializer_range); 0 = lecun normal
    remat_policy: str = "none"
    attention: str = "auto"  # whole-sequence attention: auto (splash on TPU, cuDNN on GPU, XLA on CPU) | xla | splash | cudnn
    loss_chunk: int = 0  # LM head + loss over chunks of this many positions (0 = all at once)
    loss_positions: int = 0  # training loss: LM head on the first this-many supervised positions per row (0 = all)
    # Training semantics of the LLaVA-Mini authors' code (no effect on inference outputs):
    detach_text_embeddings: bool = False  # stop gradients into the input embedding table
    text_only_prefusion: bool = False  # text-only samples: pre-fusion with a zero image, LLM reads fused text
    prefusion_skip_token_id: int = -1  # a token id never fused (the authors': 0); -1 = none
    # uint8 `images` are normalised in the model as (x / 255 - mean) / std (RGB); float images are taken as
    # already normalised with these (the data pipeline's data.image_mean / data.image_std must equal them).
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    vision: VisionConfig = VisionConfig()
    llm: LlamaConfig = LlamaConfig()
    compressor: CompressorConfig = CompressorConfig()

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.mode not in MODES:
            raise ValueError(f"model.mode must be one of {MODES}, got {self.mode!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if not self.init_std >= 0:
            raise ValueError(f"model.init_std must be >= 0 (0 = lecun normal), got {self.init_std}")
        if self.scan_unroll < 0:
            raise ValueError(f"model.scan_unroll must be >= 0 (0 = every layer), got {self.scan_unroll}")
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk must be >= 0 (0 = full logits), got {self.loss_chunk}")
        if self.loss_positions < 0:
            raise ValueError(f"model.loss_positions must be >= 0 (0 = every position), got {self.loss_positions}")
        if self.hd_grid < 1:
            raise ValueError(f"model.hd_grid must be >= 1, got {self.hd_grid}")
        check_mean_std(self.image_mean, self.image_std, "model")
        if self.mode == "llava15" and self.hd_grid > 1:
            raise ValueError("the llava15 baseline has no HD path; set model.hd_grid=1")
        if self.vision.image_size != self.image_size:
            raise ValueError(
                f"model.image_size ({self.image_size}) and model.vision.image_size "
                f"({self.vision.image_size}) disagree")
        for b in self.compressor.budgets:
            if not 1 <= b <= self.compressor.tokens:
                raise ValueError(
                    f"Matryoshka budget {b} is outside 1..{self.compressor.tokens} "
                    "(model.compressor.tokens)")

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict | dict) -> "ModelConfig":
        """The typed `config.model`, checked: a `ConfigError` names the key, the value and what is expected."""
        return check_model_section(section)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def default_budget(self) -> int:
        """Vision tokens per image/frame when the caller does not choose."""
        return self.compressor.tokens

    @property
    def supported_budgets(self) -> tuple[int, ...]:
        if self.mode == "llava15":
            return (self.vision.num_patches,)
        if self.compressor.matryoshka:
            return tuple(sorted(set(self.compressor.budgets) | {self.compressor.tokens}))
        return (self.compressor.tokens,)

    def check_budget(self, m: int | None) -> int:
        """Returns the budget to use, with a clear error for an unsupported one."""
        if self.mode == "llava15":
            n = self.vision.num_patches
            if m not in (None, n):
                raise ValueError(f"the llava15 baseline always uses all {n} vision tokens; got {m}")
            return n
        if m is None:
            return self.default_budget
        if self.compressor.matryoshka:
            if not 1 <= m <= self.compressor.tokens:
                raise ValueError(
                    f"num_vision_tokens={m} is not supported: this Matryoshka model has "
                    f"{self.compressor.tokens} queries (trained budgets {self.compressor.budgets})")
            if (self.compressor.kind == "avgpool" or self.compressor.pooled) and not is_square(m):
                raise ValueError(f"num_vision_tokens={m}: this model pools its compressed tokens to a square grid; "
                                 f"give a square budget (e.g. {', '.join(map(str, self.supported_budgets))})")
            return m
        if m != self.compressor.tokens:
            raise ValueError(
                f"num_vision_tokens={m} is not supported: this model was built for "
                f"{self.compressor.tokens} tokens (model.compressor.tokens) and is not Matryoshka")
        return m


def _plain(value):
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(value)
    return value


def _build(cls, cfg: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
    return cls(**cfg)


def model_config_from_dict(model: ml_collections.ConfigDict | dict) -> ModelConfig:
    """Builds a `ModelConfig` from `config.model`."""
    d = _plain(model) if isinstance(model, ml_collections.ConfigDict) else dict(model)
    d = dict(d)
    vision = _build(VisionConfig, dict(d.pop("vision", {})))
    llm_d = dict(d.pop("llm", {}))
    scaling = llm_d.get("rope_scaling") or {}
    if isinstance(scaling, dict):
        llm_d["rope_scaling"] = tuple(sorted(scaling.items()))
    llm = _build(LlamaConfig, llm_d)
    comp_d = dict(d.pop("compressor", {}))
    comp_d["budgets"] = tuple(int(b) for b in comp_d.get("budgets", ()))
    compressor = _build(CompressorConfig, comp_d)
    for key in ("image_mean", "image_std"):  # JSON lists / ints -> a hashable tuple of floats
        if isinstance(d.get(key), (tuple, list)):
            d[key] = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in d[key])
    return _build(ModelConfig, dict(d, vision=vision, llm=llm, compressor=compressor))


_WHERE = "config.model"
_POSITIVE_FIELDS = ("vision.image_size", "vision.patch_size", "vision.width", "vision.layers", "vision.heads",
                    "vision.mlp_dim", "llm.vocab_size", "llm.width", "llm.layers", "llm.heads", "llm.kv_heads",
                    "llm.head_dim", "llm.mlp_dim", "compressor.tokens", "compressor.heads", "image_size", "hd_grid")
# Zeros that make the forward non-finite: a norm eps of 0 divides a zero (e.g. padding) row by 0, a RoPE base of 0
# gives infinite frequencies.
_NONZERO_FLOAT_FIELDS = ("vision.layer_norm_eps", "llm.rms_eps", "compressor.ln_eps", "llm.rope_theta")


def _check_types(obj: Any, prefix: str) -> None:
    """Each field of the built dataclasses has the type of its default (a bool, an int, a number, a string)."""
    for f in dataclasses.fields(obj):
        value, default = getattr(obj, f.name), f.default
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            _check_types(value, key)
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


def check_model_section(section: ml_collections.ConfigDict | dict) -> ModelConfig:
    """`ModelConfig.from_config`: builds the dataclasses, then checks types, ranges and divisibility."""
    try:
        cfg = model_config_from_dict(section)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None
    _check_types(cfg, "model")
    for key in _POSITIVE_FIELDS:
        check_number(section, key, where=_WHERE, low=1)
    check_number(section, "prefusion_layers", where=_WHERE, low=0)
    for key in _NONZERO_FLOAT_FIELDS:
        check_number(section, key, where=_WHERE, kind=float, low=0, low_open=True,
                     hint="0 makes the model's output NaN")
    check_number(section, "init_std", where=_WHERE, kind=float, low=0, hint="0 means lecun normal")
    for key in ("scan_unroll", "loss_chunk", "loss_positions"):
        check_number(section, key, where=_WHERE, low=0, hint="0 means all")
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
