"""`mmlm convert` and its files: conversion without torch, --hd_grid, safe --overwrite exports, and bad or
hostile checkpoint files (truncated safetensors, shard paths outside --src, malicious pickles).

Every user mistake must end with exit status 2 and a message naming the file or flag, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmlm
from convert_helpers import assert_trees_equal, load_mmlm, read_json, run_mmlm, tiny_clip, tiny_llama, write_json
from mmlm.convert.io import CheckpointReader, read_safetensors_tensor, save_safetensors
from test_convert_llava_mini import C, Release

REPO = os.path.dirname(os.path.dirname(os.path.abspath(mmlm.__file__)))

# Runs the `mmlm` CLI in a fresh interpreter in which `import torch` / `import transformers` fail as in a
# virtual environment without them (not found, and absent from sys.modules, so that libraries probing for
# an already imported torch, such as einops, see none).
NO_TORCH = """
import importlib.abc
import sys

class HideTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideTorch())
from mmlm.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")], "torch was imported"
sys.exit(code)
"""


def run_without_torch(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


# ----------------------------------------------------------------------------- without torch

def test_safetensors_reader_matches_the_safetensors_library(tmp_path):
    """Every dtype the reader knows, bf16 included, read by numpy alone equals what `safetensors` reads."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{d}": (torch.randn(3, 5, generator=g) * 50).to(d)
               for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                         torch.int16, torch.int8, torch.uint8, torch.bool)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5)
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    reader = CheckpointReader(str(tmp_path))
    for name, t in tensors.items():
        got = reader.get(name)
        assert got.shape == tuple(t.shape) and got.flags.owndata
        want = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert np.array_equal(got.view(np.int16) if t.dtype == torch.bfloat16 else got, want), name
    # And the numpy writer produces files the library reads back bit for bit (bf16 through torch).
    out = str(tmp_path / "out.safetensors")
    save_safetensors(out, {n: reader.get(n) for n in tensors}, metadata={"format": "pt"})
    back = load_file(out)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_hf_llama_and_export_without_torch(tmp_path):
    """bf16 sharded safetensors -> mmlm -> HF, with torch and transformers unimportable."""
    src, ref, dst, back = (str(tmp_path / n) for n in ("hf", "ref", "mmlm", "back"))
    tiny_llama(src, "llama31", dtype=torch.bfloat16)
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 1  # sharded + index
    assert run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", ref, "--quiet")[0] == 0
    proc = run_without_torch("convert", "--from", "hf-llama", "--src", src, "--dst", dst, "--quiet")
    assert proc.returncode == 0, proc.stderr
    cfg, params = load_mmlm(dst)
    assert cfg.param_dtype == "bfloat16"
    assert_trees_equal(params, load_mmlm(ref)[1])
    proc = run_without_torch("convert", "--to", "hf", "--src", dst, "--dst", back, "--quiet")
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    original = {}
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            original.update(load_file(os.path.join(src, f)))
    exported = load_file(os.path.join(back, "model.safetensors"))
    assert set(exported) == set(original)
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v) for k, v in original.items())


def test_llava_mini_without_torch(tmp_path):
    release_dir, clip_dir, ref, dst = (str(tmp_path / n) for n in ("release", "clip", "ref", "mmlm"))
    tiny_clip(clip_dir, "vision")
    Release(seed=5).save(release_dir, 1)
    assert run_mmlm("convert", "--from", "llava-mini", "--src", release_dir, "--vision", clip_dir, "--dst", ref,
                    "--quiet")[0] == 0
    proc = run_without_torch("convert", "--from", "llava-mini", "--src", release_dir, "--vision", clip_dir,
                             "--dst", dst, "--quiet")
    assert proc.returncode == 0, proc.stderr
    cfg, params = load_mmlm(dst)
    assert set(params) == {"vision", "llm", "projector", "compressor", "prefusion"}
    assert_trees_equal(params, load_mmlm(ref)[1])


def test_bin_without_torch_names_what_to_install(tmp_path):
    src = str(tmp_path / "hf")
    tiny_llama(src, "tied", fmt="bin")
    proc = run_without_torch("convert", "--from", "hf-llama", "--src", src, "--dst", str(tmp_path / "out"))
    assert_user_error(proc.returncode, proc.stderr, "pytorch_model.bin", "pip install torch", "safetensors")


# ------------------------------------------------------------------------------------ --hd_grid

