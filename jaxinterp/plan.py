"""``jaxinterp plan``: what a method costs on a model, from XLA itself, without weights.

:func:`plan` lowers and compiles one batch of a method's jitted program
(:func:`jaxinterp.attribution.batch_scores`, ``batch_exact``, or
:func:`jaxinterp.interventions.batch_circuit_metrics` for ``evaluate``) from abstract
arrays (``jax.ShapeDtypeStruct`` leaves of :func:`jaxinterp.memory.abstract_params`, with
the shardings of :mod:`jaxinterp.sharding` on a ``data x model`` mesh) and reports:

* XLA's per-device memory (``compiled.memory_analysis()``): arguments, outputs,
  temporaries, generated code; their peak ``argument + output + temp - alias``, next to
  :func:`jaxinterp.memory.estimate_peak_bytes` and the ratio between them;
* FLOPs per device, counted from the compiled (partitioned) HLO: every ``dot``'s
  ``2 x output elements x contracted size``, each loop body multiplied by its trip count,
  a conditional counted as its costliest branch (an upper bound).
  XLA's own ``cost_analysis()`` counts a ``while`` body once, and the layers run as one
  ``lax.scan`` (so do the integrated-gradient steps): its figure is reported too, but it
  undercounts by about the depth. Elementwise work is not counted (matmuls dominate);
  the tests check the count against the analytic ``forward_flops`` at a small shape;
* the bytes the dots read and write per device, from the same HLO: each dot's operands and
  result, as if each were moved once (what a matmul library moves at least, short of
  caches), and the time they take at a device's memory bandwidth (``memory_tbps``): the
  edge contractions read every upstream node's buffer in every layer with few output
  columns, so a program can be bound by memory bandwidth where its FLOPs say otherwise;
* the collectives' traffic per device, from the same HLO: the bytes of every collective's
  result by kind (an all-gather's is the gathered array), loop bodies times trip count;
* the analytic model FLOPs (``2 x non-embedding parameters x tokens x passes``, the usual
  MFU convention, :func:`model_flops`);
* lowering and compile time, and the time per batch the FLOPs imply at a device's peak
  (``peak_tflops``) at 100% and at an assumed model-FLOP utilisation (``mfu``).

Compiling on the CPU for a mesh larger than the host needs virtual devices:
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax starts; the command
line sets it from ``--mesh`` itself.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from typing import Optional

from .names import METHODS

PLAN_METHODS = METHODS + ("evaluate",)
DEFAULT_MFU = 0.4  # assumed model-FLOP utilisation for the implied time (stated in the output)


class PlanError(ValueError):
    """A plan that cannot be made as asked (the message says why)."""


# --- FLOPs from the compiled HLO -----------------------------------------------------------

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z]\w*\[[\d,]*\])")
_OPERAND = re.compile(r"(?:([a-z]\w*\[[\d,]*\])(?:\{[^}]*\})?\s+)?%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLEE = re.compile(r"\b(calls|to_apply|body|branch_computations|true_computation|false_computation|"
                     r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_BRANCHES = ("branch_computations", "true_computation", "false_computation")


def _dims(shape: str) -> Optional[list[int]]:
    m = _ARRAY.match(shape)
    return None if m is None else [int(d) for d in m.group(1).split(",") if d]


def _split_type(rest: str) -> tuple[str, str]:
    """``"f32[2,3]{1,0} dot(...)"`` -> ``("f32[2,3]{1,0}", "dot(...)")``; tuple types kept whole."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].strip()
    typ, _, op = rest.partition(" ")
    return typ, op.strip()


_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter",
                "collective-broadcast")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def _type_bytes(typ: str) -> int:
    """Bytes of an HLO type, ``f32[2,3]{1,0}`` or a tuple of them."""
    return sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]", typ))


