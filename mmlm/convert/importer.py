"""HF CLIP / HF LLaMA / LLaVA-Mini release checkpoints -> an mmlm model checkpoint.

Flow: map config.json to an mmlm config; enumerate the HF names that config
implies (`mapping`), and the exact parameter shapes the mmlm model expects
(`jax.eval_shape` of its init, nothing allocated); classify every source
tensor as mapped, skipped by design (counted, reported) or unknown (error);
then copy tensor by tensor into preallocated leaves (scanned layers fill
slices of one stacked array) and write with
`mmlm.checkpoint.save_model_low_memory`. Peak memory is one copy of the
weights plus one tensor.

Written checkpoints are partial for hf-clip (`params["vision"]`) and
hf-llama (`params["llm"]`); the trainer's `--init_from` merges a partial
checkpoint into a fresh initialisation of the rest.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from mmlm import checkpoint, config_defaults
from mmlm.config_utils import load_config_file
from mmlm.convert import hf_clip, hf_llama, llava_mini, mapping
from mmlm.convert.io import CheckpointReader, dtype_name, np_dtype, read_hf_config
from mmlm.convert.mapping import Path, Target
from mmlm.errors import UserError
from mmlm.models.config import ModelConfig, model_config_from_dict
from mmlm.models.positions import sincos_2d
from mmlm.safe_io import DirectoryReplacement

KINDS = ("hf-clip", "hf-llama", "llava-mini")
POS_EMBED_ATOL = 1e-2  # the release stores the fixed sin-cos table in the model dtype (bf16: ~4e-3 rounding)


@dataclasses.dataclass
class Source:
    """One checkpoint directory and the HF names it is expected to provide."""

    reader: CheckpointReader
    names: dict[str, Target]
    skip: Callable[[str], str | None]  # reason a name is skipped by design, None if it should be mapped
    label: str


@dataclasses.dataclass
class ImportReport:
    dst: str
    kind: str
    parts: tuple[str, ...]
    converted: int = 0
    bytes: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    ignored_unknown: list[str] = dataclasses.field(default_factory=list)
    param_dtype: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.dst}: {self.converted} tensors ({self.bytes / 2**30:.2f} GiB, {self.param_dtype}) "
                 f"into params {list(self.parts)}"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n} tensor(s): {reason}")
        if self.ignored_unknown:
            lines.append(f"  ignored {len(self.ignored_unknown)} unknown tensor(s) (--ignore_unknown): "
                         f"{self.ignored_unknown[:5]}{' ...' if len(self.ignored_unknown) > 5 else ''}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------- expected tree

def expected_leaves(cfg: ModelConfig, parts: tuple[str, ...]) -> dict[Path, jax.ShapeDtypeStruct]:
    """Shapes of the parameters of the given parts, from the model's own init (abstract, no memory)."""
    from flax import linen as nn

    from mmlm.models.compressor import make_compressor
    from mmlm.models.llama import LlamaModel
    from mmlm.models.prefusion import PreFusion
    from mmlm.models.projector import Projector
    from mmlm.models.vit import VisionTower

    v, llm = cfg.vision, cfg.llm
    key = jax.random.PRNGKey(0)
    f32 = jnp.float32
    inits = {
        "vision": lambda: VisionTower(v).init(key, jnp.zeros((1, v.image_size, v.image_size, 3), f32)),
        "projector": lambda: Projector(cfg.projector, llm.width).init(key, jnp.zeros((1, v.width), f32)),
        "compressor": lambda: make_compressor(cfg.compressor, f32, f32).init(
            key, jnp.zeros((1, v.num_patches * cfg.hd_grid**2, v.width), f32), cfg.compressor.tokens),
        "prefusion": lambda: PreFusion(llm, cfg.prefusion_layers).init(
            key, jnp.zeros((1, 1, llm.width), f32), jnp.zeros((1, 1, llm.width), f32), jnp.ones((1, 1), bool)),
        "llm": lambda: LlamaModel(llm).init(key, jnp.zeros((1, 1), jnp.int32), method=LlamaModel.forward_tokens),
    }
    out = {}
    for part in parts:
        tree = nn.unbox(jax.eval_shape(inits[part]))["params"]
        out.update(mapping.flatten(tree, (part,)))
    return out


# ------------------------------------------------------------------------ filling

