"""ACDC: automatic circuit discovery by iterative edge pruning (Conmy et al. 2023).

The algorithm (the original ``TLACDCExperiment.step``), on the circuit graph of
:mod:`jaxinterp.graph` with exact patching (an edge outside the circuit carries its
source's corrupted activation, as :mod:`jaxinterp.evaluation`):

    H <- every edge
    for each downstream input v, from the logits backwards (reverse topological order):
        if v's node has no outgoing edge left in H:   # it cannot reach the logits
            remove every edge into v (no evaluation; removing them changes nothing)
            continue
        current <- L(H)
        for each edge u -> v, nearest upstream node first:
            result <- L(H without u -> v) - current
            if result < threshold (|result| with ``absolute``):
                H <- H without u -> v;  current <- L(H)        # committed at once
    return H

``L`` is the mean over examples of ``ATTRIBUTION_SIGN[metric] * metric``: KL(clean ||
circuit) at the last real token by default (ACDC's choice), or the negated logit /
probability difference (a loss: removing an edge that lowers the logit difference by
less than the threshold is accepted, one that raises it always is). ``L(H)`` is measured
on ``H`` *pruned* (:meth:`jaxinterp.graph.Graph.prune`: nodes without inputs or outputs
and their edges removed), the circuit that evaluation measures: under ``patching``
pruning leaves the metric as it is, but under ``zero`` / ``mean`` ablation a node cut off
from its inputs still computes something that its kept outgoing edges would carry, so a
circuit accepted unpruned would change when pruned.

**Semantics kept exactly sequential.** Edges into one input are tested one at a time,
each against the circuit left by the decisions before it, as in the original; there is
no batched approximation. What changes is where the loop runs: all edges into one
downstream input are tested inside **one compiled call** (a ``lax.scan`` over the
candidate parents; ``lax.cond`` skips non-edges), so the per-edge cost is one forward
pass over the data and no host round trip. The order of downstream inputs is the
logits, then for each layer from the last: ``m{l}``, then its heads' ``<q>``, ``<k>``,
``<v>`` inputs (:func:`processing_order`); parents are visited from the highest source
index down (the latest MLP and heads first).

The result is a :class:`jaxinterp.graph.Graph` in the reference's JSON format: edges
kept are ``in_graph``, the accepted circuit pruned (so its evaluated metric is the ``L``
ACDC accepted, for every intervention), and each tested edge's ``score`` is its
``result`` when it was tested (edges removed untested score 0), so evaluation, curves and
pictures apply.

**Candidates.** Every test is a forward pass over the data, so plain ACDC on a graph of
10^5 edges costs 10^5 passes. ``candidates`` restricts it: ``H`` starts as the candidate
edges (e.g. the top-K of EAP-IG, :func:`candidate_edges`), the others are removed
untested, and the loop above runs over the candidates only: "ACDC over the top-K
candidates", a different algorithm from ACDC on the whole graph.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .compiler import jit
from .data import Pairs
from .graph import Graph, GraphSpec
from .interventions import TaskMetric, circuit_values, corrupted_outputs, prepare_run, weighted_sum


def processing_order(spec: GraphSpec) -> list[int]:
    """Downstream inputs (backward indices) in ACDC's reverse topological order: the
    logits, then per layer from the last its MLP input, then its heads' q, k, v inputs."""
    order = [spec.logits_index]
    for layer in reversed(range(spec.n_layers)):
        order.append(spec.mlp_in_index(layer))
        start = spec.qkv_index(layer, "q")
        order.extend(range(start, start + spec.n_attn_inputs))
    return order


def stack_batches(pairs: Pairs, batch_size: int, mesh=None) -> dict:
    """All of ``pairs`` as arrays ``[n_batches, batch, ...]`` (the last batch padded with
    weight-0 rows), so that one compiled call can sum the metric over the whole data.
    With ``mesh``, each batch is padded (weight 0) to a multiple of the ``data`` axis and
    split over it."""
    batches = list(pairs.batches(batch_size))
    if mesh is None:
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    from .sharding import shard_stacked

    return shard_stacked(batches, mesh)


