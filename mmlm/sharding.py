"""Device meshes and the shardings of params, optimizer state and batches.

The mesh has three named axes (`MESH_AXES`; sizes from `config.mesh`):

* `data`: pure data parallelism (the batch is split, params replicated);
* `fsdp`: fully sharded data parallelism (the batch *and* the params' `embed`
  dimensions are split; XLA all-gathers weights per layer);
* `tensor`: tensor parallelism (heads / MLP / vocab dimensions split).

Parameters carry logical axis names (`nn.with_logical_partitioning` in
`mmlm.models`); `config.sharding_rules` (`mmlm.config_defaults.SHARDING_RULES`)
maps them to mesh axes, and `jax.jit` with `NamedSharding` in/out shardings
does the partitioning (what `pjit` became).

A parameter dimension that its mesh axes do not divide (a 32-wide layer on 3
devices, say) is an error (`UserError` naming the parameter, its shape, the
axis and its size): on a real slice a mistyped mesh must not silently
replicate billions of weights. Tiny models (tests, the demo) set
`config.mesh.allow_replicated_fallback = True`: such a dimension is then
replicated along that axis instead, logged once per parameter and axis.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmlm.config_utils import ConfigError
from mmlm.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of every input is split over these mesh axes.
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves `config.mesh` (one axis may be -1 = the remaining devices) to axis sizes.

    Raises a ValueError when the sizes do not multiply to `num_devices`.
    """
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are available; "
            "set --config.mesh.data/fsdp/tensor so that they multiply to the device count (or use -1)")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over all (global) devices.

    `mesh_utils.create_device_mesh` orders devices so that the innermost axes
    (tensor, then fsdp) get the fastest interconnect on TPU/GPU; with several
    processes, `create_hybrid_device_mesh` is not needed because the outer
    `data` axis is the one that crosses hosts when it is large enough. Axes
    are `Auto` (sharding propagated by the compiler), not the explicit axes
    `jax.make_mesh` defaults to.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
        # Unusual topologies (or CPU with odd counts): plain process-major order, which may put a
        # fast axis across a slow link; said in the log so that a slow run can be traced to it.
        log.warning("sharding: create_device_mesh could not lay out mesh %s over %d %s devices (%s: %s); "
                    "using the devices in process-major order instead (interconnect-unaware)",
                    dict(zip(MESH_AXES, shape)), len(devices), devices[0].platform, type(e).__name__, e)
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rules_tuple(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """config.sharding_rules (tuples or JSON lists after a round trip) as flax expects them."""
    out = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out.append((str(logical), mesh_axes))
    return tuple(out)


def _axes_of(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, name: str = "",
             warned: set[str] | None = None, allow_replication: bool = True) -> P:
    """Checks that mesh axes divide the dimensions they split; replicates instead if allowed.

    spec: mesh-axis PartitionSpec for an array of `shape`. A dimension of size
    d split over axes of total size s needs d % s == 0. Otherwise, with
    `allow_replication` the trailing axes are dropped until it divides
    (possibly to full replication; logged once per (name, axis) when `warned`
    is a set), and without it a `UserError` names the array, its shape, the
    axis and its size.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for i, (dim, entry) in enumerate(zip(shape, entries)):
        axes = list(_axes_of(entry))
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            dropped = axes.pop()
            if not allow_replication:
                raise UserError(
                    f"sharding: parameter {name or 'array'} of shape {tuple(shape)}: dimension {i} (size {dim}) "
                    f"is not divisible by mesh axis {dropped!r} of size {mesh.shape[dropped]} "
                    f"(mesh {describe(mesh)}). Choose --config.mesh.data/fsdp/tensor sizes that divide it, "
                    "map its logical axis to other mesh axes in config.sharding_rules, or (tests and demos) "
                    "set --config.mesh.allow_replicated_fallback=True to replicate it along that axis")
            if warned is not None and (name, dropped) not in warned:
                warned.add((name, dropped))
                log.warning("sharding: %s dim of size %d is not divisible by mesh axis %r (%d devices); "
                            "replicating it along that axis", name or "array", dim, dropped, mesh.shape[dropped])
        fitted.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def logical_to_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, rules: Rules,
                          allow_replication: bool = False) -> Any:
    """Logical PartitionSpecs (e.g. from `nn.get_partition_spec`) -> `NamedSharding`s.

    logical_specs and shapes are matching pytrees (shapes: anything with
    `.shape`). Logical names not in `rules` are replicated; a dimension its
    mesh axes do not divide is a `UserError`, or replicated along those axes
    with `allow_replication` (`config.mesh.allow_replicated_fallback`; see `fit_spec`).
    """
    rules = rules_tuple(rules)
    warned: set = set()

    def one(path, spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec) if spec is not None else (), rules)
        name = jax.tree_util.keystr(path)
        return NamedSharding(mesh, fit_spec(mesh_spec or P(), leaf.shape, mesh, name, warned, allow_replication))

    is_spec = lambda x: isinstance(x, P) or x is None
    flat_specs, treedef = jax.tree.flatten(logical_specs, is_leaf=is_spec)
    flat_shapes_with_path = jax.tree_util.tree_flatten_with_path(shapes)[0]
    if len(flat_specs) != len(flat_shapes_with_path):
        raise ValueError("logical specs and shapes have different structures")
    return jax.tree.unflatten(treedef, [one(p, s, leaf) for s, (p, leaf) in zip(flat_specs, flat_shapes_with_path)])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(ndim: int, mesh: Mesh, batch_axis: int = 0) -> P:
    """Splits dimension `batch_axis` over the data-parallel axes (data, fsdp)."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    entries: list[Any] = [None] * ndim
    entries[batch_axis] = axes
    return P(*entries)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim, mesh, batch_axis))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards (the product of the data and fsdp axis sizes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: moments follow their parameter, the rest is replicated.

    Optax moment trees (Adam's `mu`/`nu`, ...) mirror the params tree, so a
    state leaf whose key path *ends* with a parameter's key path and has its
    shape gets that parameter's sharding; counters and masked leaves are
    replicated. (The parameter shardings were checked by
    `logical_to_shardings`; a state leaf of another shape that they do not
    divide is replicated, since it follows its parameter's layout by choice.)
    """
    by_path: dict[tuple[str, ...], NamedSharding] = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[_dict_keys(path)] = s
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _match(path, leaf, by_path, mesh), abstract_opt_state)


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _match(path, leaf, by_path: dict, mesh: Mesh) -> NamedSharding:
    keys = []
    for k in reversed(path):  # the trailing run of dict keys
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(str(k.key))
    keys = tuple(reversed(keys))
    for start in range(len(keys)):
        s = by_path.get(keys[start:])
        if s is not None:
            spec = s.spec if len(s.spec) <= len(leaf.shape) else P()
            return NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh))
    return replicated(mesh)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES) + f" ({mesh.size} devices)"


def mesh_config_from(config: ml_collections.ConfigDict) -> Mapping[str, int]:
    return {a: int(config.mesh.get(a, 1)) for a in MESH_AXES}


MESH_OPTIONS = ("allow_replicated_fallback",)  # keys of config.mesh that are not axes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The typed `config.mesh` (defaults and meanings: `mmlm.config_defaults.mesh_config`).

    Axis sizes are devices along `data` / `fsdp` / `tensor`; one may be -1 (the
    remaining devices). An axis or option missing from a section (a config
    saved before it existed) reads as 1 / False.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    allow_replicated_fallback: bool = False

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict | Mapping[str, Any]) -> "MeshConfig":
        """Checks the keys, the option types and the axis sizes; a `ConfigError` names the key."""
        unknown = sorted(set(section.keys()) - set(MESH_AXES) - set(MESH_OPTIONS))
        if unknown:
            raise ConfigError(f"config.mesh has unknown axes {unknown}; the axes are {list(MESH_AXES)} (options: "
                              f"{list(MESH_OPTIONS)})")
        for option in MESH_OPTIONS:
            if option in section and not isinstance(section[option], bool):
                raise ConfigError(f"config.mesh.{option} must be True or False, got {section[option]!r}")
        for axis in MESH_AXES:
            value = section.get(axis, 1)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                raise ConfigError(f"config.mesh.{axis} must be a positive integer or -1 (the remaining devices), "
                                  f"got {value!r}")
        return cls(**{a: int(section.get(a, 1)) for a in MESH_AXES},
                   allow_replicated_fallback=bool(section.get("allow_replicated_fallback", False)))

    @property
    def axes(self) -> dict[str, int]:
        """{axis: size} as written (-1 unresolved), what `mesh_shape` and `make_mesh` take."""
        return {a: getattr(self, a) for a in MESH_AXES}

    def shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes on `num_devices` devices; a `ConfigError` when they cannot multiply to it."""
        try:
            return mesh_shape(self.axes, num_devices)
        except ValueError as e:
            raise ConfigError(f"config.mesh: {e}") from None


def allow_replicated_fallback(config: ml_collections.ConfigDict) -> bool:
    """`config.mesh.allow_replicated_fallback` (False when absent, e.g. in a config saved before it existed)."""
    return bool(config.mesh.get("allow_replicated_fallback", False))
