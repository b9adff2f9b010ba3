"""Circuit evaluation: run the model with every edge outside the circuit ablated.

An edge ``u->v`` outside the circuit carries ``u``'s corrupted activation (``patching``),
zero (``zero``) or ``u``'s mean output over a data set (``mean``, ``mean-positional``: see
:mod:`jaxinterp.interventions`); edges inside carry this run's own activations.

Faithfulness is MIB's circuit-track definition (the EAP-IG paper's normalisation),

    f(C) = (m(C) - m(empty)) / (m(N) - m(empty)),

with ``m(N)`` the full model (every edge in the circuit) and ``m(empty)`` the empty
circuit (every edge ablated), so that ``f(empty) = 0`` and ``f(N) = 1`` for every metric
and intervention. ``m(N)`` is the clean run, which is what the graph forward computes
with every edge in; under ``patching`` ``m(empty)`` is the corrupted run (run with the
clean prompts' attention mask), which is what it computes with every edge ablated, as
MIB's ``evaluate_baseline`` takes both ends; under the other interventions the empty
circuit runs through the graph forward (:meth:`jaxinterp.interventions.Run.circuit_metrics`
runs only the circuits whose value no plain run gives, each distinct circuit once).
The corrupted run's own value is reported beside them as ``corrupted``, the reference's
``evaluate_baseline(run_corrupted=True)``. ``m`` is read against the clean run's logits:
for ``kl_div``, ``m(N) = KL(clean || clean) = 0`` (the reference's ``evaluate_baseline``
passes the corrupted logits instead, giving KL(corrupted || clean)).

:func:`faithfulness_curve` evaluates many circuit sizes in one compiled call (``lax.map``
over edge masks, several at once under ``vmap``) instead of one model run per size.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from .data import Pairs, bucket_length
from .graph import Graph
from .interventions import Run, prepare_run
from .positional import PositionalGraph, check_one_length


# --- one pass over the data -----------------------------------------------------------------
def _circuit_metrics(run: Run, masks: np.ndarray, chunk: Optional[int] = None, quiet: bool = True,
                     max_memory: Union[str, int, None] = None) -> np.ndarray:
    """``[circuit]`` mean metrics of ``masks [circuit, (pos,) src, dst]``, checked against
    the run's graph and prompts first; ``chunk`` circuits per call, or as many as fit in
    ``max_memory`` (:func:`jaxinterp.memory.circuits_per_call`), or by default as many
    as fit in what attribution (EAP) needs for the same batch (:func:`default_chunk`)."""
    spec, pairs = run.model.graph_spec, run.pairs
    if np.ndim(masks) not in (3, 4) or np.shape(masks)[-2:] != (spec.n_forward, spec.n_backward):
        raise ValueError(f"masks have shape {np.shape(masks)}, the model's graph ({spec.describe()}) needs "
                         f"[circuit, {spec.n_forward}, {spec.n_backward}] (or [circuit, pos, ...] per position)")
    if np.ndim(masks) == 4:
        check_one_length(pairs.lengths, pairs.n_pos, pairs.corrupted_lengths)
        if np.shape(masks)[1] != pairs.n_pos:
            raise ValueError(f"position-aware circuits of {np.shape(masks)[1]} positions for prompts of "
                             f"{pairs.n_pos} tokens")
    if max_memory is not None:
        chunk = _chunk_for(run, len(masks), max_memory, quiet)
    elif chunk is None:
        chunk = default_chunk(run, len(masks))
    return run.circuit_metrics(masks, chunk, quiet)


def _shape(run: Run) -> tuple:
    """``(cfg, batch, n_pos, dtype, data devices, model devices, grouped_kv)`` of a run."""
    import jax

    mesh, model = run.mesh, run.model
    data, ways = (mesh.shape["data"], mesh.shape["model"]) if mesh is not None else (1, 1)
    return (model.cfg, run.batch_size, run.pairs.n_pos, jax.tree.leaves(model.params)[0].dtype, data, ways,
            model.grouped_kv)


def default_chunk(run: Run, n_circuits: int) -> int:
    """Circuits per call without ``max_memory``: :func:`jaxinterp.memory.default_circuits_per_call`
    (as many as fit in what EAP needs on the same batch, at most 8)."""
    from .memory import default_circuits_per_call

    cfg, batch, n_pos, dtype, data, ways, grouped = _shape(run)
    return default_circuits_per_call(cfg, batch, n_pos, n_circuits, dtype, data, ways, grouped)


def _chunk_for(run: Run, n_circuits: int, max_memory: Union[str, int], quiet: bool) -> int:
    from .memory import circuits_per_call, evaluation_peak_bytes, format_bytes, parse_bytes

    cfg, batch, n_pos, dtype, data, ways, grouped = _shape(run)
    chunk = circuits_per_call(cfg, batch, n_pos, n_circuits, parse_bytes(max_memory), dtype, data, ways, grouped)
    if not quiet:
        est = evaluation_peak_bytes(cfg, batch, n_pos, chunk, n_circuits, dtype, data, ways, grouped)
        print(f"max_memory {format_bytes(parse_bytes(max_memory))}: {chunk} of {n_circuits} circuits per call "
              f"(estimated peak {format_bytes(est)} per device)")
    return chunk


@dataclasses.dataclass
class _Ends:
    """What faithfulness is measured between: ``model`` = m(N) and ``empty`` = m(empty)
    (graph forward), and the corrupted run's own metric ``corrupted``."""

    model: float
    empty: float
    corrupted: float