def hlo_costs(hlo_text: str) -> dict:
    """Matmul FLOPs and bytes, and collective traffic, of an HLO module's text
    (``compiled.as_text()``).

    FLOPs: ``2 x prod(output) x prod(contracted lhs dims)`` per ``dot``; dot bytes: its two
    operands' and its result's bytes, what a matmul reads and writes if each is moved
    once. Collectives: the bytes of each collective's result per kind (``all-gather``: the
    gathered array; an asynchronous pair is counted at its ``-done``), what each device
    receives or holds afterwards, a proxy for its traffic. All through fusions and calls, with every
    ``while`` body multiplied by its ``known_trip_count`` and a ``conditional`` counted as
    its costliest branch (an upper bound: the scanned layers' per-segment branches,
    :func:`jaxinterp.models._segments`, are all counted as the last segment's). Returns
    ``{"flops", "dot_bytes", "collective_bytes": {kind: bytes}, "dots", "unknown_trip_counts",
    "convolutions"}`` (loops without a known count are counted once; convolutions are not
    counted)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            comps[current] = [line]
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    stats = {"dots": 0, "unknown_trip_counts": 0, "convolutions": 0}
    memo: dict[str, dict] = {}

    def add(into: dict, other: dict, factor: int = 1) -> None:
        for k, v in other.items():
            into[k] = into.get(k, 0) + factor * v

    def total(name: str) -> dict:
        """``{"flops": ..., collective kind: bytes, ...}`` of computation ``name``."""
        if name in memo:
            return memo[name]
        memo[name] = {}  # a cycle cannot occur in HLO; this only guards the recursion
        lines = comps.get(name, [])
        types = dict(_PARAM.findall(lines[0])) if lines else {}
        costs = {"flops": 0.0, "dot_bytes": 0}
        for line in lines[1:]:
            m = _INSTR.match(line)
            if m is None:
                continue
            iname, (typ, op) = m.group(1), _split_type(m.group(2))
            types[iname] = typ
            opname = op.split("(", 1)[0]
            if opname == "dot":
                # the operands, their types printed inline where they are (types hold no ")")
                operands = [t or types.get(n) for t, n in _OPERAND.findall(op[len("dot("):].split(")", 1)[0])]
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", op)
                lhs_dims = _dims(operands[0]) if len(operands) == 2 and None not in operands else None
                out = _dims(typ)
                if lhs_dims is None or out is None or contract is None:
                    raise ValueError(f"cannot read the dot {iname!r} in computation {name!r}")
                k = math.prod(lhs_dims[int(c)] for c in contract.group(1).split(",") if c)
                costs["flops"] += 2.0 * math.prod(out) * k
                costs["dot_bytes"] += sum(_type_bytes(t) for t in operands) + _type_bytes(typ)
                stats["dots"] += 1
            elif opname == "convolution":
                stats["convolutions"] += 1
            elif opname.removesuffix("-done") in _COLLECTIVES:
                kind = opname.removesuffix("-done")
                costs[kind] = costs.get(kind, 0) + _type_bytes(typ)
            branches = []
            for kind, callees in _CALLEE.findall(op):
                names = re.findall(r"%?([\w.\-]+)", callees)
                if kind in _BRANCHES:  # one branch runs: counted below
                    branches += names
                    continue
                factor = 1
                if kind == "body":
                    trip = _TRIP.search(op)
                    if trip is None:
                        stats["unknown_trip_counts"] += 1
                    else:
                        factor = int(trip.group(1))
                for callee in names:
                    add(costs, total(callee), factor)
            if branches:  # a conditional: its costliest branch, an upper bound
                add(costs, max((total(b) for b in branches), key=lambda c: c.get("flops", 0.0)))
        memo[name] = costs
        return costs

    costs = total(entry)
    return {"flops": costs.pop("flops"), "dot_bytes": costs.pop("dot_bytes"), "collective_bytes": costs, **stats}


def forward_flops(cfg, batch_size: int, n_pos: int, logit_positions: Optional[int] = None) -> int:
    """Matmul FLOPs of one plain forward pass (:func:`jaxinterp.models.forward` without an
    intervention) on ``batch_size x n_pos`` tokens: q/k/v/o and MLP projections, attention
    scores and values over all ``n_pos`` keys (causality is a mask, not skipped work), and
    the unembedding at ``logit_positions`` positions per prompt (default: every position)."""
    d, dh, h, k = cfg.d_model, cfg.d_head, cfg.n_heads, cfg.n_kv_heads
    per_token_layer = (2 * d * dh * (h + 2 * k) + 2 * h * dh * d + 2 * 2 * h * n_pos * dh
                       + 2 * d * cfg.d_mlp * (3 if cfg.gated_mlp else 2))
    tokens = batch_size * n_pos
    unembed = 2 * d * cfg.vocab_size * batch_size * (n_pos if logit_positions is None else logit_positions)
    return cfg.n_layers * per_token_layer * tokens + unembed


# passes of a forward's cost per method: the backward differentiates with respect to
# activations only, about one forward (bench_large's convention)
_PASSES = {"EAP": lambda s: 3, "clean-corrupted": lambda s: 6, "EAP-IG-inputs": lambda s: 2 + 2 * s,
           "evaluate": lambda s: 3}


def model_flops(cfg, method: str, batch_size: int, n_pos: int, ig_steps: int = 5,
                n_circuits: int = 1) -> Optional[int]:
    """Analytic model FLOPs of one batch: ``2 x non-embedding parameters x tokens`` per
    forward-pass equivalent (clean + corrupted runs, plus a backward per gradient, plus
    one graph forward per circuit for ``evaluate``); None where there is no such count
    (``EAP-IG-activations``, ``exact``)."""
    from .memory import abstract_params

    if method not in _PASSES:
        return None
    blocks = abstract_params(cfg)["blocks"]
    import jax

    non_embedding = sum(math.prod(a.shape) for a in jax.tree.leaves(blocks))
    passes = _PASSES[method](ig_steps) + (n_circuits - 1 if method == "evaluate" else 0)
    return 2 * non_embedding * batch_size * n_pos * passes


# --- the programs, from abstract arrays ------------------------------------------------------

def _abstract(shape, dtype, sharding=None):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_batch(batch_size: int, n_pos: int, sharding=None) -> dict:
    """A data batch (:meth:`jaxinterp.data.Pairs.batches`) of ``batch_size`` prompt pairs of
    ``n_pos`` tokens, as abstract arrays (``sharding``: over the batch axis)."""
    import jax.numpy as jnp

    i32, b, p = jnp.int32, batch_size, n_pos
    return {"clean": _abstract((b, p), i32, sharding), "corrupted": _abstract((b, p), i32, sharding),
            "attention_mask": _abstract((b, p), i32, sharding), "lengths": _abstract((b,), i32, sharding),
            "labels": _abstract((b, 2), i32, sharding), "weight": _abstract((b,), jnp.float32, sharding)}


def program(cfg, method: str, params, batch, mesh=None, ig_steps: int = 5, metric: str = "logit_diff",
            exact_chunk: int = 64, n_circuits: int = 1, remat: bool = False, grouped_kv: bool = False):
    """``(jitted function, positional arguments, static keyword arguments)`` of one batch of
    ``method`` on ``params`` and ``batch`` (real or abstract arrays) over the graph in the
    view ``grouped_kv``: the adapter between a method's name and the library's per-batch
    program, whose signatures evolve."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from .graph import GraphSpec
    from .interventions import TaskMetric

    if method not in PLAN_METHODS:
        raise PlanError(f"unknown method {method!r}; choose from {PLAN_METHODS}")
    task = TaskMetric(metric)
    replicated = None if mesh is None else NamedSharding(mesh, P())
    spec = GraphSpec.from_config(cfg, grouped_kv)
    if method == "evaluate":
        from .interventions import batch_circuit_metrics as fn

        masks = _abstract((n_circuits, spec.n_forward, spec.n_backward), jnp.bool_, replicated)
        kw = dict(cfg=cfg, metric=task, intervention="patching")
        if "chunk" in inspect.signature(fn).parameters:
            kw["chunk"] = min(n_circuits, 8)
        return fn, (params, batch, masks), kw
    if method == "exact":
        from .attribution import batch_exact as fn

        edges = _abstract((exact_chunk,), jnp.int32, replicated)
        layer = _abstract((), jnp.int32, replicated)
        return fn, (params, batch, layer, edges, edges), dict(cfg=cfg, metric=task, grouped_kv=grouped_kv)
    from .attribution import batch_scores as fn

    steps = ig_steps if method in ("EAP-IG-inputs", "EAP-IG-activations") else 1
    return fn, (params, batch), dict(cfg=cfg, method=method, metric=task, ig_steps=steps, remat=remat,
                                     grouped_kv=grouped_kv)


