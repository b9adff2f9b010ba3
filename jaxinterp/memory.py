"""How much device memory attribution and circuit evaluation need, and the largest batch
(or number of circuits per call) that fits.

:func:`estimate_peak_bytes` is an analytical *upper-bound* estimate of one compiled
batch of :func:`jaxinterp.attribution.batch_scores` (or ``batch_exact``) per device,
from the config, the batch shape and the method alone: no weights, no compilation.
:func:`pick_micro_batch` inverts it. :func:`jaxinterp.attribution.compiled_peak_bytes`
asks XLA for the same figure of the real compiled program (it compiles, so it is slow for
large models); the tests check the estimate against it. (It lives with the methods it
compiles: this module is imported by them and imports none of them.)

What lives at the peak of a gradient method (bytes per example and position unless
stated; ``s`` is the activation dtype's size, graph sizes from :class:`GraphSpec`)::

    parameters                    param_count(cfg) * s           (once, not per example; on a mesh
                                  the leaves split over ``model`` count 1/model: param_bytes)
    node outputs                  NODE_COPIES * n_forward * d_model * s
                                  (corrupted outputs, and this run's, kept for the backward;
                                  UNROLLED_NODE_COPIES with the layers unrolled, where XLA
                                  also keeps delta, the edge probes' difference of the two)
    per-edge inputs               EDGE_COPIES * n_backward * d_model * s
                                  (the normed q/k/v/MLP inputs kept for the backward)
    attention                     ATTN_COPIES * n_layers * n_heads * pos * 4
                                  (logits, probabilities, their cotangent: float32)
    MLP hidden units              MLP_COPIES * n_layers * d_mlp * s
    logits                        LOGIT_COPIES * vocab * 4 (per example: the metric
                                  reads one position)

Gemma 2's block holds more per layer (fitted to XLA's figure of a 2-layer Gemma 2 shape,
both head definitions, batch 4..16, 16..32 positions, EAP and both EAP-IG methods: the
estimate was 0.83x..1.04x of it without these terms, 1.02x..1.52x with them, and with
clean-corrupted's two runs below)::

    sandwich norms                SANDWICH_COPIES * n_layers * d_model * s
                                  (the post-norms' inputs and outputs)
                                  + SANDWICH_MLP_COPIES * n_layers * d_mlp * s
                                  (its gated tanh-GELU MLP's intermediates)
    attention logit soft-cap      SOFTCAP_COPIES * n_layers * n_heads * pos * 4
                                  (the logits before and after the tanh)

``clean-corrupted`` takes the gradient of two runs in one program, and XLA keeps both
runs' activations (1.35x..1.76x of EAP's figure on Llama and Gemma 2 shapes): its
activations count twice. With ``gemma2_heads="per-input"`` the layers always run unrolled
and the gradient methods' programs are those of the shared definition without the heads'
shares (XLA's figure was 0.91x..0.95x of the shared one's): the same estimate bounds both.

``exact`` runs ``exact_chunk`` patched forward passes at once without a backward pass:
each holds one layer's per-edge inputs (``EXACT_EDGE_COPIES``) and attention at a time.
The copy counts were fitted to XLA's own memory analysis (``compiled_peak_bytes``,
CPU, jax 0.10) of GPT-2-, Llama-(GQA, gated) shaped models at batch 4..32 and 16..32
positions: the estimate was 1.1x..2.1x XLA's figure; compiled with jaxinterp.compiler's
options (YNN reduce fusions off) one program needed 4% more than that, so SAFETY went from
1.25 to 1.35 (tests/test_memory.py keeps it an
upper bound). A mesh divides parameters by its ``model`` axis and examples by its ``data``
axis. The gradient methods' node outputs and edge inputs are divided by the ``model`` axis
too where it divides d_model: they are split along d_model
(:func:`jaxinterp.sharding.split_nodes`), and so are ``exact``'s node outputs and its
patched runs' edge inputs (counted replicated until session 20: 27x XLA's figure for
Llama-3.2-1B on 1x8, now 4.7x; 3.2-3.8x on GPT-2-small 2x4, Gemma-2-2B 1x8, Qwen2.5-0.5B
2x2 and Llama-3-70B 1x8, 3.75x on one device). Attention and MLP units are counted as if
replicated (an upper bound).
Against XLA's figure on meshes (``jaxinterp plan``, 8 x 64 tokens): Llama-3-70B on 1x8
and 1x16, 1.83-2.13x for EAP and the EAP-IG methods (on 1x16 EAP 2.27x and EAP-IG-inputs
2.23x since session 20, whose layout splits the k/v weights too), 3.1-3.3x for clean-corrupted;
Llama-3.2-1B on 1x8, GPT-2-small on 2x4, Gemma-2-2B on 1x8 and Qwen2.5-0.5B on 2x2
(smaller batches), 1.31-3.49x (tests/test_plan.py keeps it an upper bound on a 1x4 mesh).
"""