def _with_ends(run: Run, masks: np.ndarray, chunk: Optional[int], quiet: bool,
               max_memory: Union[str, int, None] = None) -> tuple[np.ndarray, "_Ends"]:
    """``masks``' mean metrics and the ends, the full and the empty circuit
    evaluated as two more masks of the same pass."""
    full = np.broadcast_to(run.model.graph_spec.real_edge_mask, np.shape(masks)[1:])
    values = _circuit_metrics(run, np.concatenate([masks, [full, np.zeros_like(full)]]), chunk, quiet, max_memory)
    ends = _Ends(float(values[-2]), float(values[-1]), float(run.baselines[1]))
    return values[:-2], ends


# --- public ---------------------------------------------------------------------------------
def evaluate_masks(model, masks: np.ndarray, data: Union[str, Pairs], metric: str = "logit_diff",
                   intervention: str = "patching", batch_size: int = 16, chunk: Optional[int] = None,
                   quiet: bool = True, mesh=None, intervention_data: Union[str, Pairs, None] = None,
                   means: Optional[np.ndarray] = None, max_memory: Union[str, int, None] = None) -> np.ndarray:
    """Mean metric over ``data`` of each circuit ``masks [circuit, src, dst]`` (bool), or
    ``[circuit, pos, src, dst]`` for position-aware circuits (prompts of one length).
    ``mesh``: shard over a ``("data", "model")`` mesh (:mod:`jaxinterp.sharding`).
    ``intervention_data``: the prompts the ``mean`` interventions average over (default
    ``data``); ``means``: node means already computed for ``data``
    (:func:`jaxinterp.interventions.intervention_means`), to reuse. ``max_memory`` (e.g.
    "2GB"): as many circuits per call as fit, instead of ``chunk`` (default: as many as fit
    in attribution's memory, :func:`default_chunk`)."""
    run = prepare_run(model, data, metric, intervention, intervention_data, batch_size, mesh, means)
    return _circuit_metrics(run, masks, chunk, quiet, max_memory)


def _checked_circuit(model, graph: Graph, prune: bool) -> np.ndarray:
    model.graph_spec.check_same(graph.spec, "the circuit")  # e.g. a file of the other grouped-query view
    if prune:
        graph.prune()
    return graph.in_graph[None]


def evaluate_graph(model, graph: Graph, data: Union[str, Pairs], metric: str = "logit_diff",
                   intervention: str = "patching", batch_size: int = 16, prune: bool = True, mesh=None,
                   intervention_data: Union[str, Pairs, None] = None, means: Optional[np.ndarray] = None) -> float:
    """Mean metric of the circuit ``graph.in_graph`` (pruned first, as the reference does)."""
    masks = _checked_circuit(model, graph, prune)
    return float(evaluate_masks(model, masks, data, metric, intervention, batch_size, mesh=mesh,
                                intervention_data=intervention_data, means=means)[0])


def evaluate_empty(model, data: Union[str, Pairs], metric: str = "logit_diff", intervention: str = "patching",
                   batch_size: int = 16, mesh=None, intervention_data: Union[str, Pairs, None] = None,
                   means: Optional[np.ndarray] = None) -> float:
    """Mean metric of the empty circuit, m(empty) of faithfulness: every edge ablated,
    through the graph forward (for ``patching``, the corrupted run up to float rounding)."""
    spec = model.graph_spec
    return float(evaluate_masks(model, np.zeros((1, spec.n_forward, spec.n_backward), bool), data, metric,
                                intervention, batch_size, mesh=mesh, intervention_data=intervention_data,
                                means=means)[0])


def evaluate_baseline(model, data: Union[str, Pairs], metric: str = "logit_diff", batch_size: int = 16,
                      run_corrupted: bool = False, mesh=None) -> float:
    """Mean metric of the unmodified model on the clean (or corrupted) prompts, read
    against the clean run (``kl_div``: 0 on the clean prompts)."""
    run = prepare_run(model, data, metric, batch_size=batch_size, mesh=mesh)
    return float(run.baselines[1 if run_corrupted else 0])


