"""Reading and writing HF-style checkpoint directories, one tensor at a time.

A source directory holds `config.json` and weights as (the first one present
is read, the others ignored and named, as transformers chooses)
* `model.safetensors`, or shards listed in `model.safetensors.index.json`, or
* `pytorch_model.bin`, or shards listed in `pytorch_model.bin.index.json`
  (loaded with `torch.load(weights_only=True)`: tensors and plain containers
  only, a pickle that asks for anything else is refused, never executed).

safetensors files are read and written with numpy alone (bfloat16 is
`ml_dtypes.bfloat16`): the format is an 8-byte little-endian header length,
a JSON header (name -> dtype, shape, byte range) and the raw little-endian
tensor bytes. torch is imported only for PyTorch `.bin` files.

Memory: `CheckpointReader.get` opens the file, reads the byte range of one
tensor into a fresh array and closes it again, so the reader never holds more
than one tensor, whatever the checkpoint size. Legacy `.bin` shards are mapped
whole (`mmap=True`) while they are read; convert those to safetensors first if
one shard is larger than the memory left over.

Untrusted input: shard names in an index must stay inside the checkpoint
directory; headers are checked (dtypes, shapes against byte ranges, byte
ranges against the file size) before any tensor is read, so a truncated or
damaged file is reported by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import warnings
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from mmlm.errors import UserError

CONFIG_FILE = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# numpy dtype name <-> safetensors dtype tag.
_SAFE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_SAFE_TAGS = {v: k for k, v in _SAFE_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

DTYPE_CHOICES = ("keep", "float32", "bfloat16", "float16")


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a name, bfloat16 included."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def dtype_name(dtype: Any) -> str:
    return "bfloat16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name


def torch_to_numpy(tensor) -> np.ndarray:
    """CPU torch tensor -> numpy array sharing its memory (bf16 -> ml_dtypes.bfloat16)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def numpy_to_torch(array: np.ndarray):
    """numpy array -> torch tensor sharing its memory (ml_dtypes.bfloat16 -> torch.bfloat16)."""
    import torch

    array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        # Read-only arrays (e.g. backed by jax) are fine: the tensor is only read (saved), never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if array.dtype == np.dtype(ml_dtypes.bfloat16):
            return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def read_hf_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{directory!r} has no {CONFIG_FILE}; pass the directory written by `save_pretrained` "
            "(the one holding config.json and the weight files)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file the checkpoint came with") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, expected an object of config fields")
    return data


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name ("bfloat16" for bf16)
    file: str
    nbytes: int


def _safe_dtype(name: str) -> np.dtype:
    """numpy dtype of a safetensors dtype name, little-endian as the format stores it."""
    dt = np_dtype(name)
    return dt if dt.itemsize == 1 or dt == np.dtype(ml_dtypes.bfloat16) else dt.newbyteorder("<")