from __future__ import annotations

import math
import re
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import layout
from .config import ModelConfig
from .graph import GraphSpec
from .models import use_scan
from .sharding import node_ways, param_specs

# Fitted to XLA's memory analysis with a margin (module docstring).
NODE_COPIES = 2
UNROLLED_NODE_COPIES = 3  # delta beside them too (XLA: +5..12% at 2 layers since delta became one array)
EDGE_COPIES = 1
ATTN_COPIES = 3
MLP_COPIES = 3
LOGIT_COPIES = 4
EXACT_EDGE_COPIES = 3  # per patched run of ``exact``: edge inputs, their norm, the sum
SANDWICH_COPIES = 4
SANDWICH_MLP_COPIES = 2
SOFTCAP_COPIES = 2
SAFETY = 1.35  # XLA's buffer assignment varies with the batch size and its options (fusion, scheduling)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class OutOfMemoryError(MemoryError):
    """The device ran out of memory; the message says which options lower the peak."""


def parse_bytes(text: Union[str, int, float]) -> int:
    """``"70GB"`` -> 70e9, ``"512MiB"`` -> 512 * 2**20, ``"1.5 gb"``, ``1000`` -> bytes.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB)
    powers of 1024; a bare number is bytes.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 70GB, 512MiB or 1000000")
        value, unit = float(m.group(1)), m.group(2).lower()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return n


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """The parameter pytree of ``cfg`` (the table in :mod:`jaxinterp.layout`) as
    ``jax.ShapeDtypeStruct`` leaves: shapes without weights, to count bytes or to
    compile for a model that is not loaded."""
    return layout.abstract_params(cfg, dtype)


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters (tied embeddings counted twice, as they are stored)."""
    return layout.param_count(cfg)


def param_bytes(cfg: ModelConfig, itemsize: int, model_devices: int = 1) -> float:
    """Parameter bytes on one device of a ``model_devices``-way model axis: a leaf that
    :func:`jaxinterp.sharding.param_specs` splits counts 1/model_devices, one it replicates
    (e.g. GPT-2's 50,257-row embedding on 4 devices) in full."""
    params = abstract_params(cfg)
    specs = param_specs(params, {"data": 1, "model": model_devices})
    return sum(a.size * itemsize / (model_devices if "model" in tuple(spec) else 1)
               for a, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))))


def _per_token_bytes(cfg: ModelConfig, n_pos: int, s: int, method: str, exact_chunk: int,
                     grouped_kv: bool = False, model_devices: int = 1) -> float:
    """Activation bytes per example and position (module docstring) on one device of a
    ``model_devices``-way model axis."""
    spec = GraphSpec.from_config(cfg, grouped_kv)
    L, H, D = cfg.n_layers, cfg.n_heads, cfg.d_model
    split = node_ways(D, model_devices)
    nodes = NODE_COPIES * spec.n_forward * D * s / split
    if method == "exact":
        # each of the exact_chunk patched runs holds one layer's edge inputs (split along
        # d_model like the node outputs they are mixed from) and attention
        per_run = (EXACT_EDGE_COPIES * (spec.n_attn_inputs + 1) * D * s / split + ATTN_COPIES * H * n_pos * 4
                   + MLP_COPIES * cfg.d_mlp * s)
        return nodes + exact_chunk * per_run
    edges = EDGE_COPIES * spec.n_backward * D * s / split
    attn = ATTN_COPIES * L * H * n_pos * 4
    mlp = MLP_COPIES * L * cfg.d_mlp * s
    gemma2 = 0
    if cfg.sandwich_norms:
        gemma2 += SANDWICH_COPIES * L * D * s + SANDWICH_MLP_COPIES * L * cfg.d_mlp * s
    if cfg.attn_logit_softcap:
        gemma2 += SOFTCAP_COPIES * L * H * n_pos * 4
    if not use_scan(cfg):  # the edge probes' delta, kept beside both runs' outputs (module docstring)
        nodes += (UNROLLED_NODE_COPIES - NODE_COPIES) * spec.n_forward * D * s / split
    runs = 2 if method == "clean-corrupted" else 1  # two runs' activations in one program (module docstring)
    return runs * (nodes + edges + attn + mlp + gemma2)