def test_hd_grid_overrides_a_release_without_resolution_ratio(tmp_path):
    tiny_clip(str(tmp_path / "clip"), "vision")
    release = Release(seed=5)
    plain, hd = str(tmp_path / "plain"), str(tmp_path / "hd")
    release.save(plain, 1)  # no resolution_ratio
    release.save(hd, 2)  # resolution_ratio = 2
    assert "resolution_ratio" not in read_json(os.path.join(plain, "config.json"))
    common = ("--vision", str(tmp_path / "clip"), "--quiet")
    assert run_mmlm("convert", "--from", "llava-mini", "--src", plain, "--dst", str(tmp_path / "a"), *common)[0] == 0
    assert load_mmlm(str(tmp_path / "a"))[0].hd_grid == 1  # without the flag: not HD
    code, out, err = run_mmlm("convert", "--from", "llava-mini", "--src", plain, "--dst", str(tmp_path / "b"),
                              "--hd_grid", "2", *common)
    assert code == 0, err
    assert "--hd_grid" in out
    assert run_mmlm("convert", "--from", "llava-mini", "--src", hd, "--dst", str(tmp_path / "c"), *common)[0] == 0
    cfg_b, params_b = load_mmlm(str(tmp_path / "b"))
    cfg_c, params_c = load_mmlm(str(tmp_path / "c"))
    assert cfg_b == cfg_c and cfg_b.hd_grid == 2  # the same model as a release that says it is HD
    assert_trees_equal(params_b, params_c)
    # Agreeing with the config is fine; export writes the grid into the release config.
    assert run_mmlm("convert", "--from", "llava-mini", "--src", hd, "--dst", str(tmp_path / "d"), "--hd_grid", "2",
                    *common)[0] == 0
    code, _, err = run_mmlm("convert", "--to", "hf", "--src", str(tmp_path / "b"), "--dst", str(tmp_path / "e"),
                            "--quiet")
    assert code == 0, err
    assert read_json(str(tmp_path / "e" / "config.json"))["resolution_ratio"] == 2


@pytest.mark.parametrize("case", ["compressor", "config", "rows", "not_llava", "zero"])
def test_hd_grid_contradictions_are_errors(tmp_path, case):
    release_dir = str(tmp_path / "release")
    Release(seed=5).save(release_dir, 2 if case == "config" else 1)
    argv = ["convert", "--from", "llava-mini", "--src", release_dir, "--dst", str(tmp_path / "out")]
    if case == "compressor":  # C = 2 queries per side cannot split over 3 x 3 crops
        assert_user_error(*run_mmlm(*argv, "--hd_grid", "3")[::2], "--hd_grid 3", f"compressor_size={C}")
    elif case == "config":
        assert_user_error(*run_mmlm(*argv, "--hd_grid", "1")[::2], "--hd_grid 1", "resolution_ratio=2")
    elif case == "rows":  # config.json says another compressor size than the weights hold
        path = os.path.join(release_dir, "config.json")
        write_json(path, {**read_json(path), "compressor_size": 4})
        assert_user_error(*run_mmlm(*argv, "--hd_grid", "2")[::2], "compressor_size=4", f"{C * C} rows")
    elif case == "not_llava":
        argv[2] = "hf-llama"
        with pytest.raises(SystemExit) as e:
            run_mmlm(*argv, "--hd_grid", "2")
        assert e.value.code == 2
    else:
        with pytest.raises(SystemExit) as e:
            run_mmlm(*argv, "--hd_grid", "0")
        assert e.value.code == 2
    assert not os.path.exists(tmp_path / "out" / "params")


# ------------------------------------------------------------------------------ --overwrite export

def _two_models(tmp_path):
    """Two different mmlm checkpoints of the same shape."""
    out = []
    for seed in (0, 1):
        src, mm = str(tmp_path / f"hf{seed}"), str(tmp_path / f"mm{seed}")
        tiny_llama(src, "llama2", seed=seed)
        assert run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", mm, "--quiet")[0] == 0
        out.append(mm)
    return out


def test_overwrite_replaces_a_sharded_export_entirely(tmp_path):
    """Exporting over a sharded export must not leave its index and shards behind: they would be read
    instead of the new `model.safetensors` (silently the old model)."""
    old, new = _two_models(tmp_path)
    dst, again = str(tmp_path / "export"), str(tmp_path / "again")
    assert run_mmlm("convert", "--to", "hf", "--src", old, "--dst", dst, "--max_shard_size", "50KB",
                    "--quiet")[0] == 0
    assert os.path.isfile(os.path.join(dst, "model.safetensors.index.json"))
    with pytest.raises(SystemExit) as e:  # without the flag: refused
        run_mmlm("convert", "--to", "hf", "--src", new, "--dst", dst, "--quiet")
    assert e.value.code == 2
    code, _, err = run_mmlm("convert", "--to", "hf", "--src", new, "--dst", dst, "--overwrite", "--quiet")
    assert code == 0, err
    assert sorted(f for f in os.listdir(dst) if f.startswith("model")) == ["model.safetensors"]
    assert run_mmlm("convert", "--from", "hf-llama", "--src", dst, "--dst", again, "--quiet")[0] == 0
    assert_trees_equal(load_mmlm(again)[1], load_mmlm(new)[1])