def _safetensors_header(path: str) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, checked JSON header without `__metadata__`) of a safetensors file.

    Raises `UserError` naming the file when it is not a safetensors file, when
    an entry is malformed, or when the file is shorter than its header says
    (truncated download or copy).
    """
    size = os.path.getsize(path)
    how = "re-download or re-export it"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path} is truncated: {size} bytes, not even a safetensors header; {how}")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > MAX_HEADER_BYTES:
            raise UserError(f"{path} is not a safetensors file (header length {n}); {how}")
        if 8 + n > size:
            raise UserError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}; {how}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not a safetensors file (its header is not JSON: {e}); {how}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header is not a JSON object); {how}")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, meta in header.items():
        ok = (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and isinstance(meta.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in meta["shape"])
              and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
              and all(isinstance(o, int) for o in meta["data_offsets"]))
        if not ok:
            raise UserError(f"{path}: header entry {name!r} is malformed ({meta!r}); {how}")
        if meta["dtype"] not in _SAFE_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, which mmlm does not read "
                            f"(supported: {sorted(_SAFE_DTYPES)})")
        start, end = meta["data_offsets"]
        want = math.prod(meta["shape"]) * np_dtype(_SAFE_DTYPES[meta["dtype"]]).itemsize
        if not 0 <= start <= end or end - start != want:
            raise UserError(f"{path}: tensor {name!r} has byte range {start}..{end} for {want} bytes of "
                            f"{meta['dtype']}{tuple(meta['shape'])}; the file is damaged, {how}")
        if end > data:
            raise UserError(f"{path} is truncated: tensor {name!r} ends at byte {8 + n + end}, the file has "
                            f"{size}; {how}")
    return 8 + n, header


def read_safetensors_tensor(path: str, data_offset: int, meta: dict[str, Any]) -> np.ndarray:
    """One tensor of a safetensors file (header entry `meta`) as a fresh numpy array."""
    dtype = _safe_dtype(_SAFE_DTYPES[meta["dtype"]])
    start, end = meta["data_offsets"]
    out = np.empty(tuple(meta["shape"]), dtype)
    buf = out.reshape(-1).view(np.uint8)
    with open(path, "rb") as f:
        f.seek(data_offset + start)
        got = f.readinto(buf) if end > start else 0
    if got != end - start:
        raise UserError(f"{path} is truncated: tensor {meta!r} could not be read whole; re-download or re-export it")
    return out if dtype.isnative else out.astype(dtype.newbyteorder("="))


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` as one safetensors file (numpy only; what `safetensors.torch.load_file` reads).

    Tensors are laid out by decreasing item size, after a header padded to 8
    bytes, so every tensor starts at a multiple of its item size.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        a = tensors[name]
        tag = _SAFE_TAGS.get(dtype_name(a.dtype))
        if tag is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent here")
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            a = np.ascontiguousarray(tensors[name])
            if a.dtype.itemsize > 1 and a.dtype != np.dtype(ml_dtypes.bfloat16) and a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(a.reshape(-1).view(np.uint8).data)


class CheckpointReader:
    """Lists and reads the tensors of an HF checkpoint directory (see module docstring)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise UserError(f"checkpoint directory {directory!r} does not exist")
        self._bin_cache: tuple[str, dict] | None = None
        self._safe_headers: dict[str, tuple[int, dict[str, Any]]] = {}
        self.index: str | None = None  # the shard index read, if any
        self.ignored: list[str] = []  # weight files present but not read (see `_discover`)
        self.format, files = self._discover()
        self.files = files
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            for info in self._list(file):
                if info.name in self.infos:
                    raise UserError(f"tensor {info.name!r} appears in both {self.infos[info.name].file} and {file}")
                self.infos[info.name] = info

    # ---------------------------------------------------------------- listing
    def _inside(self, index: str, shard: Any) -> str:
        """The path of a shard named by an index, which must stay inside the checkpoint directory."""
        if not isinstance(shard, str) or not shard:
            raise UserError(f"{index} in {self.directory!r} names a shard {shard!r}; expected a file name")
        root = os.path.realpath(self.directory)
        path = os.path.realpath(os.path.join(root, shard))
        if os.path.isabs(shard) or os.path.commonpath([root, path]) != root:
            raise UserError(
                f"{index} in {self.directory!r} names the shard {shard!r}, which lies outside that directory; "
                "an index may only name files inside --src (fix or remove the index)")
        return path

    def _discover(self) -> tuple[str, list[str]]:
        """The weight files to read, chosen as transformers' `from_pretrained` chooses them.

        First found wins: model.safetensors, model.safetensors.index.json, pytorch_model.bin,
        pytorch_model.bin.index.json (so a single-file checkpoint next to a stale shard index is read,
        the index ignored, as transformers does); failing all four, every *.safetensors file.
        `self.ignored` lists the weight files present but not read.
        """
        d = self.directory
        order = ((SAFE_SINGLE, "safetensors"), (SAFE_INDEX, "safetensors"), (BIN_SINGLE, "bin"),
                 (BIN_INDEX, "bin"))
        present = [(name, fmt) for name, fmt in order if os.path.isfile(os.path.join(d, name))]
        if not present:
            safes = sorted(x for x in os.listdir(d) if x.endswith(".safetensors"))
            if safes:
                return "safetensors", [os.path.join(d, x) for x in safes]
            raise UserError(
                f"no weights in {d!r}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
        (name, fmt), others = present[0], present[1:]
        self.ignored = [n for n, _ in others]
        path = os.path.join(d, name)
        if not name.endswith(".index.json"):
            return fmt, [path]
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
            shards = set(weight_map.values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise UserError(f"{path} is not a shard index (JSON with a 'weight_map' object): "
                            f"{type(e).__name__}: {e}") from None
        files = sorted(self._inside(name, x) for x in shards)
        missing = [os.path.relpath(x, d) for x in files if not os.path.isfile(x)]
        if missing:
            raise UserError(f"{name} in {d!r} lists shards that are missing: {missing}")
        self.index = path
        return fmt, files

    def describe(self) -> str:
        """Which files were read, and which weight files were present but not read (one line)."""
        read = ([os.path.basename(self.index)] if self.index else []) + \
            [os.path.relpath(f, self.directory) for f in self.files]
        shown = read if len(read) <= 6 else read[:3] + [f"... {len(read) - 4} more ..."] + read[-1:]
        line = f"read {self.directory}: {', '.join(shown)}"
        if self.ignored:
            line += (f"; not read: {', '.join(self.ignored)} (when several are present, transformers reads the "
                     f"first of {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE}, {BIN_INDEX}; so does mmlm)")
        return line

    def _list(self, file: str) -> Iterator[TensorInfo]:
        if file.endswith(".safetensors"):
            offset, header = _safetensors_header(file)
            self._safe_headers[file] = (offset, header)
            for name, meta in header.items():
                start, end = meta["data_offsets"]
                yield TensorInfo(name, tuple(meta["shape"]), _SAFE_DTYPES[meta["dtype"]], file, end - start)
        else:
            for name, tensor in self._load_bin(file).items():
                arr_dtype = str(tensor.dtype).replace("torch.", "")
                yield TensorInfo(name, tuple(tensor.shape), arr_dtype, file,
                                 tensor.numel() * tensor.element_size())

    def _load_bin(self, file: str) -> dict:
        """State dict of one .bin shard, memory-mapped, safe unpickling only (cached: one shard at a time)."""
        try:
            import torch
        except ImportError:
            raise UserError(
                f"{file} is a PyTorch pickle, which needs torch to read (`pip install torch`); safetensors "
                "checkpoints (model.safetensors) convert without it") from None

        if self._bin_cache is not None and self._bin_cache[0] == file:
            return self._bin_cache[1]
        self._bin_cache = None
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(_refusal(file, e)) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"{file} is not a readable PyTorch checkpoint (truncated or damaged?): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; re-download it, or use "
                            "a safetensors copy") from None
        if not isinstance(state, dict):
            raise UserError(f"{file} does not hold a state dict (got {type(state).__name__})")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self._bin_cache = (file, state)
        return state

    # ---------------------------------------------------------------- reading
    def names(self) -> list[str]:
        """Tensor names ordered by file then name, so shards are read one after the other."""
        return sorted(self.infos, key=lambda n: (self.infos[n].file, n))

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> np.ndarray:
        """One tensor as a numpy array that owns its memory."""
        info = self.infos[name]
        if self.format == "safetensors":
            offset, header = self._safe_headers[info.file]
            return read_safetensors_tensor(info.file, offset, header[name])
        return torch_to_numpy(self._load_bin(info.file)[name].clone())

    def release(self) -> None:
        """Drops a cached .bin shard (and its mapping)."""
        self._bin_cache = None

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


def _refusal(file: str, error: Exception) -> str:
    """The message for a pickle that a weights-only load refused (what it wanted, what to do instead)."""
    wanted = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    what = f"it asks for {wanted.group(1)!r}, " if wanted else ""
    return (f"{file} was refused: {what}a .bin checkpoint may hold only tensors and plain containers, and loading "
            "anything else would run code stored in the file. Use a safetensors copy of this checkpoint "
            "(model.safetensors, as published on most model hubs), or have its publisher convert it to "
            "safetensors; do not load this file with pickle")


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 2GB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2).upper()]
    return int(float(m.group(1)) * base**power)


class SafetensorsWriter:
    """Writes tensors into `model.safetensors` or size-capped shards plus `model.safetensors.index.json`.

    Tensors are buffered until a shard is full, so memory holds at most one
    shard (`max_shard_bytes`) besides what the caller keeps.
    """

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        os.makedirs(directory, exist_ok=True)
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._temp_files: list[str] = []
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = np.ascontiguousarray(array)
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        path = os.path.join(self.directory, f".shard-{len(self._shards):05d}.tmp")
        save_safetensors(path, self._pending, metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._temp_files.append(path)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finishes the files; returns their names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._temp_files[0], os.path.join(self.directory, SAFE_SINGLE))
            return [SAFE_SINGLE]
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for tmp, final, keys in zip(self._temp_files, names, self._shards):
            os.replace(tmp, os.path.join(self.directory, final))
            weight_map.update({k: final for k in keys})
        with open(os.path.join(self.directory, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        return names


def write_json(directory: str, name: str, data: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