def memory_figures(compiled) -> dict:
    """XLA's per-device memory of a compiled program, bytes; ``peak`` = arguments +
    outputs + temporaries - aliased (as :func:`jaxinterp.attribution.compiled_peak_bytes`)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias",
                                                                "generated_code")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def check_mesh(cfg, data: int, model: int) -> None:
    """Refuse a ``model`` axis that does not divide the attention heads (they are what it
    splits; :mod:`jaxinterp.sharding` would silently replicate them instead)."""
    if data < 1 or model < 1:
        raise PlanError(f"mesh sizes must be >= 1, got {data}x{model}")
    if model > 1 and cfg.n_heads % model:
        raise PlanError(f"mesh {data}x{model}: a {model}-way model axis does not divide the model's "
                        f"{cfg.n_heads} attention heads")


def _mesh(data: int, model: int, cfg):
    check_mesh(cfg, data, model)
    if data * model == 1:
        return None
    from .sharding import make_mesh

    return make_mesh(data, model)


def plan(cfg, method: str = "EAP", batch_size: int = 1, n_pos: int = 64, dtype: str = "float32",
         mesh_shape: tuple[int, int] = (1, 1), ig_steps: int = 5, metric: str = "logit_diff",
         peak_tflops: Optional[float] = None, mfu: float = DEFAULT_MFU, exact_chunk: int = 64,
         n_circuits: int = 1, remat: bool = False, grouped_kv: bool = False,
         memory_tbps: Optional[float] = None) -> dict:
    """Lower and compile one batch of ``method`` on a model of config ``cfg`` (no weights)
    for ``batch_size`` prompt pairs of ``n_pos`` tokens in ``dtype`` on a ``mesh_shape =
    (data, model)`` mesh of this process's devices; the module docstring lists the figures
    (memory and FLOPs per device). ``batch_size`` is padded up to a multiple of ``data``,
    as a real run pads its batches. ``grouped_kv``: the circuit graph's grouped-query view
    (``load_model(..., grouped_kv=True)``). ``memory_tbps``: a device's memory bandwidth in
    TB/s, for the time its dots' bytes take to move."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from . import memory
    from .graph import GraphSpec
    from .sharding import on_mesh, param_specs

    if method not in PLAN_METHODS:
        raise PlanError(f"unknown method {method!r}; choose from {PLAN_METHODS}")
    if batch_size < 1 or n_pos < 1 or ig_steps < 1 or n_circuits < 1 or exact_chunk < 1:
        raise PlanError("batch size, positions, ig_steps, circuits and exact_chunk must be >= 1")
    if n_pos > cfg.n_ctx:
        raise PlanError(f"{n_pos} positions exceed the model's context of {cfg.n_ctx}")
    if method == "exact" and cfg.per_input_heads:
        raise PlanError("exact is not offered with gemma2_heads='per-input' (its runs start at the destination's "
                        "layer, which needs the scanned layers; per-input heads run unrolled)")
    if not 0 < mfu <= 1:
        raise PlanError(f"mfu must be in (0, 1], got {mfu}")
    if memory_tbps is not None and not memory_tbps > 0:
        raise PlanError(f"memory bandwidth must be > 0 TB/s, got {memory_tbps}")
    data, model = mesh_shape
    mesh = _mesh(data, model, cfg)
    spec = GraphSpec.from_config(cfg, grouped_kv)
    batch_padded = math.ceil(batch_size / data) * data
    dt = jnp.dtype(dtype)
    params = memory.abstract_params(cfg, dt)
    if mesh is not None:
        specs = param_specs(params, dict(mesh.shape))
        params = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, NamedSharding(mesh, s)), params, specs)
    batch = abstract_batch(batch_padded, n_pos, None if mesh is None else NamedSharding(mesh, P("data")))
    fn, args, kw = program(cfg, method, params, batch, mesh, ig_steps, metric, exact_chunk, n_circuits, remat,
                           grouped_kv)

    t = time.perf_counter()
    with on_mesh(mesh):  # node outputs split over the model axis (jaxinterp.sharding)
        lowered = fn.lower(*args, **kw)
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t

    mem = memory_figures(compiled)
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    dots = hlo_costs(compiled.as_text())
    n_devices = data * model
    est = None
    if method != "evaluate":  # memory.estimate_peak_bytes models the attribution methods
        est = memory.estimate_peak_bytes(cfg, batch_padded, n_pos, method, dt, exact_chunk, data, model, grouped_kv)
    mf = model_flops(cfg, method, batch_padded, n_pos, ig_steps, n_circuits)
    result = {
        "method": method, "batch_size": batch_size, "batch_size_padded": batch_padded, "n_pos": n_pos,
        "dtype": str(dt), "mesh": {"data": data, "model": model}, "devices": n_devices,
        "platform": jax.devices()[0].platform, "ig_steps": ig_steps if "IG" in method else None,
        "n_circuits": n_circuits if method == "evaluate" else None, "remat": remat,
        "n_layers": cfg.n_layers, "n_params": memory.param_count(cfg), "n_edges": spec.n_edges,
        "gemma2_heads": cfg.gemma2_heads if cfg.sandwich_norms else None,
        "lower_s": t_lower, "compile_s": t_compile,
        "memory_per_device": mem, "estimate_peak_bytes": est,
        "estimate_over_xla": (est / mem["peak"]) if est and mem.get("peak") else None,
        "flops_per_device": dots["flops"],
        "flops_method": "dot FLOPs of the compiled per-device HLO, loop bodies x trip count",
        "flops_total": dots["flops"] * n_devices,
        "hlo_dots": dots["dots"], "hlo_unknown_trip_counts": dots["unknown_trip_counts"],
        "xla_cost_analysis_flops": float(cost.get("flops", 0.0)) or None,
        "collective_bytes_per_device": dots["collective_bytes"],
        "dot_bytes_per_device": dots["dot_bytes"], "memory_tbps": memory_tbps,
        "model_flops": mf, "flops_over_model_flops": (dots["flops"] * n_devices / mf) if mf else None,
        "peak_tflops": peak_tflops, "mfu_assumed": mfu,
    }
    if peak_tflops:
        at_peak = dots["flops"] / (peak_tflops * 1e12)  # per device: the devices run in parallel
        result.update(seconds_at_peak=at_peak, seconds_at_mfu=at_peak / mfu,
                      examples_per_s_at_mfu=batch_size / (at_peak / mfu))
    if memory_tbps:
        result["dot_seconds_at_bandwidth"] = dots["dot_bytes"] / (memory_tbps * 1e12)
    return result