class ParamFiller:
    """Preallocated numpy leaves filled tensor by tensor, with shape checks and a completeness check."""

    def __init__(self, expected: dict[Path, Any], dtype: str):
        self.expected = expected
        self.dtype = dtype  # "keep" or a dtype name
        self.leaves: dict[Path, np.ndarray] = {}
        self.filled: dict[Path, set[int | None]] = collections.defaultdict(set)

    def put(self, target: Target, array: np.ndarray, source_name: str) -> None:
        exp = self.expected[target.path]
        value = mapping.to_mmlm(array, target.op)
        want = tuple(exp.shape[1:]) if target.layer is not None else tuple(exp.shape)
        if tuple(value.shape) != want:
            raise ValueError(
                f"{source_name}: shape {tuple(array.shape)} does not fit mmlm parameter "
                f"{mapping.path_str(target.path)} (expects {mapping.hf_shape(want, target.op)} in the HF "
                "layout); the checkpoint and its config.json disagree")
        if target.path not in self.leaves:
            dtype = array.dtype if self.dtype == "keep" else np_dtype(self.dtype)
            self.leaves[target.path] = (np.empty(exp.shape, dtype) if target.layer is not None
                                        else np.array(value, dtype=dtype, copy=True))
        if target.layer is not None:
            self.leaves[target.path][target.layer] = value  # casts if the dtypes differ
        self.filled[target.path].add(target.layer)

    def tree(self) -> dict:
        """The filled nested params; errors if any leaf or any layer of a stacked leaf was not written."""
        missing = sorted(mapping.path_str(p) for p in self.expected if p not in self.leaves)
        if missing:
            raise ValueError(f"no source tensor for mmlm parameter(s) {missing}")
        for path, layers in self.filled.items():
            if None not in layers and layers != set(range(self.expected[path].shape[0])):
                raise ValueError(f"{mapping.path_str(path)}: only layers {sorted(layers)} of "
                                 f"{self.expected[path].shape[0]} were in the checkpoint")
        return mapping.unflatten(self.leaves)


# ------------------------------------------------------------------------ configs

def _base_model(base_config: str | None) -> ml_collections.ConfigDict:
    if base_config:
        return load_config_file(base_config).model
    return config_defaults.model_config(vision=config_defaults.vision_clip_vit_l14_336(),
                                        llm=config_defaults.llm_vicuna7b())