def test_overwrite_refuses_a_directory_that_is_not_an_export(tmp_path):
    _, new = _two_models(tmp_path)
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(b"old")
    (dst / "notes.txt").write_text("keep me")
    code, _, err = run_mmlm("convert", "--to", "hf", "--src", new, "--dst", str(dst), "--overwrite", "--quiet")
    assert_user_error(code, err, "notes.txt", "not an mmlm export")
    assert sorted(os.listdir(dst)) == ["model.safetensors", "notes.txt"]  # nothing deleted
    # An mmlm checkpoint is not an export either.
    code, _, err = run_mmlm("convert", "--to", "hf", "--src", new, "--dst", str(tmp_path / "mm0"), "--overwrite")
    assert_user_error(code, err, "params")
    assert os.path.isdir(tmp_path / "mm0" / "params")


# ----------------------------------------------------------------------------- hostile / damaged files

def test_shard_paths_must_stay_inside_src(tmp_path):
    src = str(tmp_path / "hf")
    tiny_llama(src, "llama2")
    index_path = os.path.join(src, "model.safetensors.index.json")
    index = read_json(index_path)
    victim = sorted(set(index["weight_map"].values()))[0]
    os.replace(os.path.join(src, victim), str(tmp_path / "outside.safetensors"))
    index["weight_map"] = {k: ("../outside.safetensors" if v == victim else v) for k, v in index["weight_map"].items()}
    write_json(index_path, index)
    code, _, err = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", str(tmp_path / "out"))
    assert_user_error(code, err, "'../outside.safetensors'", "outside")
    index["weight_map"] = {k: str(tmp_path / "outside.safetensors") for k in index["weight_map"]}
    write_json(index_path, index)
    code, _, err = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", str(tmp_path / "out"))
    assert_user_error(code, err, "outside")


@pytest.mark.parametrize("keep", ["data", "header", "length"])
def test_truncated_safetensors_is_named(tmp_path, keep):
    src = str(tmp_path / "hf")
    tiny_llama(src, "llama2")
    shard = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[-1]
    path = os.path.join(src, shard)
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    cut = {"data": len(raw) - 100, "header": 8 + n // 2, "length": 5}[keep]
    with open(path, "wb") as f:
        f.write(raw[:cut])
    code, _, err = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", str(tmp_path / "out"))
    assert_user_error(code, err, shard, "truncated")


def test_reader_refuses_a_header_whose_ranges_lie(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_safetensors(path, {"a": np.zeros((4, 4), np.float32)})
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["a"]["shape"] = [100, 100]  # claims far more than the byte range holds
    body = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    with pytest.raises(mmlm.errors.UserError, match="byte range"):
        CheckpointReader(str(tmp_path))
    meta = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    with pytest.raises(mmlm.errors.UserError, match="truncated"):
        read_safetensors_tensor(path, 8 + len(body) + 32, meta)


class _Payload:
    """What a malicious checkpoint smuggles in: unpickling it would create a directory."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_pickle_is_refused_with_safe_advice(tmp_path):
    src = str(tmp_path / "hf")
    tiny_llama(src, "tied", fmt="bin")
    path = os.path.join(src, "pytorch_model.bin")
    state = torch.load(path, weights_only=True)
    marker = str(tmp_path / "pwned")
    state["model.norm.weight"] = _Payload(marker)
    torch.save(state, path)
    code, _, err = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", str(tmp_path / "out"))
    assert_user_error(code, err, "pytorch_model.bin", "refused", "safetensors")
    assert "weights_only" not in err and "pickle.load" not in err.replace("do not load this file with pickle", "")
    assert not os.path.exists(marker)


def test_damaged_bin_is_named(tmp_path):
    src = str(tmp_path / "hf")
    tiny_llama(src, "tied", fmt="bin")
    path = os.path.join(src, "pytorch_model.bin")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    code, _, err = run_mmlm("convert", "--from", "hf-llama", "--src", src, "--dst", str(tmp_path / "out"))
    assert_user_error(code, err, "pytorch_model.bin", "not a readable PyTorch checkpoint")
