"""Sharding attribution over a device mesh with axes ``("data", "model")``.

Examples are split over ``data``; MLP hidden units, the vocabulary and attention heads'
computations over ``model`` (Megatron-style tensor parallelism), the attention projections'
weights along d_model (:data:`LEAF_RULES`). The layout is declared as data: each
parameter leaf's logical axes come from the one parameter table, :data:`jaxinterp.layout.LEAVES`
(:data:`PARAM_AXES` is its view), and a small table maps logical axes to mesh axes
(:data:`MESH_RULES`). A dimension that the mesh axis does not divide (e.g. the 2
key/value heads of the k/v biases on a 4-way ``model`` axis) is replicated instead.

Nothing else changes: the same jitted :func:`jaxinterp.attribution.batch_scores` runs
on sharded inputs and ``jit`` propagates the shardings through the program, except for
the node outputs and the heads' q/k/v, which the graph forward lays out itself
(:func:`split_nodes`, :func:`split_heads`), traced under the mesh of the program's sharded
arguments (:func:`mesh_of`, entered by :func:`jaxinterp.compiler.jit`). Results are identical to one device up to float32 summation order.

    mesh = make_mesh(data=2, model=4)              # 8 devices
    graph = attribute(model, "pairs.csv", method="EAP", mesh=mesh)

Across hosts (see :mod:`jaxinterp.distributed`) the mesh spans every process's devices;
each process passes the same full batch and keeps only its own shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .layout import LEAVES, leaf_axes

try:
    from jax.sharding import AxisType
except ImportError:  # jax < 0.5: mesh axes have no types, every axis behaves as Auto
    AxisType = None

AXES = ("data", "model")

# Logical axes of every parameter leaf, keyed by its path: a view of the layout table.
PARAM_AXES = {path: leaf.axes for path, leaf in LEAVES.items()}

# Logical axis -> mesh axis; axes not listed are replicated.
MESH_RULES = {"head": "model", "kv_head": "model", "d_mlp": "model", "vocab": "model", "batch": "data"}

# Per-leaf exceptions to MESH_RULES. The attention projections are split along d_model, not
# by heads: their inputs and outputs in the circuit graph (every head's q/k/v inputs, every
# head's output) are split along d_model over ``model`` like the node outputs they are
# mixed from (:func:`split_nodes`), and head-split weights made XLA move those
# [head, batch, pos, d_model] arrays between the two splits in every layer (Llama-3-70B EAP
# on 8 devices, 8 x 64 tokens: 50 of the 65 GiB each device received). Split like them, a
# layer moves only the heads' small [batch, pos, head, d_head] values (to and from the
# heads' split, :func:`split_heads`, where attention itself runs): 65 -> 27 GiB, the same
# memory and FLOPs; on 16 devices 45 -> 27 GiB and 39.5 -> 34.2 GiB peak (8 key/value heads
# do not divide 16, d_model does). The MLP keeps Megatron's split of its hidden units.
LEAF_RULES = {("blocks", "attn", w): {"head": None, "kv_head": None, "d_model": "model"}
              for w in ("w_q", "w_k", "w_v", "w_o")}


class MeshError(ValueError):
    """A mesh that cannot be built on these devices (the message says why)."""


def parse_mesh(text: str) -> tuple[int, int]:
    """``"2x4"`` -> ``(data, model) = (2, 4)``."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        data, model = (int(p) for p in parts)
    except ValueError:
        raise MeshError(f"mesh {text!r}: write DATAxMODEL, e.g. 2x4 (2-way data, 4-way model parallel)") from None
    if data < 1 or model < 1:
        raise MeshError(f"mesh {text!r}: both sizes must be >= 1")
    return data, model


