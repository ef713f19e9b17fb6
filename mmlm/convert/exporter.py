"""An mmlm model checkpoint -> HF layouts that transformers / the LLaVA-Mini release load.

* `params["llm"]` only: a `LlamaForCausalLM` directory.
* LLaVA-Mini (llm + projector + compressor [+ prefusion]): the release layout
  (LLaMA tensors + `model.mm_projector.*`, `model.compressor.*`,
  `model.prefusion_layers.*`, release config.json). As in the release, the
  CLIP tower is not part of it: config.json names the tower
  (`mm_vision_tower`, recorded at import or `--mm_vision_tower`).
* The vision tower (alone, or additionally with `--vision`): a
  `CLIPVisionModel` directory. mmlm builds only the blocks up to the
  selected layer and no post-LayerNorm, so a loadable CLIP directory needs
  the unused last block(s) and post-LayerNorm: they are copied unchanged from
  the original CLIP directory given with `--vision DIR` (the tower is frozen
  in training, so this reproduces it). With LLaVA-Mini the tower goes to
  `DST/vision_tower/` and `mm_vision_tower` points there.

Names come from the same tables as the import (`mapping`), so
HF -> mmlm -> HF reproduces names, shapes and values bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import shutil
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from mmlm import checkpoint
from mmlm.convert import hf_clip, hf_llama, llava_mini, mapping
from mmlm.convert.io import (CheckpointReader, SafetensorsWriter, dtype_name, np_dtype, read_hf_config,
                             write_json)
from mmlm.convert.mapping import Target
from mmlm.errors import UserError
from mmlm.models.config import ModelConfig, model_config_from_dict
from mmlm.models.layers import stack_layers
from mmlm.models.positions import sincos_2d
from mmlm.models.projector import projector_depth
from mmlm.safe_io import DirectoryReplacement

VISION_SUBDIR = "vision_tower"
# Tokenizer / generation files carried over from the original HF directory when it still exists.
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "preprocessor_config.json", "added_tokens.json")


# What an export writes into a directory (and into its VISION_SUBDIR), besides SIDE_FILES.
_EXPORT_FILE = re.compile(r"(config\.json|model\.safetensors|model\.safetensors\.index\.json|"
                          r"model-\d{5}-of-\d{5}\.safetensors|\.shard-\d{5}\.tmp)")


def _export_entries(directory: str, nested: bool = True) -> tuple[list[str], list[str]]:
    """(paths an export writes, entries it does not) directly in `directory` (and its vision subdirectory)."""
    ours, foreign = [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            if nested and name == VISION_SUBDIR:
                sub_ours, sub_foreign = _export_entries(path, nested=False)
                ours += sub_ours
                foreign += sub_foreign
                if not sub_foreign:
                    ours.append(path)  # removed after its files (listed first)
            else:
                foreign.append(path)
        elif _EXPORT_FILE.fullmatch(name) or name in SIDE_FILES:
            ours.append(path)
        else:
            foreign.append(path)
    return ours, foreign


def check_destination(dst: str, overwrite: bool) -> list[str]:
    """Checks that an export may replace `dst`; returns the previous export's entries there (deletes nothing).

    A non-empty `dst` needs `overwrite`, and may hold only what an export
    writes (weights, index, shards, config.json, tokenizer and generation
    files, the vision subdirectory): the new export replaces all of it, so no
    shard or index of an earlier export can outlive it and be read instead of
    the new weights. Anything else makes it refuse.
    """
    if not os.path.exists(dst):
        return []
    if not os.path.isdir(dst):
        raise UserError(f"--dst {dst!r} exists and is not a directory; choose a directory path")
    if not os.listdir(dst):
        return []
    if not overwrite:
        raise UserError(f"--dst {dst!r} is not empty; choose another directory or pass --overwrite")
    ours, foreign = _export_entries(dst)
    if foreign:
        shown = [os.path.relpath(p, dst) for p in foreign[:5]]
        raise UserError(
            f"--dst {dst!r} is not an mmlm export: it holds {shown}{' ...' if len(foreign) > 5 else ''}, which an "
            "export does not write. --overwrite only replaces a previous export; choose an empty or new --dst")
    return [os.path.relpath(p, dst) for p in ours]


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


@dataclasses.dataclass
class ExportReport:
    dst: str
    layout: str
    tensors: int = 0
    bytes: int = 0
    files: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.dst} ({self.layout}): {self.tensors} tensors, {self.bytes / 2**30:.2f} GiB in "
                 f"{len(self.files)} file(s)"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


class LeafStore:
    """The leaves of an mmlm model checkpoint, restored one at a time (Orbax partial restore).

    `store[path]` restores that leaf (numpy) and keeps it until `store.pop(path)`;
    everything else stays on disk, so an export holds about one leaf plus one
    output shard, whatever the model size.
    """

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.path = os.path.join(os.path.abspath(directory), checkpoint.PARAMS_DIR)
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(self.path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        self.tree = _plain_dict(tree)
        self.meta = mapping.flatten(self.tree)
        self._cache: dict = {}

    def __contains__(self, path) -> bool:
        return path in self.meta

    def __getitem__(self, path):
        if path not in self._cache:
            ocp = self._ocp
            item = mapping.unflatten({p: (m if p == path else ocp.PLACEHOLDER) for p, m in self.meta.items()})
            args = mapping.unflatten({p: (ocp.RestoreArgs(restore_type=np.ndarray) if p == path else ocp.PLACEHOLDER)
                                      for p in self.meta})
            with ocp.PyTreeCheckpointer() as ckptr:
                restored = ckptr.restore(self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
            self._cache[path] = np.asarray(mapping.flatten(restored)[path])
        return self._cache[path]

    def pop(self, path, default=None):
        return self._cache.pop(path, default)

    def sizes(self) -> list[tuple[str, int]]:
        """(dtype name, bytes) of every leaf, from the metadata."""
        return [(dtype_name(m.dtype), int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize) for m in self.meta.values()]


def _plain_dict(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {str(k): _plain_dict(v) for k, v in tree.items()}
    return tree


def _open_params(src: str, cfg: ModelConfig) -> tuple[Any, set[str]]:
    """(leaves by path, top-level parts). Scanned checkpoints are read lazily; unrolled ones (`layers_{i}`)
    are loaded whole and stacked into the scanned layout the name maps use."""
    store = LeafStore(src)
    parts = set(store.tree)
    if not any("layers_0" in p for p in store.meta):
        return store, parts
    counts = {"vision": cfg.vision.blocks_used, "llm": cfg.llm.layers, "prefusion": cfg.prefusion_layers}
    params = checkpoint.load_model_params(src)
    params = {k: stack_layers(v, counts[k]) if k in counts else v for k, v in params.items()}
    return {p: np.asarray(v) for p, v in mapping.flatten(params).items()}, parts


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    return array if dtype == "keep" else array.astype(np_dtype(dtype), copy=False)


def _write_tensors(writer: SafetensorsWriter, flat: dict, names: dict[str, Target], dtype: str,
                   progress: bool, desc: str) -> int:
    """Writes `names` leaf by leaf, dropping each mmlm leaf from `flat` after its last use.

    Together with the writer's bounded shard buffer this keeps the peak near one
    copy of the weights: what leaves `flat` is what the pending shard holds.
    """
    order = sorted(names, key=lambda n: (names[n].path, -1 if names[n].layer is None else names[n].layer))
    last = {names[n].path: n for n in order}
    for name in tqdm(order, desc=desc, unit="tensor", disable=not progress):
        t = names[name]
        value = flat[t.path] if t.layer is None else flat[t.path][t.layer]
        writer.add(name, _cast(mapping.to_hf(np.asarray(value), t.op), dtype))
        if last[t.path] == name:
            del value
            flat.pop(t.path)
    return len(names)


def _main_dtype(flat: Any, dtype: str) -> str:
    """The dtype holding most bytes (what config.json's torch_dtype states)."""
    if dtype != "keep":
        return dtype
    sizes = collections.Counter()
    pairs = flat.sizes() if isinstance(flat, LeafStore) else [(dtype_name(x.dtype), x.nbytes) for x in flat.values()]
    for name, n in pairs:
        sizes[name] += n
    return sizes.most_common(1)[0][0]


def _copy_side_files(source_dir: str | None, dst: str) -> list[str]:
    """Copies the tokenizer / generation files of the original HF directory (when it still exists) into `dst`.

    When exporting back into that directory, they are copied from its current content into the new one.
    """
    if not source_dir or not os.path.isdir(source_dir):
        return []
    copied = []
    for name in SIDE_FILES:
        for path in glob.glob(os.path.join(source_dir, name)):
            shutil.copy2(path, os.path.join(dst, os.path.basename(path)))
            copied.append(os.path.basename(path))
    return copied


def export_checkpoint(src: str, dst: str, *, vision: str | None = None, dtype: str = "keep",
                      max_shard_bytes: int = 2 * 10**9, mm_vision_tower: str | None = None,
                      overwrite: bool = False, progress: bool = True,
                      log: Callable[[str], None] = print) -> ExportReport:
    """Writes the HF layout(s) of the mmlm checkpoint `src` into `dst` (see module docstring).

    A non-empty `dst` needs `overwrite` and must hold a previous export
    (`check_destination`). The export is written beside `dst` and swapped in
    when complete; the previous one is deleted only then.
    """
    if not checkpoint.is_model_checkpoint(src):
        raise FileNotFoundError(f"{src!r} is not an mmlm model checkpoint (config.json + params/)")
    config = checkpoint.load_config_json(src)
    cfg = model_config_from_dict(config.model)
    source = config.get("source") or {}
    flat, parts = _open_params(src, cfg)
    out_dtype = _main_dtype(flat, dtype)
    dst = os.path.abspath(dst)
    if vision and _inside(vision, dst):
        raise UserError(f"--vision {vision!r} lies inside --dst {dst!r}, which the export replaces; copy the CLIP "
                        "directory elsewhere first")
    previous = check_destination(dst, overwrite)
    with DirectoryReplacement(dst, log=log) as staging:
        report = _export(flat, parts, cfg, source, vision, dst, staging, dtype, out_dtype, max_shard_bytes,
                         mm_vision_tower, progress)
    if previous:
        log(f"--overwrite: replaced the previous export in {dst} ({len(previous)} entries)")
    return report


def _export(flat: dict, parts: set[str], cfg: ModelConfig, source: Any, vision: str | None, dst: str,
            staging: str, dtype: str, out_dtype: str, max_shard_bytes: int, mm_vision_tower: str | None,
            progress: bool) -> ExportReport:
    """The files of `export_checkpoint`, written into `staging` (which then replaces `dst`)."""
    if "llm" not in parts:
        if parts != {"vision"}:
            raise ValueError(f"cannot export params {sorted(parts)} without an LLM; exportable: llm, llm + "
                             "LLaVA-Mini modules, or vision")
        report = ExportReport(dst, "CLIPVisionModel")
        _export_vision(flat, cfg, vision, staging, dtype, out_dtype, max_shard_bytes, source, progress, report)
        return report

    tie = cfg.llm.tie_embeddings
    names = mapping.llama_map(cfg.llm.layers, tie)
    extra = {k: source.get("hf", {}).get(k) for k in hf_llama.HF_PASSTHROUGH} if "hf" in source else {}
    mm = parts - {"llm", "vision"}
    if not mm:
        layout, hf_cfg = "LlamaForCausalLM", hf_llama.hf_config_from_llm(cfg.llm, out_dtype, extra)
        fixed = {}
    else:
        want = {"projector", "compressor"} | ({"prefusion"} if cfg.prefusion_layers else set())
        if mm != want:
            raise ValueError(f"params {sorted(parts)} do not form a LLaVA-Mini model (expected llm + {sorted(want)})")
        names.update(mapping.projector_map(projector_depth(cfg.projector)))
        names.update(mapping.compressor_map(cfg.compressor.stored_position_table))
        if cfg.prefusion_layers:
            names.update(mapping.prefusion_map(cfg.prefusion_layers))
        tower = mm_vision_tower or source.get("mm_vision_tower") or llava_mini.DEFAULT_VISION_TOWER
        if "vision" in parts and vision:
            tower = os.path.join(dst, VISION_SUBDIR)
        layout = "LLaVA-Mini release"
        hf_cfg = llava_mini.release_config(cfg, out_dtype, tower, extra)
        # The release keeps its fixed query position table as a (frozen) parameter; a model that
        # stores its own exports that one (it is a parameter, in `names`).
        fixed = {} if cfg.compressor.stored_position_table else {
            mapping.COMPRESSOR_POS_EMBED: sincos_2d(cfg.vision.width, cfg.compressor.grid).astype(np_dtype(out_dtype))}
    report = ExportReport(dst, layout)
    writer = SafetensorsWriter(staging, max_shard_bytes)
    report.tensors = _write_tensors(writer, flat, names, dtype, progress, f"export {layout}")
    for name, value in fixed.items():
        writer.add(name, value)
        report.tensors += 1
    report.files = writer.close()
    report.bytes = writer.total_bytes
    write_json(staging, "config.json", hf_cfg)
    copied = _copy_side_files(source.get("path"), staging)
    if copied:
        report.notes.append(f"copied {copied} from {source.get('path')}")
    if "vision" in parts:
        if vision:
            vreport = ExportReport(os.path.join(dst, VISION_SUBDIR), "CLIPVisionModel")
            _export_vision(flat, cfg, vision, os.path.join(staging, VISION_SUBDIR), dtype, out_dtype,
                           max_shard_bytes, source, progress, vreport)
            report.notes.append(vreport.summary())
        else:
            report.notes.append(
                f"vision tower not exported: the release layout loads it from its own directory "
                f"(mm_vision_tower={hf_cfg['mm_vision_tower']!r}); pass --vision CLIP_DIR to also write a "
                f"CLIPVisionModel to {os.path.join(dst, VISION_SUBDIR)}")
    return report


def _export_vision(flat: dict, cfg: ModelConfig, vision: str | None, dst: str, dtype: str, out_dtype: str,
                   max_shard_bytes: int, source: Any, progress: bool, report: ExportReport) -> None:
    """A loadable `CLIPVisionModel` directory: mmlm's blocks + the unused ones copied from `vision`."""
    if not vision:
        raise ValueError(
            "exporting a vision tower needs --vision CLIP_DIR (the CLIP directory it was converted from): mmlm "
            f"keeps only the {cfg.vision.blocks_used} blocks up to the selected layer and no post-LayerNorm, "
            "which a CLIPVisionModel needs; they are copied from there")
    hf = read_hf_config(vision)
    theirs = hf_clip.vision_config_from_hf(hf, cfg.vision.select_layer, os.path.join(vision, "config.json"))
    ours = {f.name: getattr(cfg.vision, f.name) for f in dataclasses.fields(cfg.vision)}
    diff = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    if diff:
        raise ValueError(f"--vision {vision!r} is a different CLIP model (mmlm vs theirs: {diff})")
    reader = CheckpointReader(vision)
    prefix = mapping.clip_prefix(reader.names())
    if prefix is None:
        raise ValueError(f"{vision}: no CLIP vision weights found")
    names = mapping.clip_map("vision_model.", cfg.vision.blocks_used)
    os.makedirs(dst, exist_ok=True)
    writer = SafetensorsWriter(dst, max_shard_bytes)
    report.tensors = _write_tensors(writer, flat, names, dtype, progress, "export CLIP")
    copied = 0
    for n in reader.names():
        reason = mapping.clip_skip_reason(n, prefix, cfg.vision.blocks_used)
        if reason is None or not n.startswith(prefix) or n.endswith("position_ids"):
            continue  # mapped (written from mmlm), text tower, or a buffer
        writer.add("vision_model." + n[len(prefix):], _cast(reader.get(n), out_dtype))
        copied += 1
    report.tensors += copied
    report.files = writer.close()
    report.bytes = writer.total_bytes
    write_json(dst, "config.json", hf_clip.hf_config_from_vision(
        cfg.vision, out_dtype, hf_clip.vision_section(hf).get("projection_dim")))
    if os.path.isfile(os.path.join(vision, "preprocessor_config.json")):
        shutil.copy2(os.path.join(vision, "preprocessor_config.json"), dst)
    report.notes.append(f"{copied} tensor(s) not held by mmlm (blocks after the selected layer, post-LayerNorm) "
                        f"copied from {vision}")
