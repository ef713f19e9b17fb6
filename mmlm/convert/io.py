"""Reading and writing HF-style checkpoint directories, one tensor at a time.

A source directory holds `config.json` and weights as
* `model.safetensors`, or shards listed in `model.safetensors.index.json`, or
* `pytorch_model.bin`, or shards listed in `pytorch_model.bin.index.json`
  (loaded with `torch.load(weights_only=True)`: tensors and plain containers
  only, a pickle that asks for anything else is refused, never executed).

Memory: a safetensors file is memory-mapped by the library; every page read
through the mapping stays resident (and counts in the process RSS) until the
mapping is closed. `CheckpointReader.get` therefore opens the file, copies out
one tensor and closes it again, so the reader never holds more than one
tensor, whatever the checkpoint size. Legacy `.bin` shards are mapped whole
(`mmap=True`) while they are read; convert those to safetensors first if one
shard is larger than the memory left over.

Arrays are numpy; bfloat16 is `ml_dtypes.bfloat16` (numpy has no bf16 and the
safetensors numpy backend refuses it), moved through torch by bit-casting to
uint16, which copies nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any, Iterator

import ml_dtypes
import numpy as np

CONFIG_FILE = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# numpy dtype name <-> safetensors dtype tag.
_SAFE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

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
        raise FileNotFoundError(
            f"{directory!r} has no {CONFIG_FILE}; pass the directory written by `save_pretrained` "
            "(the one holding config.json and the weight files)")
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name ("bfloat16" for bf16)
    file: str
    nbytes: int


def _safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes), read without mapping the data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"{path!r} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class CheckpointReader:
    """Lists and reads the tensors of an HF checkpoint directory (see module docstring)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
        self._bin_cache: tuple[str, dict] | None = None
        self.format, files = self._discover()
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            for info in self._list(file):
                if info.name in self.infos:
                    raise ValueError(f"tensor {info.name!r} appears in both {self.infos[info.name].file} and {file}")
                self.infos[info.name] = info

    # ---------------------------------------------------------------- listing
    def _discover(self) -> tuple[str, list[str]]:
        d = self.directory
        for index, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            path = os.path.join(d, index)
            if os.path.isfile(path):
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
                missing = [x for x in files if not os.path.isfile(os.path.join(d, x))]
                if missing:
                    raise FileNotFoundError(f"{index} in {d!r} lists shards that are missing: {missing}")
                return fmt, [os.path.join(d, x) for x in files]
        if os.path.isfile(os.path.join(d, SAFE_SINGLE)):
            return "safetensors", [os.path.join(d, SAFE_SINGLE)]
        if os.path.isfile(os.path.join(d, BIN_SINGLE)):
            return "bin", [os.path.join(d, BIN_SINGLE)]
        safes = sorted(x for x in os.listdir(d) if x.endswith(".safetensors"))
        if safes:
            return "safetensors", [os.path.join(d, x) for x in safes]
        raise FileNotFoundError(
            f"no weights in {d!r}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")

    def _list(self, file: str) -> Iterator[TensorInfo]:
        if file.endswith(".safetensors"):
            for name, meta in _safetensors_header(file).items():
                if meta["dtype"] not in _SAFE_DTYPES:
                    raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {meta['dtype']}")
                start, end = meta["data_offsets"]
                yield TensorInfo(name, tuple(meta["shape"]), _SAFE_DTYPES[meta["dtype"]], file, end - start)
        else:
            for name, tensor in self._load_bin(file).items():
                arr_dtype = str(tensor.dtype).replace("torch.", "")
                yield TensorInfo(name, tuple(tensor.shape), arr_dtype, file,
                                 tensor.numel() * tensor.element_size())

    def _load_bin(self, file: str) -> dict:
        """State dict of one .bin shard, memory-mapped, safe unpickling only (cached: one shard at a time)."""
        import torch

        if self._bin_cache is not None and self._bin_cache[0] == file:
            return self._bin_cache[1]
        self._bin_cache = None
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{file} does not hold a state dict (got {type(state).__name__})")
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
            from safetensors import safe_open

            # Open per tensor: closing drops the mapping, so no page stays resident.
            with safe_open(info.file, framework="pt") as f:
                return torch_to_numpy(f.get_tensor(name))
        return torch_to_numpy(self._load_bin(info.file)[name].clone())

    def release(self) -> None:
        """Drops a cached .bin shard (and its mapping)."""
        self._bin_cache = None

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


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
        from safetensors.torch import save_file

        path = os.path.join(self.directory, f".shard-{len(self._shards):05d}.tmp")
        save_file({k: numpy_to_torch(v) for k, v in self._pending.items()}, path, metadata={"format": "pt"})
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
