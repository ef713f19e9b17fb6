"""Mesh construction and parameter shardings: undividable dimensions are an error unless the config allows
replication; the mesh-layout fallback is logged.

Divisibility only needs the mesh's axis sizes, so most tests use an `AbstractMesh` (no devices).
"""

from __future__ import annotations

import logging

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from mmlm import sharding as shd
from mmlm.config_utils import load_config
from mmlm.errors import UserError
from mmlm.train import trainer


def abstract_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), shd.MESH_AXES)


def test_a_dividing_mesh_shards_the_dimension():
    mesh = abstract_mesh(fsdp=4, tensor=2)
    assert shd.fit_spec(P("fsdp", "tensor"), (32, 6), mesh, "w", allow_replication=False) == P("fsdp", "tensor")


def test_an_undividable_dimension_is_an_error_naming_parameter_shape_and_axis():
    mesh = abstract_mesh(fsdp=3)
    with pytest.raises(UserError) as e:
        shd.fit_spec(P(None, "fsdp"), (4, 32), mesh, "['llm']['w']", allow_replication=False)
    msg = str(e.value)
    assert "['llm']['w']" in msg and "(4, 32)" in msg and "dimension 1 (size 32)" in msg
    assert "mesh axis 'fsdp' of size 3" in msg and "allow_replicated_fallback" in msg


def test_allowed_replication_drops_the_axis_and_warns_once(caplog):
    mesh = abstract_mesh(fsdp=3, tensor=2)
    warned: set = set()
    with caplog.at_level(logging.WARNING, logger="mmlm.sharding"):
        for _ in range(2):
            spec = shd.fit_spec(P(("tensor", "fsdp"), "tensor"), (4, 6), mesh, "w", warned, allow_replication=True)
            # dim 0: 4 % (2 * 3) != 0 -> fsdp dropped, 4 % 2 == 0 keeps tensor; dim 1: 6 % 2 == 0.
            assert spec == P("tensor", "tensor")
    assert [r.getMessage() for r in caplog.records if "replicating" in r.getMessage()] == [
        "sharding: w dim of size 4 is not divisible by mesh axis 'fsdp' (3 devices); replicating it along that axis"]


def test_trainer_setup_follows_the_config_flag():
    """A mistyped mesh (fsdp=3 for 32-wide layers) fails in setup unless mesh.allow_replicated_fallback."""
    config = load_config("configs/tiny.py", ["--config.mesh.allow_replicated_fallback=False"])
    with pytest.raises(UserError, match=r"parameter \['.*'\].* is not divisible by mesh axis 'fsdp' of size 3"):
        trainer.build_setup(config, 10, mesh=abstract_mesh(fsdp=3))
    config.mesh.allow_replicated_fallback = True
    setup = trainer.build_setup(config, 10, mesh=abstract_mesh(fsdp=3))
    embed = setup.state_shardings["params"]["llm"]["embed_tokens"]["embedding"]
    assert "fsdp" not in jax.tree.leaves(tuple(embed.spec))  # replicated along fsdp instead


def test_paper_configs_do_not_allow_replication():
    for name in ("llava_mini_vicuna7b", "llava_mini_hd_vicuna7b", "llava15_vicuna7b"):
        assert shd.allow_replicated_fallback(load_config(f"configs/{name}.py", [])) is False
    assert shd.allow_replicated_fallback(load_config("configs/demo.py", [])) is True


def test_device_mesh_fallback_is_logged(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise NotImplementedError("no topology for this shape")

    monkeypatch.setattr(shd.mesh_utils, "create_device_mesh", refuse)
    with caplog.at_level(logging.WARNING, logger="mmlm.sharding"):
        mesh = shd.make_mesh({"data": -1})
    assert mesh.shape["data"] == jax.device_count()
    [record] = [r for r in caplog.records if "create_device_mesh" in r.getMessage()]
    assert "process-major order" in record.getMessage() and "no topology for this shape" in record.getMessage()