def estimate_peak_bytes(cfg: ModelConfig, batch_size: int, n_pos: int, method: str = "EAP-IG-inputs",
                        dtype=jnp.float32, exact_chunk: int = 64, data_devices: int = 1,
                        model_devices: int = 1, grouped_kv: bool = False) -> int:
    """Upper-bound estimate of the peak device memory of one attribution batch of
    ``batch_size`` prompt pairs of ``n_pos`` tokens, per device of a ``data_devices x
    model_devices`` mesh, over the graph in the view ``grouped_kv`` (``Model.grouped_kv``).
    Integrated-gradient steps run one after the other (a scan), so ``ig_steps`` does not
    change the peak. Monotone in ``batch_size`` and ``n_pos``."""
    if batch_size < 1 or n_pos < 1:
        raise ValueError(f"batch_size and n_pos must be >= 1, got {batch_size}, {n_pos}")
    s = jnp.dtype(dtype).itemsize
    params = param_bytes(cfg, s, model_devices)
    local = math.ceil(batch_size / data_devices)
    spec = GraphSpec.from_config(cfg, grouped_kv)
    acts = local * n_pos * _per_token_bytes(cfg, n_pos, s, method, exact_chunk, grouped_kv, model_devices)
    logits = local * LOGIT_COPIES * cfg.vocab_size * 4
    scores = 3 * spec.n_forward * spec.n_backward * 4  # the float32 [src, dst] gradient and its sum
    return int(SAFETY * (params + acts + logits + scores))