def _replace(model: ml_collections.ConfigDict, vision: ml_collections.ConfigDict | None = None,
             llm: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A copy of `model` with its vision / llm sections replaced (image_size kept consistent)."""
    d = model.to_dict()
    v = dict(vision.to_dict() if vision is not None else d["vision"])
    new = config_defaults.model_config(vision=ml_collections.ConfigDict(v),
                                       llm=llm if llm is not None else ml_collections.ConfigDict(d["llm"]),
                                       mode=d["mode"], tokens=d["compressor"]["tokens"],
                                       prefusion_layers=d["prefusion_layers"],
                                       budgets=tuple(d["compressor"]["budgets"]))
    for k in ("hd_grid", "projector", "image_token_id", "dtype", "param_dtype", "scan_layers", "remat_policy"):
        new[k] = d[k]
    new.compressor.update(d["compressor"])
    return new


def find_vision_dir(src: str, hf: dict[str, Any], vision: str | None) -> str | None:
    """Where the CLIP tower of a release checkpoint lives, if anywhere on disk."""
    if vision:
        return vision
    candidates = [os.path.join(src, "vision_tower")]
    tower = hf.get("mm_vision_tower")
    if isinstance(tower, str):
        candidates.append(tower if os.path.isabs(tower) else os.path.join(src, tower))
    for c in candidates:
        if os.path.isfile(os.path.join(c, "config.json")):
            return c
    return None


# ------------------------------------------------------------------------- import

def import_checkpoint(kind: str, src: str, dst: str, *, vision: str | None = None, dtype: str = "keep",
                      select_layer: int = -2, base_config: str | None = None, ignore_unknown: bool = False,
                      hd_grid: int | None = None, overwrite: bool = False, progress: bool = True,
                      allow_nonfinite: bool = False, log: Callable[[str], None] = print) -> ImportReport:
    """Converts `src` (an HF directory of the given kind) into the mmlm checkpoint `dst`.

    A non-empty `dst` needs `overwrite` and must hold an earlier mmlm checkpoint
    (`check_import_destination`); the new one replaces it only once complete.
    Tensors holding NaN or inf are named and refused (nothing is written) unless `allow_nonfinite`,
    which writes them and lists them in the report's notes.

    `hd_grid` (llava-mini only) states the HD grid of a release whose
    config.json lacks `resolution_ratio` (see `llava_mini.model_config_from_release`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r}; choose from {KINDS}")
    check_import_destination(dst, overwrite)
    hf = read_hf_config(src)
    where = os.path.join(src, "config.json")
    reader = CheckpointReader(src)
    base = _base_model(base_config)
    source_meta: dict[str, Any] = {"format": kind, "path": os.path.abspath(src)}
    notes: list[str] = []

    if kind == "hf-clip":
        vcfg = hf_clip.vision_config_from_hf(hf, select_layer, where)
        model = _replace(base, vision=vcfg)
        cfg = model_config_from_dict(model)
        prefix = mapping.clip_prefix(reader.names())
        if prefix is None:
            raise ValueError(f"{src}: no CLIP vision weights found (looked for "
                             f"{[p + mapping.CLIP_PROBE for p in mapping.CLIP_PREFIXES]})")
        blocks = cfg.vision.blocks_used
        sources = [Source(reader, mapping.clip_map(prefix, blocks),
                          lambda n, p=prefix: mapping.clip_skip_reason(n, p, blocks), "CLIP")]
        parts = ("vision",)
        source_meta["projection_dim"] = hf_clip.vision_section(hf).get("projection_dim")
    elif kind == "hf-llama":
        llm = hf_llama.llm_config_from_hf(hf, where)
        model = _replace(base, llm=llm)
        cfg = model_config_from_dict(model)
        tie = cfg.llm.tie_embeddings
        sources = [Source(reader, mapping.llama_map(cfg.llm.layers, tie),
                          lambda n: mapping.llama_skip_reason(n, tie), "LLaMA")]
        parts = ("llm",)
        source_meta["hf"] = {k: hf.get(k) for k in hf_llama.HF_PASSTHROUGH}
    else:
        sources, parts, model, cfg = _llava_mini_sources(src, hf, reader, vision, where, base, notes, source_meta,
                                                         hd_grid)

    expected = expected_leaves(cfg, parts)
    names: dict[str, tuple[Source, Target]] = {}
    for s in sources:
        for n, t in s.names.items():
            names[n] = (s, t)
    _check_coverage(expected, [t for _, t in names.values()])

    report = ImportReport(dst=os.path.abspath(dst), kind=kind, parts=parts, notes=notes)
    unknown: list[str] = []
    for s in sources:
        for n in s.reader.names():
            if n in s.names:
                continue
            reason = s.skip(n)
            if reason is None:
                unknown.append(n)
            else:
                report.skipped[reason] = report.skipped.get(reason, 0) + 1
    if unknown and not ignore_unknown:
        raise ValueError(
            f"{len(unknown)} tensor(s) in the source have no mmlm counterpart: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}. Check --from (is this a {kind} checkpoint?), or pass "
            "--ignore_unknown to drop them")
    report.ignored_unknown = unknown
    missing = [n for n, (s, _) in names.items() if n not in s.reader]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) the config implies are missing from the checkpoint: "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")

    for reader_ in dict.fromkeys(s.reader for s in sources):
        log(reader_.describe())
    filler = ParamFiller(expected, dtype)
    todo = [(s, n) for s in sources for n in s.reader.names() if n in s.names]
    bar = tqdm(todo, desc=f"convert {kind}", unit="tensor", disable=not progress)
    nonfinite: list[str] = []
    for s, n in bar:
        array = s.reader.get(n)
        bad = nonfinite_count(array)
        if bad:
            nonfinite.append(f"{n} ({bad} of {array.size} values)")
        filler.put(s.names[n], array, n)
        report.converted += 1
    for s in sources:
        s.reader.release()
    if nonfinite:
        listed = "; ".join(nonfinite[:10]) + (f"; ... {len(nonfinite) - 10} more" if len(nonfinite) > 10 else "")
        if not allow_nonfinite:
            raise ValueError(f"{len(nonfinite)} tensor(s) of {src} hold NaN or inf: {listed}. The model would "
                             "answer with NaN; re-download the checkpoint, or pass --allow_nonfinite to convert "
                             "it as it is")
        notes.append(f"written with NaN/inf (--allow_nonfinite): {listed}")
    params = filler.tree()
    del filler

    leaves = jax.tree.leaves(params)
    report.bytes = sum(x.nbytes for x in leaves)
    by_dtype = collections.Counter()
    for x in leaves:
        by_dtype[dtype_name(x.dtype)] += x.nbytes
    report.param_dtype = by_dtype.most_common(1)[0][0]
    model.param_dtype = report.param_dtype
    model.dtype = "float32" if report.param_dtype == "float32" else "bfloat16"
    model.scan_layers = True  # the written tree has stacked `layers`
    config = config_defaults.base_config(model)
    config.source = ml_collections.ConfigDict(source_meta)
    tokenizer_files = _tokenizer_files(src) if "llm" in parts else []
    if tokenizer_files:
        # `mmlm chat/eval --checkpoint DST` then find the tokenizer; the template is a guess (LLaMA-3
        # vocabularies are >= 128k tokens), overridable with --template.
        config.data = ml_collections.ConfigDict(dict(
            tokenizer=os.path.abspath(dst),
            template="llama_3_1" if cfg.llm.vocab_size >= 128000 else "vicuna_v1"))
        notes.append(f"copied {tokenizer_files} into {dst}; config.data.template={config.data.template!r}")
    model_config_from_dict(config.model)  # the written config must rebuild the model
    log(f"writing {report.bytes / 2**30:.2f} GiB to {report.dst} ...")
    # Written beside `dst` and swapped in when complete: an earlier checkpoint there survives an interruption.
    with DirectoryReplacement(dst, log=log) as staging:
        for f in tokenizer_files:
            shutil.copy2(os.path.join(src, f), os.path.join(staging, f))
        checkpoint.save_model_low_memory(staging, params, config)
    return report