@functools.partial(jit, static_argnames=("cfg", "intervention"))
def _prepare(params, stacked, means=None, *, cfg, intervention):
    """Per batch, the clean logits at the read positions ``[n_batches, batch, 1, vocab]``
    and the corrupted node outputs ``[n_batches, src, batch, pos, d_model]``."""

    def one(batch):
        clean_logits, _, corr_outs = corrupted_outputs(params, cfg, batch, intervention, means)
        return clean_logits, corr_outs

    return jax.lax.map(one, stacked)


def pruned(in_graph: jax.Array, spec: GraphSpec) -> jax.Array:
    """``in_graph [src, dst]`` (bool) pruned as :meth:`Graph.prune` prunes a circuit whose
    nodes all start in it: nodes without incoming (the input excepted) or outgoing edges
    lose their edges, until nothing changes. Traceable (a ``while_loop``)."""
    f2b = jnp.asarray(spec.forward_to_backward)

    def step(g):
        has_in = (g.any(0)[None, :] & f2b).any(1).at[0].set(True)  # the input node needs no input
        nodes = g.any(1) & has_in
        dst_alive = (nodes[:, None] & f2b).any(0).at[-1].set(True)  # the logits are always there
        return g & nodes[:, None] & dst_alive[None, :]

    return jax.lax.while_loop(lambda c: (c[0] != c[1]).any(), lambda c: (step(c[0]), c[0]),
                              (step(in_graph), in_graph))[0]


def _loss(params, cfg, metric: TaskMetric, stacked, clean_logits, corr_outs, in_graph) -> jax.Array:
    """``L(circuit)``: the mean over all examples of the signed metric of the circuit
    ``in_graph [src, dst]`` (bool), pruned."""
    circuit = pruned(in_graph, GraphSpec.for_coefficients(cfg, in_graph.shape[-1]))

    def one(xs):
        batch, clean, corr = xs
        return weighted_sum(circuit_values(params, cfg, batch, circuit, corr, clean, metric), batch)

    total = jax.lax.map(one, (stacked, clean_logits, corr_outs)).sum()
    return metric.sign * total / stacked["weight"].sum()


@functools.partial(jit, static_argnames=("cfg", "metric", "absolute"))
def _process_input(params, stacked, clean_logits, corr_outs, in_graph, dst, parents, threshold, start, *,
                   cfg, metric: TaskMetric, absolute):
    """ACDC's step for one downstream input ``dst``: the edges ``parents[i] -> dst``
    (``parents [k]``, -1 = padding) tested in order, each removal committed before the
    next test. ``start``: ``L(in_graph)`` if known (the previous step's final ``L``: the
    circuits between steps differ only by edges that pruning removes), else NaN.
    Returns ``(in_graph, results [k], L of the final circuit)``; a result is NaN where
    nothing was tested."""
    loss = functools.partial(_loss, params, cfg, metric, stacked, clean_logits, corr_outs)

    def step(carry, u):
        graph, current = carry

        def test(_):
            trial = graph.at[u, dst].set(False)
            value = loss(trial)
            result = value - current
            remove = (jnp.abs(result) if absolute else result) < threshold
            return jnp.where(remove, trial, graph), jnp.where(remove, value, current), result

        def skip(_):
            return graph, current, jnp.float32(jnp.nan)

        graph, current, result = jax.lax.cond((u >= 0) & graph[jnp.maximum(u, 0), dst], test, skip, None)
        return (graph, current), result

    first = jax.lax.cond(jnp.isnan(start), lambda: loss(in_graph), lambda: start)
    (in_graph, current), results = jax.lax.scan(step, (in_graph, first), parents)
    return in_graph, results, current


def candidate_edges(graph: Graph, k: int) -> np.ndarray:
    """``[src, dst]`` bool: the top-``k`` edges of ``graph``'s scores by ``|score|``, grown
    until ``k`` remain after pruning (:meth:`Graph.apply_topn_at_least`), so that none of
    ACDC's tests is spent on an edge that cannot reach the logits."""
    return Graph(graph.spec, graph.scores).apply_topn_at_least(k).in_graph.copy()