def format_plan(r: dict) -> str:
    """The figures of :func:`plan` as lines of text."""
    from .memory import format_bytes

    mem = r["memory_per_device"]
    lines = [f"{r['method']}: batch {r['batch_size']}"
             + (f" (padded to {r['batch_size_padded']})" if r["batch_size_padded"] != r["batch_size"] else "")
             + f" x {r['n_pos']} positions, {r['dtype']}, mesh data={r['mesh']['data']} x model={r['mesh']['model']}"
             f" ({r['devices']} {r['platform']} device(s)); {r['n_layers']} layers, {r['n_params'] / 1e9:.3g}B "
             f"parameters, {r['n_edges']:,} edges",
             f"  lowering {r['lower_s']:.1f}s, compile {r['compile_s']:.1f}s"]
    if mem:
        lines.append(f"  XLA memory per device: peak {format_bytes(mem['peak'])} = arguments "
                     f"{format_bytes(mem['argument'])} + outputs {format_bytes(mem['output'])} + temporaries "
                     f"{format_bytes(mem['temp'])} - aliased {format_bytes(mem['alias'])}; generated code "
                     f"{format_bytes(mem['generated_code'])}")
    if r["estimate_peak_bytes"] is not None:
        ratio = f" ({r['estimate_over_xla']:.2f}x XLA's peak)" if r["estimate_over_xla"] else ""
        lines.append(f"  memory.estimate_peak_bytes: {format_bytes(r['estimate_peak_bytes'])}{ratio}")
    lines.append(f"  FLOPs per device {r['flops_per_device']:.3e} ({r['flops_method']}; XLA's cost_analysis, "
                 f"which counts each loop body once: {r['xla_cost_analysis_flops'] or 0:.3e})")
    if r["collective_bytes_per_device"]:
        kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(r["collective_bytes_per_device"].items()))
        lines.append(f"  collectives per device (their results' bytes, loop bodies x trip count): {kinds}")
    if r.get("dot_bytes_per_device") is not None:
        at = (f"; at {r['memory_tbps']:g} TB/s: {r['dot_seconds_at_bandwidth'] * 1e3:.1f} ms"
              if r.get("dot_seconds_at_bandwidth") is not None else "")
        intensity = r["flops_per_device"] / max(r["dot_bytes_per_device"], 1)
        lines.append(f"  dots' operands and results per device {format_bytes(r['dot_bytes_per_device'])} (each moved "
                     f"once, loop bodies x trip count; {intensity:.0f} FLOP per byte){at}")
    if r["model_flops"]:
        lines.append(f"  analytic model FLOPs (2 x non-embedding params x tokens x passes) {r['model_flops']:.3e}; "
                     f"counted / analytic {r['flops_over_model_flops']:.2f}")
    if r.get("seconds_at_peak") is not None:
        lines.append(f"  at {r['peak_tflops']:g} TFLOP/s per device: {r['seconds_at_peak'] * 1e3:.1f} ms per batch at "
                     f"100% utilisation, {r['seconds_at_mfu'] * 1e3:.1f} ms at an assumed {r['mfu_assumed']:.0%} "
                     f"({r['examples_per_s_at_mfu']:.1f} examples/s)")
    return "\n".join(lines)


def set_virtual_devices(n: int) -> None:
    """Ask for ``n`` CPU devices (``--xla_force_host_platform_device_count``) and the CPU
    platform; must run before jax initialises its backends. Raises :class:`PlanError`
    when it is too late and there are fewer devices."""
    import os

    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    import jax

    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API: assume not started
        started = False
    if not started:
        jax.config.update("jax_platforms", "cpu")
    elif len(jax.devices()) < n:
        raise PlanError(f"jax has already started with {len(jax.devices())} device(s), fewer than the {n} the mesh "
                        f"needs; set XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts")


__all__ = ["PLAN_METHODS", "DEFAULT_MFU", "PlanError", "plan", "check_mesh", "format_plan", "program", "abstract_batch",
           "hlo_costs", "forward_flops", "model_flops", "memory_figures", "set_virtual_devices"]