def nonfinite_count(array: np.ndarray) -> int:
    """How many values of a floating-point array are NaN or +-inf (0 for integer arrays)."""
    if array.dtype.kind in "biu":  # bool and integers; floats are "f", ml_dtypes' bfloat16 and fp8 "V"
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_import_destination(dst: str, overwrite: bool) -> None:
    """Refuses a `dst` an import must not replace: not empty without `overwrite`, or holding anything but an
    mmlm checkpoint (another model's files, a training workdir, ...) even with it."""
    if not os.path.exists(dst):
        return
    if not os.path.isdir(dst):
        raise UserError(f"--dst {dst!r} exists and is not a directory; choose a directory path")
    entries = sorted(os.listdir(dst))
    if not entries:
        return
    if not overwrite:
        raise UserError(f"--dst {dst!r} is not empty; choose another directory or pass --overwrite")
    ours = {checkpoint.CONFIG_FILE, checkpoint.PARAMS_DIR, *TOKENIZER_FILES}
    foreign = [e for e in entries if e not in ours]
    if foreign or not checkpoint.is_model_checkpoint(dst):
        shown = foreign[:5] or entries[:5]
        raise UserError(
            f"--dst {dst!r} is not an mmlm model checkpoint: it holds {shown}{' ...' if len(foreign) > 5 else ''}"
            ", which an import does not write. --overwrite only replaces an earlier conversion; choose an empty "
            "or new --dst")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_files(src: str) -> list[str]:
    """The source's tokenizer files, copied next to the converted weights (none without a tokenizer model)."""
    if not any(os.path.isfile(os.path.join(src, f)) for f in TOKENIZER_FILES[:2]):
        return []
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]


def _check_coverage(expected: dict[Path, Any], targets: list[Target]) -> None:
    """Internal consistency: the name maps cover exactly the leaves the model has."""
    mapped = {t.path for t in targets}
    if mapped != set(expected):
        extra = sorted(mapping.path_str(p) for p in mapped - set(expected))
        lacking = sorted(mapping.path_str(p) for p in set(expected) - mapped)
        raise AssertionError(f"mmlm.convert name maps out of sync with the model: maps {extra} that the model "
                             f"lacks, and lacks {lacking}")