def acdc(model, data: Union[str, Pairs], threshold: float, metric: str = "kl_div", batch_size: int = 32,
         absolute: bool = False, intervention: str = "patching", quiet: bool = False,
         intervention_data: Union[str, Pairs, None] = None, mesh=None,
         candidates: Optional[np.ndarray] = None) -> Graph:
    """Run ACDC on ``data`` (a pairs CSV path or :class:`Pairs`) and return the circuit.

    threshold: an edge is removed when its removal raises ``L`` by less than this.
    metric: ``kl_div`` (default, as ACDC), ``logit_diff`` or ``prob_diff``.
    absolute: compare ``|result|`` with the threshold (the original's
        ``abs_value_threshold``).
    batch_size: examples per forward pass; every evaluation covers all examples, and
        the corrupted node outputs of all examples (``[src, example, pos, d_model]``)
        stay in device memory for the whole run.
    intervention: what removed edges carry, as in :func:`jaxinterp.evaluate_graph`
        (the ``mean`` interventions average over ``intervention_data``, default ``data``).
    mesh: shard over a ``("data", "model")`` mesh (:mod:`jaxinterp.sharding`): each batch's
        examples over ``data``, the model over ``model``; the circuit is the same.
    candidates: ``[src, dst]`` bool, the edges ACDC may keep (e.g. the top-K of an
        attribution method, :func:`candidate_edges`): ``H`` starts as these edges alone,
        the others are removed untested (score 0) and only these are tested, in the same
        order and against the same ``L``. Each test costs one forward pass over the data,
        so this makes ACDC affordable on large graphs; with every edge a candidate the
        result is plain ACDC's.
    """
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    spec = model.graph_spec
    if candidates is not None and np.shape(candidates) != spec.real_edge_mask.shape:
        raise ValueError(f"candidates have shape {np.shape(candidates)}, the model's graph needs "
                         f"{spec.real_edge_mask.shape} [src, dst]")
    run = prepare_run(model, data, metric, intervention, intervention_data, batch_size, mesh)
    cfg, params = model.cfg, run.model.params
    stacked = stack_batches(run.pairs, batch_size, mesh)
    clean_logits, corr_outs = _prepare(params, stacked, run.means, cfg=cfg, intervention=intervention)
    real = spec.real_edge_mask if candidates is None else spec.real_edge_mask & np.asarray(candidates, bool)
    in_graph = jnp.asarray(real)
    scores = np.zeros(real.shape, np.float32)
    # the nodes each input feeds: several query heads for a grouped <k>/<v> input
    owners = {int(d): np.nonzero(spec.forward_to_backward[:, d])[0] for d in range(spec.n_backward - 1)}
    kw = dict(cfg=cfg, metric=run.metric, absolute=bool(absolute))
    # L of the current circuit, carried from one input to the next: inputs skipped or
    # emptied untested in between change only edges that pruning removes, so L is unchanged
    current = jnp.float32(jnp.nan)
    for dst in tqdm(processing_order(spec), desc="ACDC", disable=quiet):
        nodes = owners.get(dst)
        if nodes is not None and not bool(in_graph[nodes].any()):
            in_graph = in_graph.at[:, dst].set(False)  # cannot reach the logits: removed untested
            continue
        parents = np.nonzero(real[:, dst])[0][::-1]
        if len(parents) == 0:  # no candidate into dst: nothing to test (never so without candidates)
            continue
        padded = np.full(spec.n_forward, -1, np.int32)
        padded[:len(parents)] = parents
        in_graph, results, current = _process_input(params, stacked, clean_logits, corr_outs, in_graph, dst, padded,
                                                    jnp.float32(threshold), current, **kw)
        results = np.asarray(results)[:len(parents)]
        if not np.isfinite(results).all():  # every edge into dst is present, so every one was tested
            raise ValueError(f"ACDC: non-finite metric values at {spec.backward_names[dst]}; check the data "
                             "and the model's numerics")
        scores[parents, dst] = results
    graph = Graph(spec, scores)
    graph.in_graph[:] = np.asarray(in_graph) & real
    graph.nodes_in_graph[:] = True
    graph.prune()  # the circuit L was measured on (see pruned)
    return graph