def pick_micro_batch(cfg: ModelConfig, n_pos: int, method: str, max_memory_bytes: int, dtype=jnp.float32,
                     exact_chunk: int = 64, data_devices: int = 1, model_devices: int = 1,
                     limit: int = 1 << 20, grouped_kv: bool = False) -> int:
    """The largest batch size (at most ``limit``, a multiple of ``data_devices``) whose
    :func:`estimate_peak_bytes` is within ``max_memory_bytes``; raises
    :class:`OutOfMemoryError` when not even one example per data device fits."""
    est = lambda b: estimate_peak_bytes(cfg, b, n_pos, method, dtype, exact_chunk,  # noqa: E731
                                        data_devices, model_devices, grouped_kv)
    step = data_devices  # a batch that does not divide the data axis is padded up anyway
    if est(step) > max_memory_bytes:
        raise OutOfMemoryError(
            f"{method} on prompts of {n_pos} tokens needs about {format_bytes(est(step))} per device for a batch "
            f"of {step}, more than the {format_bytes(max_memory_bytes)} allowed: shard the model over more "
            f"devices (--mesh DxM), use bfloat16 (--dtype bfloat16) or --remat, or shorten the prompts")
    lo, hi = 1, max(1, limit // step)  # in units of `step`; est is monotone: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if est(mid * step) <= max_memory_bytes else (lo, mid - 1)
    return lo * step


# Circuit evaluation (``interventions.batch_circuit_metrics``, scanned layers): the
# corrupted run's node outputs and the scan's stacked copy once, then per circuit evaluated
# at once this run's outputs, their difference from the corrupted ones and a layer's edge
# inputs, in units of one ``[src, batch, pos, d_model]`` array (tests/test_memory.py keeps
# the estimate above XLA's figure; measured 4.4 of them at chunk 1 and 11.2 at chunk 4).
# On a mesh the node outputs and the patched runs' buffers are split along d_model over
# ``model`` (sharding.split_nodes): 1.31-2.38x XLA's figure on Llama-3.2-1B 1x8, GPT-2-small
# 2x4, Gemma-2-2B 1x8, Qwen2.5-0.5B 2x2 and Llama-3-70B 1x8 at 1-4 circuits per call.
EVAL_BASE_COPIES = 3
EVAL_CIRCUIT_COPIES = 3


def _per_input_copies(cfg: ModelConfig) -> int:
    """More node-output arrays per circuit with per-input Gemma 2 heads, whose circuits run
    the unrolled forward with a group of node outputs per layer: its temporaries grow with
    depth (measured 4.3, 6.3 and 8.7 arrays per circuit at 4, 8 and 12 layers, batch 8 x 24,
    against 3 for the scanned forward)."""
    return math.ceil(cfg.n_layers / 2) if cfg.per_input_heads else 0


def evaluation_peak_bytes(cfg: ModelConfig, batch_size: int, n_pos: int, chunk: int, n_circuits: int = 1,
                          dtype=jnp.float32, data_devices: int = 1, model_devices: int = 1,
                          grouped_kv: bool = False) -> int:
    """Upper-bound estimate of the peak device memory of one batch of circuit evaluation:
    ``n_circuits`` masks, ``chunk`` of them run at once (``jax.lax.map(batch_size=chunk)``),
    on ``batch_size`` prompt pairs of ``n_pos`` tokens. Monotone in ``chunk``."""
    if min(batch_size, n_pos, chunk, n_circuits) < 1:
        raise ValueError(f"batch_size, n_pos, chunk and n_circuits must be >= 1, got {batch_size}, {n_pos}, "
                         f"{chunk}, {n_circuits}")
    s = jnp.dtype(dtype).itemsize
    spec = GraphSpec.from_config(cfg, grouped_kv)
    local = math.ceil(batch_size / data_devices)
    params = param_bytes(cfg, s, model_devices)
    split = node_ways(cfg.d_model, model_devices)
    node_outputs = local * n_pos * spec.n_forward * cfg.d_model * s / split
    # one layer at a time (scanned) per circuit: attention probabilities and MLP hidden units
    layer = local * n_pos * (ATTN_COPIES * cfg.n_heads * n_pos * 4 + MLP_COPIES * cfg.d_mlp * s)
    logits = local * LOGIT_COPIES * cfg.vocab_size * 4
    masks = n_circuits * spec.n_forward * spec.n_backward  # bool, all circuits are one argument
    per_circuit = (EVAL_CIRCUIT_COPIES + _per_input_copies(cfg)) * node_outputs + layer + logits
    return int(SAFETY * (params + masks + EVAL_BASE_COPIES * node_outputs + logits + chunk * per_circuit))


def circuits_per_call(cfg: ModelConfig, batch_size: int, n_pos: int, n_circuits: int, max_memory_bytes: int,
                      dtype=jnp.float32, data_devices: int = 1, model_devices: int = 1,
                      grouped_kv: bool = False) -> int:
    """The most circuits (at most ``n_circuits``) one evaluation call may run at once within
    ``max_memory_bytes`` (:func:`evaluation_peak_bytes`); :class:`OutOfMemoryError` when
    not even one fits."""
    est = lambda c: evaluation_peak_bytes(cfg, batch_size, n_pos, c, n_circuits, dtype,  # noqa: E731
                                          data_devices, model_devices, grouped_kv)
    if est(1) > max_memory_bytes:
        raise OutOfMemoryError(
            f"evaluating one circuit on a batch of {batch_size} prompts of {n_pos} tokens needs about "
            f"{format_bytes(est(1))} per device, more than the {format_bytes(max_memory_bytes)} allowed: use a "
            f"smaller --batch-size, shard over more devices (--mesh DxM) or bfloat16 (--dtype bfloat16)")
    lo, hi = 1, n_circuits  # est is monotone in the chunk: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if est(mid) <= max_memory_bytes else (lo, mid - 1)
    return lo


MAX_DEFAULT_CIRCUITS = 8  # more circuits per call save little time on a CPU and cost memory on every device


def default_circuits_per_call(cfg: ModelConfig, batch_size: int, n_pos: int, n_circuits: int, dtype=jnp.float32,
                              data_devices: int = 1, model_devices: int = 1, grouped_kv: bool = False) -> int:
    """Circuits per evaluation call when no memory budget is given: as many as fit (at most
    :data:`MAX_DEFAULT_CIRCUITS`) in :func:`estimate_peak_bytes` of EAP on the same batch,
    so that a faithfulness curve never asks for more memory than attributing the edges
    did; one where not even that fits."""
    budget = estimate_peak_bytes(cfg, batch_size, n_pos, "EAP", dtype, data_devices=data_devices,
                                 model_devices=model_devices, grouped_kv=grouped_kv)
    try:
        return circuits_per_call(cfg, batch_size, n_pos, min(n_circuits, MAX_DEFAULT_CIRCUITS), budget, dtype,
                                 data_devices, model_devices, grouped_kv)
    except OutOfMemoryError:
        return 1


def is_resource_exhausted(error: BaseException) -> bool:
    """Whether ``error`` is XLA's out-of-memory error (``RESOURCE_EXHAUSTED``)."""
    return isinstance(error, getattr(jax.errors, "JaxRuntimeError", RuntimeError)) and \
        "RESOURCE_EXHAUSTED" in str(error)


def out_of_memory_message(error: BaseException, method: str, batch: str) -> str:
    """An actionable message for XLA's ``RESOURCE_EXHAUSTED`` during attribution; ``batch``
    says which batch size ran out (e.g. ``"batch size 64"``)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{method}: out of device memory at {batch}: {first}. Lower --batch-size, "
            f"or pass --max-memory SIZE (e.g. --max-memory 70GB; Python: max_memory=) to pick the largest batch "
            f"that fits; --remat, --dtype bfloat16 and --mesh DxM lower the peak further")


def batch_size_for(model, pairs, method: str, max_memory: Union[str, int], mesh=None, exact_chunk: int = 64,
                   quiet: bool = True) -> int:
    """The batch size :func:`jaxinterp.attribution.attribute` uses under ``max_memory``:
    :func:`pick_micro_batch` for ``model``'s config and dtype, the prompts' length and the
    mesh, at most the number of examples (rounded up to the ``data`` axis)."""
    data = mesh.shape["data"] if mesh is not None else 1
    model_ways = mesh.shape["model"] if mesh is not None else 1
    dtype = jax.tree.leaves(model.params)[0].dtype
    limit = math.ceil(len(pairs) / data) * data
    size = pick_micro_batch(model.cfg, pairs.n_pos, method, parse_bytes(max_memory), dtype, exact_chunk, data,
                            model_ways, limit=limit, grouped_kv=model.grouped_kv)
    if not quiet:
        est = estimate_peak_bytes(model.cfg, size, pairs.n_pos, method, dtype, exact_chunk, data, model_ways,
                                  model.grouped_kv)
        print(f"max_memory {format_bytes(parse_bytes(max_memory))}: batch size {size} "
              f"(estimated peak {format_bytes(est)} per device)")
    return size


def explain_out_of_memory(fn):
    """Decorator for functions with ``method`` and ``batch_size`` arguments: XLA's
    ``RESOURCE_EXHAUSTED`` becomes :class:`OutOfMemoryError` saying what to change."""
    import functools
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_resource_exhausted(e):
                raise
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            size = (f"the batch size picked for max_memory={a['max_memory']}" if a.get("max_memory") is not None
                    else f"batch size {a.get('batch_size')}")
            raise OutOfMemoryError(out_of_memory_message(e, a.get("method", fn.__name__), size)) from e

    return wrapper


def default_device_memory() -> Optional[int]:
    """Bytes of memory of the first local device, where the backend reports it (GPUs do,
    CPUs do not: None)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


__all__ = ["OutOfMemoryError", "parse_bytes", "format_bytes", "abstract_params", "param_count",
           "estimate_peak_bytes", "pick_micro_batch", "is_resource_exhausted",
           "out_of_memory_message", "batch_size_for", "explain_out_of_memory",
           "default_device_memory"]