def _llava_mini_sources(src, hf, reader, vision, where, base, notes, source_meta, hd_grid=None):
    names = reader.names()
    # A tower inside the release is used unless --vision names one explicitly.
    in_ckpt = mapping.clip_prefix(names) == mapping.CLIP_PREFIXES[0] and not vision
    vision_dir = None if in_ckpt else find_vision_dir(src, hf, vision)
    tower = hf.get("mm_vision_tower", llava_mini.DEFAULT_VISION_TOWER)
    source_meta["mm_vision_tower"] = tower
    source_meta["hf"] = {k: hf.get(k) for k in hf_llama.HF_PASSTHROUGH}
    select = int(hf.get("mm_vision_select_layer", -2))
    if vision_dir is not None:
        vision_hf = read_hf_config(vision_dir)
        vcfg = hf_clip.vision_config_from_hf(vision_hf, select, os.path.join(vision_dir, "config.json"))
        source_meta["vision_path"] = os.path.abspath(vision_dir)
        source_meta["projection_dim"] = hf_clip.vision_section(vision_hf).get("projection_dim")
    elif in_ckpt:
        # The tower's own config is not in the release; the release names its CLIP model.
        vcfg = ml_collections.ConfigDict(base.vision.to_dict())
        notes.append(f"vision tower read from the checkpoint; its shape is assumed to be {tower} "
                     "(CLIP ViT-L/14-336 unless --base_config says otherwise)")
    else:
        vcfg = ml_collections.ConfigDict(base.vision.to_dict())
        if hf.get("mm_hidden_size"):
            vcfg.width = int(hf["mm_hidden_size"])
        notes.append(f"no vision tower: the checkpoint does not contain it and no CLIP directory was found "
                     f"({tower!r}); params['vision'] is not written. Re-run with --vision CLIP_DIR, or convert the "
                     "tower with `mmlm convert --from hf-clip` and let --init_from merge it")
    model = llava_mini.model_config_from_release(hf, vcfg, where, hd_grid=hd_grid,
                                                 query_rows=_query_rows(reader))
    stored_err = _stored_table_differs(reader, model_config_from_dict(model))
    if stored_err is not None:
        model.compressor.stored_position_table = True
        notes.append(f"{mapping.COMPRESSOR_POS_EMBED} differs from the sin-cos table by up to {stored_err:.3g}: "
                     "the stored table is used (model.compressor.stored_position_table), as the authors' code "
                     "reads it from the checkpoint")
    if hd_grid is not None and not hf.get("resolution_ratio"):
        source_meta["hd_grid"] = hd_grid
        notes.append(f"HD grid {hd_grid} from --hd_grid (config.json has no resolution_ratio)")
    for k in ("scan_layers", "remat_policy", "image_token_id"):
        model[k] = base[k]
    cfg = model_config_from_dict(model)
    tie = cfg.llm.tie_embeddings
    main_names = mapping.llama_map(cfg.llm.layers, tie)
    main_names.update(mapping.projector_map(_depth(cfg.projector)))
    main_names.update(mapping.compressor_map(cfg.compressor.stored_position_table))
    if cfg.prefusion_layers:
        main_names.update(mapping.prefusion_map(cfg.prefusion_layers))
    blocks = cfg.vision.blocks_used
    clip_in = mapping.CLIP_PREFIXES[0]

    def skip_main(n: str) -> str | None:
        if n == mapping.COMPRESSOR_POS_EMBED:
            return "fixed compressor sin-cos table (checked, recomputed by mmlm)"
        if in_ckpt and n.startswith(clip_in):
            return mapping.clip_skip_reason(n, clip_in, blocks)
        if n.startswith("model.vision_tower."):
            return "vision tower (imported from --vision)" if vision_dir else "vision tower (not imported)"
        return mapping.llama_skip_reason(n, tie)

    parts = ["llm", "projector", "compressor"] + (["prefusion"] if cfg.prefusion_layers else [])
    if in_ckpt:
        main_names.update(mapping.clip_map(clip_in, blocks))
        parts.insert(0, "vision")
    sources = [Source(reader, main_names, skip_main, "LLaVA-Mini")]
    if vision_dir is not None:
        vreader = CheckpointReader(vision_dir)
        prefix = mapping.clip_prefix(vreader.names())
        if prefix is None:
            raise ValueError(f"{vision_dir}: no CLIP vision weights found")
        sources.append(Source(vreader, mapping.clip_map(prefix, blocks),
                              lambda n, p=prefix: mapping.clip_skip_reason(n, p, blocks), "CLIP"))
        parts.insert(0, "vision")
    return sources, tuple(parts), model, cfg


def _query_rows(reader: CheckpointReader) -> int | None:
    """Number of compressor queries stored in the checkpoint (C^2), if it has the release compressor."""
    info = reader.infos.get("model.compressor.query")
    return int(info.shape[0]) if info is not None and info.shape else None


def _depth(projector: str) -> int:
    from mmlm.models.projector import projector_depth

    return projector_depth(projector)


def _stored_table_differs(reader: CheckpointReader, cfg: ModelConfig) -> float | None:
    """The release stores its fixed query position table, which the authors' code reads back.

    Returns None when it equals the sin-cos table mmlm recomputes up to the
    rounding of the checkpoint dtype (mmlm then recomputes it), else the
    largest difference (the stored table is then used). A table of another
    shape is not the LLaVA-Mini Resampler's: an error.
    """
    if mapping.COMPRESSOR_POS_EMBED not in reader:
        return None
    info = reader.infos[mapping.COMPRESSOR_POS_EMBED]
    want = sincos_2d(cfg.vision.width, cfg.compressor.grid)
    if tuple(info.shape) != want.shape:
        raise ValueError(f"{mapping.COMPRESSOR_POS_EMBED} has shape {tuple(info.shape)}, the compressor's "
                         f"C x C grid needs {want.shape}; this checkpoint's compressor is not the LLaVA-Mini Resampler")
    err = float(np.abs(reader.get(mapping.COMPRESSOR_POS_EMBED).astype(np.float32) - want).max())
    return None if err <= POS_EMBED_ATOL else err
