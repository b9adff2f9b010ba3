"""Circuit evaluation: run the model with every edge outside the circuit patched.

An edge ``u->v`` outside the circuit carries ``u``'s corrupted activation (``patching``),
zero (``zero``) or ``u``'s mean output over a data set (``mean``, ``mean-positional``: see
:func:`jaxinterp.attribution.mean_activations`); edges inside carry this run's own
activations. Faithfulness is
normalised as in the EAP-IG paper: ``(m(C) - m(empty)) / (m(model) - m(empty))``, where
the empty circuit is the corrupted run.

:func:`faithfulness_curve` evaluates many circuit sizes in one compiled call (``vmap``
over edge masks) instead of one model run per size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import metrics as metrics_lib
from .attribution import (INTERVENTIONS, _corrupted_outputs, batch_metric, intervention_means, logit_positions,
                          prepare_data)
from .data import Pairs
from .graph import Graph, GraphSpec
from .models import Intervention, forward
from .positional import PositionalGraph, check_one_length
from .sharding import batches as shard_batches, replicate, shard_model, to_host


@functools.partial(jax.jit, static_argnames=("cfg", "metric_name", "intervention", "chunk"))
def _batch_eval(params, batch, year_ids, in_graph, means=None, *, cfg, metric_name, intervention, chunk=8):
    """Weighted metric sums ``[circuit]`` for each mask in ``in_graph [circuit, src, dst]``."""
    spec = GraphSpec.from_config(cfg)
    metric = metrics_lib.get_metric(metric_name, year_ids)
    clean_logits, _, corr_outs = _corrupted_outputs(params, cfg, batch, intervention, means)
    real = jnp.asarray(spec.real_edge_mask, jnp.float32)

    def one(mask):
        coef = (1.0 - mask.astype(jnp.float32)) * real
        logits = forward(params, cfg, batch["clean"], batch["attention_mask"], Intervention(coef, corr_outs),
                         logit_positions=logit_positions(batch))
        return (batch_metric(metric, logits, clean_logits, batch) * batch["weight"]).sum()

    return jax.lax.map(one, in_graph, batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("cfg", "metric_name"))
def _batch_baseline(params, batch, year_ids, *, cfg, metric_name):
    metric = metrics_lib.get_metric(metric_name, year_ids)
    mask, at = batch["attention_mask"], logit_positions(batch)
    clean = forward(params, cfg, batch["clean"], mask, logit_positions=at)
    corrupted = forward(params, cfg, batch["corrupted"], mask, logit_positions=at)
    w = batch["weight"]
    return jnp.stack([(batch_metric(metric, clean, corrupted, batch) * w).sum(),
                      (batch_metric(metric, corrupted, clean, batch) * w).sum()])


def evaluate_masks(model, masks: np.ndarray, data: Union[str, Pairs], metric: str = "logit_diff",
                   intervention: str = "patching", batch_size: int = 16, chunk: int = 8,
                   quiet: bool = True, mesh=None, intervention_data: Union[str, Pairs, None] = None) -> np.ndarray:
    """Mean metric over ``data`` of each circuit ``masks [circuit, src, dst]`` (bool), or
    ``[circuit, pos, src, dst]`` for position-aware circuits (prompts of one length).
    ``mesh``: shard over a ``("data", "model")`` mesh (:mod:`jaxinterp.sharding`).
    ``intervention_data``: the prompts the ``mean`` interventions average over (default ``data``)."""
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {intervention!r}; choose from {INTERVENTIONS}")
    pairs, year_ids = prepare_data(model, data, metric)
    spec = model.graph_spec
    if np.ndim(masks) not in (3, 4) or np.shape(masks)[-2:] != (spec.n_forward, spec.n_backward):
        raise ValueError(f"masks have shape {np.shape(masks)}, the model's graph ({spec.describe()}) needs "
                         f"[circuit, {spec.n_forward}, {spec.n_backward}] (or [circuit, pos, ...] per position)")
    masks = np.asarray(masks, bool)
    if masks.ndim == 4:
        check_one_length(pairs.lengths, pairs.n_pos, pairs.corrupted_lengths)
        if masks.shape[1] != pairs.n_pos:
            raise ValueError(f"position-aware circuits of {masks.shape[1]} positions for prompts of {pairs.n_pos} "
                             f"tokens")
    n_masks = len(masks)
    model, year_ids = shard_model(model, mesh), replicate(year_ids, mesh)
    means = replicate(intervention_means(model, pairs, intervention, intervention_data, batch_size, mesh), mesh)
    masks = replicate(masks, mesh)
    total = np.zeros(n_masks)
    for batch in tqdm(shard_batches(pairs, batch_size, mesh), total=pairs.n_batches(batch_size), desc="evaluate",
                      disable=quiet):
        total += to_host(_batch_eval(model.params, batch, year_ids, masks, means, cfg=model.cfg, metric_name=metric,
                                     intervention=intervention, chunk=chunk))
    return total / len(pairs)


def evaluate_graph(model, graph: Graph, data: Union[str, Pairs], metric: str = "logit_diff",
                   intervention: str = "patching", batch_size: int = 16, prune: bool = True, mesh=None,
                   intervention_data: Union[str, Pairs, None] = None) -> float:
    """Mean metric of the circuit ``graph.in_graph`` (pruned first, as the reference does)."""
    model.graph_spec.check_same(graph.spec, "the circuit")  # e.g. a file of the other grouped-query view
    if prune:
        graph.prune()
    return float(evaluate_masks(model, graph.in_graph[None], data, metric, intervention, batch_size, mesh=mesh,
                                intervention_data=intervention_data)[0])


def evaluate_empty(model, data: Union[str, Pairs], metric: str = "logit_diff", intervention: str = "patching",
                   batch_size: int = 16, mesh=None, intervention_data: Union[str, Pairs, None] = None) -> float:
    """Mean metric of the empty circuit, m(empty) of faithfulness: the corrupted run for
    ``patching`` (every edge patched is the corrupted model), otherwise every edge ablated."""
    if intervention == "patching":
        return evaluate_baseline(model, data, metric, batch_size, run_corrupted=True, mesh=mesh)
    pairs, _ = prepare_data(model, data, metric)
    masks = np.zeros((1, model.graph_spec.n_forward, model.graph_spec.n_backward), bool)
    return float(evaluate_masks(model, masks, pairs, metric, intervention, batch_size, mesh=mesh,
                                intervention_data=intervention_data)[0])


def evaluate_baseline(model, data: Union[str, Pairs], metric: str = "logit_diff", batch_size: int = 16,
                      run_corrupted: bool = False, mesh=None) -> float:
    """Mean metric of the unmodified model on the clean (or corrupted) prompts."""
    pairs, year_ids = prepare_data(model, data, metric)
    model, year_ids = shard_model(model, mesh), replicate(year_ids, mesh)
    total = np.zeros(2)
    for batch in shard_batches(pairs, batch_size, mesh):
        total += to_host(_batch_baseline(model.params, batch, year_ids, cfg=model.cfg, metric_name=metric))
    return float(total[1 if run_corrupted else 0] / len(pairs))


@dataclasses.dataclass
class Curve:
    """Faithfulness of top-n circuits: ``sizes`` requested, ``n_edges`` kept after pruning."""

    sizes: np.ndarray
    n_edges: np.ndarray
    metric: np.ndarray
    faithfulness: np.ndarray
    clean: float
    corrupted: float
    label: str = ""

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
                       absolute: bool = True, chunk: int = 8, label: str = "", quiet: bool = True,
                       mesh=None, intervention_data: Union[str, Pairs, None] = None) -> Curve:
    """Faithfulness of the top-``n`` circuits of ``graph``'s scores, for every ``n`` in ``sizes``."""
    pairs, _ = prepare_data(model, data, metric)
    model = shard_model(model, mesh)  # once, not in every evaluation below
    model.graph_spec.check_same(graph.spec, "the scored graph")
    masks, kept = topn_masks(graph, sizes, absolute)
    clean = evaluate_baseline(model, pairs, metric, batch_size, mesh=mesh)
    if intervention == "patching":
        values = evaluate_masks(model, masks, pairs, metric, intervention, batch_size, chunk, quiet, mesh=mesh)
        empty = evaluate_empty(model, pairs, metric, intervention, batch_size, mesh)
    else:  # the empty circuit is one more mask: one pass, one computation of the means
        empty_mask = np.zeros((1,) + masks.shape[1:], bool)
        values = evaluate_masks(model, np.concatenate([masks, empty_mask]), pairs, metric, intervention,
                                batch_size, chunk, quiet, mesh=mesh, intervention_data=intervention_data)
        values, empty = values[:-1], float(values[-1])
    return Curve(np.asarray(sizes), kept, values, normalized_faithfulness(values, clean, empty), clean, empty, label)


def normalized_faithfulness(value, clean: float, empty: float):
    """``(m(C) - m(empty)) / (m(model) - m(empty))``; NaN when the model and the empty
    circuit do not differ (faithfulness is undefined there)."""
    denom = clean - empty
    if abs(denom) < 1e-12:
        return np.full_like(np.asarray(value, float), np.nan)
    return (np.asarray(value, float) - empty) / denom