@dataclasses.dataclass
class CircuitEvaluation:
    """One circuit evaluated: its mean metric ``circuit`` = m(C), the full model's ``model``
    = m(N), the empty circuit's ``empty`` = m(empty), the corrupted run's ``corrupted`` and
    ``faithfulness`` = (m(C) - m(empty)) / (m(N) - m(empty)) (NaN when m(N) = m(empty))."""

    circuit: float
    model: float
    empty: float
    corrupted: float
    faithfulness: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(model, graph: Graph, data: Union[str, Pairs], metric: str = "logit_diff",
             intervention: str = "patching", batch_size: int = 16, prune: bool = True, mesh=None,
             intervention_data: Union[str, Pairs, None] = None, chunk: Optional[int] = None,
             max_memory: Union[str, int, None] = None) -> CircuitEvaluation:
    """The circuit ``graph.in_graph`` (pruned first, as :func:`evaluate_graph`), the full
    model and the empty circuit evaluated in one pass, and the faithfulness between them."""
    masks = _checked_circuit(model, graph, prune)
    run = prepare_run(model, data, metric, intervention, intervention_data, batch_size, mesh)
    if intervention != "mean-positional":  # position-free: reuse compiled programs
        run.pairs = bucket_length(run.pairs, run.model.cfg.n_ctx)
    values, ends = _with_ends(run, masks, chunk, True, max_memory)
    value = float(values[0])
    return CircuitEvaluation(value, ends.model, ends.empty, ends.corrupted,
                             float(normalized_faithfulness(value, ends.model, ends.empty)))


@dataclasses.dataclass
class Curve:
    """Faithfulness of top-n circuits: ``sizes`` requested, ``n_edges`` kept after pruning,
    their mean ``metric`` and ``faithfulness``; ``clean`` = m(N) and ``empty`` = m(empty)
    (the ends faithfulness runs between), ``corrupted`` the corrupted run's metric."""

    sizes: np.ndarray
    n_edges: np.ndarray
    metric: np.ndarray
    faithfulness: np.ndarray
    clean: float
    corrupted: float
    label: str = ""
    empty: Optional[float] = None

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}


def topn_masks(graph: Union[Graph, PositionalGraph], sizes: Sequence[int], absolute: bool = True,
               prune: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(masks [size, src, dst], kept edge counts [size])`` of the top-n circuits
    (``[size, pos, src, dst]`` and (position, edge) counts for a :class:`PositionalGraph`)."""
    masks, kept = [], []
    g = (PositionalGraph(graph.spec, graph.scores, positions=graph.positions) if isinstance(graph, PositionalGraph)
         else Graph(graph.spec, graph.scores))
    for n in sizes:
        g.apply_topn(int(n), absolute=absolute, prune=prune)
        masks.append(g.in_graph.copy())
        kept.append(g.count_included_edges())
    return np.stack(masks), np.array(kept)


def faithfulness_curve(model, graph: Union[Graph, PositionalGraph], data: Union[str, Pairs], sizes: Sequence[int],
                       metric: str = "logit_diff", intervention: str = "patching", batch_size: int = 16,
                       absolute: bool = True, chunk: Optional[int] = None, label: str = "", quiet: bool = True,
                       mesh=None, intervention_data: Union[str, Pairs, None] = None,
                       max_memory: Union[str, int, None] = None) -> Curve:
    """Faithfulness of the top-``n`` circuits of ``graph``'s scores, for every ``n`` in
    ``sizes``; the full model and the empty circuit are two more masks of the same pass.
    ``chunk`` circuits run at once, or with ``max_memory`` (e.g. "8GB") as many as fit;
    by default as many as fit in what EAP needs on the same batch (:func:`default_chunk`)."""
    run = prepare_run(model, data, metric, intervention, intervention_data, batch_size, mesh)
    run.model.graph_spec.check_same(graph.spec, "the scored graph")
    masks, kept = topn_masks(graph, sizes, absolute)
    if masks.ndim == 3 and intervention != "mean-positional":  # position-free: reuse compiled programs
        run.pairs = bucket_length(run.pairs, run.model.cfg.n_ctx)
    values, ends = _with_ends(run, masks, chunk, quiet, max_memory)
    return Curve(np.asarray(sizes), kept, values, normalized_faithfulness(values, ends.model, ends.empty),
                 ends.model, ends.corrupted, label, ends.empty)


def normalized_faithfulness(value, clean: float, empty: float):
    """``(m(C) - m(empty)) / (m(model) - m(empty))``; NaN when the model and the empty
    circuit do not differ (faithfulness is undefined there)."""
    denom = clean - empty
    if abs(denom) < 1e-12:
        return np.full_like(np.asarray(value, float), np.nan)
    return (np.asarray(value, float) - empty) / denom