def make_mesh(data: int = 1, model: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A ``data x model`` mesh over ``devices`` (default: ``jax.devices()``, every
    process's devices). One process may use the first ``data * model`` devices when that
    number divides the device count; several processes must use them all."""
    devices = list(jax.devices() if devices is None else devices)
    n = data * model
    if data < 1 or model < 1:
        raise MeshError(f"mesh sizes must be >= 1, got data={data}, model={model}")
    platform = devices[0].platform if devices else "none"
    if n > len(devices) or len(devices) % n:
        raise MeshError(f"a {data}x{model} mesh needs {n} devices, which must divide the {len(devices)} "
                        f"{platform} device(s) available; on CPU, set XLA_FLAGS="
                        f"--xla_force_host_platform_device_count=N before jax starts to get N devices")
    if jax.process_count() > 1 and n != len(devices):
        raise MeshError(f"with {jax.process_count()} processes the mesh must use all {len(devices)} devices, "
                        f"got {data}x{model} = {n}")
    if AxisType is None:
        return Mesh(np.array(devices[:n]).reshape(data, model), AXES)
    # Auto axes: jit propagates shardings as usual (Explicit axes, the default of
    # jax.make_mesh, would type-check every op's sharding instead)
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:n])


# --- node outputs: split along d_model over ``model`` -------------------------------------
# Every upstream node's output ``[src, batch, pos, d_model]`` (the corrupted run's, this
# run's, their difference: the edge contraction's operand) and the edge probes' per-input
# gradients are the graph forward's largest arrays. Heads are computed where their weights
# are (``model``), but these arrays, left to ``jit``, were replicated on every device:
# Llama-3-70B EAP, 8 x 64 tokens, needed ~300 GiB per device on 8 devices and no less on 16.
# Split along d_model, each device holds 1/model of them and contracts its slice of d_model
# (the [src, dst] partial scores are summed over ``model``). The layout needs the mesh
# while the program is traced: :func:`on_mesh` puts it in context, and every program of
# :func:`jaxinterp.compiler.jit` enters the mesh of its sharded arguments (:func:`mesh_of`).


def on_mesh(mesh: Optional[Mesh]):
    """A context in which programs traced for ``mesh`` lay out node outputs as above
    (``jax.set_mesh``); no mesh, or a jax without it (< 0.7): a context that does nothing,
    and the node outputs are laid out as ``jit`` propagates them."""
    set_mesh = getattr(jax, "set_mesh", None)
    return contextlib.nullcontext() if mesh is None or set_mesh is None else set_mesh(mesh)


def mesh_of(args: Sequence) -> contextlib.AbstractContextManager:
    """:func:`on_mesh` of the mesh that ``args`` (a program's arguments) are laid out on, over
    2 or more devices; a context that does nothing where none is, or a mesh is already in
    context. :func:`jaxinterp.compiler.jit` calls every program under it, so that a program
    given sharded arguments is traced for their mesh without its caller entering it.

    Each argument is judged by its first array (a pytree's first leaf, by first items of
    dicts, lists and tuples: an argument's arrays share one mesh): ~8 us for four arguments
    on one device, where reading every leaf's sharding took ~50 us for 30 leaves (a jitted
    call's dispatch: ~35 us on this 2-core machine)."""
    for x in args:
        while isinstance(x, (dict, list, tuple)) and x:
            x = next(iter(x.values())) if isinstance(x, dict) else x[0]
        sharding = x.sharding if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) else None
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return on_mesh(sharding.mesh) if _context_mesh() is None else contextlib.nullcontext()
    return contextlib.nullcontext()


def _context_mesh():
    """The (abstract) mesh in context (:func:`on_mesh`), or None."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = None if get is None else get()
    return None if mesh is None or mesh.empty else mesh


def model_ways() -> int:
    """The size of the ``model`` axis of the mesh in context (:func:`on_mesh`); 1 without."""
    mesh = _context_mesh()
    return 1 if mesh is None or "model" not in mesh.axis_names else int(mesh.shape["model"])


def node_ways(d_model: int, model: int) -> int:
    """Into how many slices :func:`split_nodes` cuts d_model on a ``model``-way axis: all
    of them where they divide it, else 1 (kept whole). :mod:`jaxinterp.memory` counts by it."""
    return model if model > 1 and d_model % model == 0 else 1


def split_nodes(x: jax.Array) -> jax.Array:
    """``x [..., batch, pos, d_model]`` constrained to d_model over ``model`` and batch over
    ``data`` on the mesh in context (a dimension the axis does not divide stays whole);
    unchanged without a ``model`` axis of 2 or more."""
    if node_ways(x.shape[-1], model_ways()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, P(*([None] * (x.ndim - 3)), _batch_axis(x.shape[-3]), None, "model"))


def _batch_axis(n_batch: int) -> Optional[str]:
    """The mesh axis (in context) a batch of ``n_batch`` is split over, or None."""
    data = _context_mesh().shape.get(MESH_RULES["batch"], 1)
    return MESH_RULES["batch"] if data > 1 and n_batch % data == 0 else None


def split_heads(x: jax.Array) -> jax.Array:
    """``x [batch, pos, head, d_head]`` (a layer's q, k or v) constrained to heads over
    ``model`` and batch over ``data`` where the axes divide them; unchanged without a
    ``model`` axis of 2 or more. The projections' weights are split along d_model
    (:data:`LEAF_RULES`), so their products are partial sums over the devices; split by
    heads, they are reduced straight to the heads each device attends with (left to
    ``jit``, every device kept every head's q/k/v and ran every head's attention: Llama-3-70B
    EAP on 8 devices, +4.4 GiB per device)."""
    ways = model_ways()
    if ways == 1 or x.shape[2] % ways:
        return x
    return jax.lax.with_sharding_constraint(x, P(_batch_axis(x.shape[0]), None, "model"))


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str, ...]:
    """Logical axes of the parameter leaf at ``path`` (e.g. ``("blocks", "attn", "w_q")``)."""
    axes = leaf_axes(path)
    if axes is None:
        raise ValueError(f"parameter {'/'.join(path)} is not in jaxinterp.sharding.PARAM_AXES; add its axes to "
                         f"jaxinterp.layout.LEAVES")
    if len(axes) != ndim:
        raise ValueError(f"parameter {'/'.join(path)} has {ndim} dimensions, its axes {axes} say {len(axes)}")
    return axes


def partition_spec(axes: Sequence[str], shape: Sequence[int], mesh_shape: dict, rules: dict) -> P:
    """Mesh axis per dimension from ``rules`` (logical axis -> mesh axis: a leaf's
    :data:`MESH_RULES` with its :data:`LEAF_RULES`), or None (replicated) where the
    dimension does not divide the mesh axis or a mesh axis is already used."""
    out = []
    for name, size in zip(axes, shape):
        target = rules.get(name)
        ways = mesh_shape.get(target, 1)
        # a mesh axis shards one dimension at most; a 1-way axis is the same as none
        ok = target is not None and target not in out and ways > 1 and size % ways == 0
        out.append(target if ok else None)
    return P(*out)


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_specs(params, mesh_shape: dict):
    """The :class:`PartitionSpec` of every leaf of ``params`` for a mesh of ``mesh_shape``
    (e.g. ``{"data": 2, "model": 4}``), by :data:`MESH_RULES` and :data:`LEAF_RULES`; a
    pytree like ``params``."""
    def spec(path, a):
        names = _path_names(path)
        return partition_spec(logical_axes(names, np.ndim(a)), np.shape(a), mesh_shape,
                              {**MESH_RULES, **LEAF_RULES.get(names, {})})

    return jax.tree_util.tree_map_with_path(spec, params)


def _put(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (host or device array, the same full value on every process) as a global
    array with ``sharding``."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # several processes: each builds only its own shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params, mesh: Mesh):
    """``params`` placed on ``mesh`` by :func:`param_specs` (already placed leaves stay)."""
    specs = param_specs(params, dict(mesh.shape))
    return jax.tree.map(lambda a, spec: _put(a, NamedSharding(mesh, spec)), params, specs)


def shard_model(model, mesh: Optional[Mesh]):
    """A copy of a :class:`jaxinterp.Model` with its parameters on ``mesh`` (None: as is)."""
    return model if mesh is None else dataclasses.replace(model, params=shard_params(model.params, mesh))


def pad_batch(batch: dict, multiple: int) -> dict:
    """Rows appended (copies of row 0 with ``weight`` 0) until the batch size is a
    multiple of ``multiple``: padded rows contribute nothing to weighted sums.
    Every leaf is ``[batch, ...]``."""
    n = len(batch["weight"])
    pad = (-n) % multiple
    if pad == 0:
        return batch
    idx = np.concatenate([np.arange(n), np.zeros(pad, int)])
    out = {k: np.asarray(v)[idx] for k, v in batch.items()}
    out["weight"] = np.concatenate([np.asarray(batch["weight"]), np.zeros(pad, np.float32)])
    return out


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """A data batch (``[batch, ...]`` leaves, with a ``weight`` field) padded to a
    multiple of the ``data`` axis and split over it."""
    axis = MESH_RULES["batch"]
    batch = pad_batch(batch, mesh.shape[axis])
    return {k: _put(v, NamedSharding(mesh, P(axis))) for k, v in batch.items()}


def shard_stacked(batches: Sequence[dict], mesh: Mesh) -> dict:
    """Batches stacked to ``[n_batches, batch, ...]`` leaves, each batch padded as
    :func:`shard_batch` pads it and split over the ``data`` axis along its second axis."""
    axis = MESH_RULES["batch"]
    batches = [pad_batch(b, mesh.shape[axis]) for b in batches]
    return {k: _put(np.stack([b[k] for b in batches]), NamedSharding(mesh, P(None, axis))) for k in batches[0]}


def replicate(x, mesh: Optional[Mesh]):
    """``x`` copied to every device of ``mesh`` (no mesh or no ``x``: unchanged)."""
    return x if mesh is None or x is None else _put(x, NamedSharding(mesh, P()))


def batches(pairs, batch_size: int, mesh: Optional[Mesh] = None) -> Iterator[dict]:
    """``pairs.batches(batch_size)``, sharded over ``mesh`` when one is given."""
    for batch in pairs.batches(batch_size):
        yield batch if mesh is None else shard_batch(batch, mesh)


def to_host(x) -> np.ndarray:
    """The full value of ``x`` as numpy on this process, also when its shards live on
    other processes (then every process must call this: it is a collective)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(mesh: Optional[Mesh]) -> str:
    if mesh is None:
        d = jax.devices()[0]
        return f"1 device ({d.platform}: {d.device_kind})"
    d = mesh.devices.flat[0]
    return (f"mesh data={mesh.shape['data']} x model={mesh.shape['model']} over {mesh.devices.size} "
            f"{d.platform} devices ({d.device_kind}), {jax.process_count()} process(es)")
