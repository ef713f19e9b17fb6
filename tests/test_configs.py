"""Finding configs (`mmlm.configs`: a path, a name, `FILE.py:ROW`, an installed wheel) and the typed sections each
package builds and checks from its part of the ConfigDict."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_collections
import pytest

from mmlm.config_utils import ConfigError, load_config
from mmlm.configs import config_names, resolve_config_path
from mmlm.data.config import DataConfig
from mmlm.eval.config import EvalConfig
from mmlm.models.config import ModelConfig
from mmlm.sharding import MeshConfig
from mmlm.train.config import OptimConfig, RunConfig, TrainConfig, validate_config

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.py")


# ------------------------------------------------------------------------------------------- resolving


def test_a_path_is_kept(monkeypatch):
    monkeypatch.chdir(REPO)
    assert resolve_config_path("configs/demo.py") == "configs/demo.py"
    assert resolve_config_path(TINY) == TINY


@pytest.mark.parametrize("name,file", [("demo", "demo.py"), ("tiny.py", "tiny.py"),
                                       ("llava_mini_vicuna7b", "llava_mini_vicuna7b.py"),
                                       ("experiments/budget", "experiments/budget.py")])
def test_a_name_finds_the_file_from_any_directory(monkeypatch, tmp_path, name, file):
    for cwd in (REPO, tmp_path):
        monkeypatch.chdir(cwd)
        path = resolve_config_path(name)
        assert os.path.samefile(path, REPO / "configs" / file)


def test_configs_prefix_works_outside_the_checkout(monkeypatch, tmp_path):
    """README commands pass configs/demo.py; from another directory that finds the shipped file."""
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(resolve_config_path("configs/demo.py"), REPO / "configs" / "demo.py")


@pytest.mark.parametrize("spec", ["experiments/prefusion.py:pf2_t1", "experiments/prefusion:pf2_t1",
                                  "configs/experiments/prefusion.py:pf2_t1"])
def test_a_row_is_kept(monkeypatch, tmp_path, spec):
    monkeypatch.chdir(tmp_path)
    path = resolve_config_path(spec)
    assert path.endswith("experiments/prefusion.py:pf2_t1")
    assert load_config(spec).model.prefusion_layers == 2


def test_an_unknown_name_lists_the_names(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no config 'nope': the file does not exist.*'demo'.*'experiments/budget'.*'tiny'"):
        resolve_config_path("nope")
    with pytest.raises(FileNotFoundError):  # what the bench commands caught before
        resolve_config_path("nope")
    assert {"demo", "tiny", "experiments/prefusion"} <= set(config_names())


def test_overrides_apply_to_a_named_config():
    config = load_config("tiny", ["--config.train.steps=10", "--config.model.compressor.budgets=(1,4)",
                                  "--config.optim.learning_rate.llm=2e-4", "--config.mesh.fsdp=1"])
    run = validate_config(config, num_devices=1)
    assert run.train.steps == 10 and run.model.compressor.budgets == (1, 4)
    assert run.optim.learning_rate["llm"] == 2e-4
    with pytest.raises(ConfigError, match="config has no field 'train.stepz'"):
        load_config("tiny", ["--config.train.stepz=10"])


def test_the_summary_command_takes_a_name(capsys):
    from mmlm import cli

    assert cli.main(["summary", "--config", "tiny", "--json", "--config.text_len=12"]) == 0
    assert json.loads(capsys.readouterr().out)["sequence_lengths"]["text"] == 12


# ------------------------------------------------------------------------------------------- the wheel


@pytest.mark.slow
def test_a_wheel_ships_the_configs_and_resolves_names(tmp_path):
    """The wheel holds configs/ as mmlm._configs; run from the unpacked wheel (no checkout), a name resolves."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("mmlm", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, cwd=tmp_path)
    (wheel,) = out.glob("mmlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"mmlm/_configs/demo.py", "mmlm/_configs/tiny.py", "mmlm/_configs/experiments/budget.py",
            "mmlm/configs.py"} <= set(names)
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import mmlm, mmlm.configs as c\n"
            "from mmlm.config_utils import load_config\n"
            "print(mmlm.__file__)\n"
            "print(c.resolve_config_path('demo'))\n"
            "print(load_config('experiments/prefusion:pf2_t1', ['--config.train.steps=3']).train.steps)\n")
    env = dict(os.environ, PYTHONPATH=str(unpacked), JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         check=True)
    file, demo, steps = res.stdout.split()
    assert file.startswith(str(unpacked)) and demo == str(unpacked / "mmlm" / "_configs" / "demo.py") and steps == "3"


# ------------------------------------------------------------------------------------------- typed sections


def test_validate_config_returns_the_typed_sections():
    config = load_config(TINY)
    run = validate_config(config, num_devices=1)
    assert isinstance(run, RunConfig)
    assert isinstance(run.model, ModelConfig) and isinstance(run.mesh, MeshConfig)
    assert isinstance(run.data, DataConfig) and isinstance(run.train, TrainConfig)
    assert isinstance(run.optim, OptimConfig) and isinstance(run.eval, EvalConfig)
    assert run.mesh_shape == {"data": 1, "fsdp": 1, "tensor": 1}
    assert run.data.batch_size == config.data.batch_size and run.train.trainable == tuple(config.train.trainable)
    assert run.seed == config.seed and run.data.seed == config.seed
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.steps = 3  # type: ignore[misc]


def test_a_model_only_config_has_no_training_sections():
    config = load_config(TINY)
    run = validate_config(ml_collections.ConfigDict({"model": config.model.to_dict()}))
    assert run.data is None and run.train is None and run.optim is None and run.eval is None and run.mesh is None


def test_a_section_saved_before_a_field_existed_takes_its_default():
    config = load_config(TINY)
    data = ml_collections.ConfigDict(config.data.to_dict())
    del data["prefill_chunk_tokens"]
    assert DataConfig.from_config(data).prefill_chunk_tokens == 512
    train = ml_collections.ConfigDict(config.train.to_dict())
    del train["matryoshka_loss"]
    assert TrainConfig.from_config(train).matryoshka_loss == "sample"


def _section(name: str, **changes) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict(load_config(TINY)[name].to_dict())
    with section.ignore_type():
        for key, value in changes.items():
            node = section
            *parents, leaf = key.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return section


@pytest.mark.parametrize("build,changes,message", [
    (ModelConfig.from_config, dict(llm__rms_eps=0.0), r"config.model.llm.rms_eps must be > 0.*NaN"),
    (ModelConfig.from_config, dict(vision__heads=3), r"config.model.vision.heads=3 does not divide"),
    (MeshConfig.from_config, dict(fsdp=0), r"config.mesh.fsdp must be a positive integer or -1"),
    (MeshConfig.from_config, dict(pipeline=2), r"config.mesh has unknown axes \['pipeline'\]"),
    (DataConfig.from_config, dict(batch_size=0), r"config.data.batch_size must be >= 1, got 0"),
    (DataConfig.from_config, dict(template="vicuna"), r"config.data.template='vicuna' is not a template"),
    (TrainConfig.from_config, dict(steps=0), r"config.train.steps must be >= 1 or one of \[-1\]"),
    (TrainConfig.from_config, dict(trainable=("llm", "vison")), r"unknown part\(s\) \['vison'\]"),
    (TrainConfig.from_config, dict(vision_pretrain__batch_size=0),
     r"config.train.vision_pretrain.batch_size must be >= 1"),
    (OptimConfig.from_config, dict(schedule="cosin"), r"config.optim.schedule='cosin' is not a schedule"),
    (OptimConfig.from_config, dict(b2=1.5), r"config.optim.b2 must be in \[0, 1\], got 1.5"),
    (EvalConfig.from_config, dict(max_new_tokens=0), r"config.eval.max_new_tokens must be >= 1"),
], ids=lambda v: getattr(v, "__qualname__", None) if callable(v) else None)
def test_each_owner_rejects_a_bad_value(build, changes, message):
    name = {"ModelConfig": "model", "MeshConfig": "mesh", "DataConfig": "data", "TrainConfig": "train",
            "OptimConfig": "optim", "EvalConfig": "eval"}[build.__qualname__.split(".")[0]]
    with pytest.raises(ConfigError, match=message):
        build(_section(name, **changes))


def test_cross_section_checks():
    """What spans sections is checked by validate_config: eval budgets against the model, the batch against
    the mesh and the gradient accumulation."""
    with pytest.raises(ConfigError, match="config.eval.budgets"):
        validate_config(load_config(TINY, ["--config.eval.budgets=(5,)"]))
    with pytest.raises(ConfigError, match="data-parallel size 3"):
        validate_config(load_config(TINY, ["--config.mesh.data=-1"]), num_devices=3)
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        validate_config(load_config(TINY, ["--config.train.grad_accum_steps=3"]))
