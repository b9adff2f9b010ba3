"""Learned circuits: Edge Pruning (Bhaskar et al. 2024) with optax.

A mask ``z [src, dst]`` in [0, 1] (or ``[pos, src, dst]`` for position-aware edges) sits
on every edge of the circuit graph; the graph forward runs with ``coef = 1 - z``
(:mod:`jaxinterp.models`, mode ``replace``), so an edge with ``z = 0`` carries the
corrupted activation exactly as in circuit evaluation. The masks are hard-concrete
variables (Louizos et al. 2018) with one logit ``log_alpha`` per edge, trained with
optax to minimise

    faithfulness loss + lambda_1 (d - t) + lambda_2 (d - t)^2,

where the faithfulness loss is measured in units of the empty circuit's (so that one
set of hyperparameters serves models whose effects differ by orders of magnitude),
``d`` is the expected fraction of edges kept (the hard-concrete L0 norm over the
real edges), ``t`` the target fraction (annealed from 1 to ``n_edges / total`` over the
first ``warmup`` of the steps) and the Lagrange multipliers ``lambda`` are trained by
gradient *ascent*, as Edge Pruning does. The faithfulness loss is the KL divergence
from the full model (``objective="kl_div"``, Edge Pruning's choice) or the squared
difference of a task metric from the full model's value.

The learned circuit is the smallest top-m by ``log_alpha`` that keeps at least ``n_edges``
edges after pruning (m = n unless the top edges dangle), a :class:`Graph`
(or :class:`PositionalGraph`) like any attribution method's, so the same evaluation,
curves and pictures apply; ``graph.scores`` rank the edges by ``log_alpha`` (shifted to
be positive, so ranking by ``|score|`` agrees).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .compiler import jit
from .data import Pairs
from .graph import Graph, GraphSpec
from .interventions import Run, TaskMetric, circuit_values, corrupted_outputs, prepare_run
from .names import OBJECTIVES, check_name
from .positional import PositionalGraph, check_one_length, position_labels
from .sharding import batches as shard_batches, replicate, to_host


@dataclasses.dataclass(frozen=True)
class HardConcrete:
    """The hard-concrete distribution: a stretched, clipped binary concrete, so that a
    mask is exactly 0 or 1 with non-zero probability and still has a gradient."""

    beta: float = 2.0 / 3.0  # temperature
    gamma: float = -0.1  # stretch interval (gamma, zeta) around [0, 1]
    zeta: float = 1.1

    def sample(self, log_alpha: jax.Array, key: jax.Array) -> jax.Array:
        u = jax.random.uniform(key, log_alpha.shape, minval=1e-6, maxval=1.0 - 1e-6)
        s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / self.beta)
        return jnp.clip(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def keep_probability(self, log_alpha: jax.Array) -> jax.Array:
        """P(mask > 0): the expected L0 norm per edge."""
        return jax.nn.sigmoid(log_alpha - self.beta * np.log(-self.gamma / self.zeta))


@dataclasses.dataclass
class LearnedCircuit:
    """``graph``: the circuit (see the module docstring); ``log_alpha``: the mask
    logits ``[(pos,) src, dst]``; ``history``: per step ``loss``, ``faithfulness_loss``,
    ``density`` (expected fraction of edges kept), ``target`` and ``lambda_1``, ``lambda_2``."""

    graph: Union[Graph, PositionalGraph]
    log_alpha: np.ndarray
    history: dict


def _faithfulness_loss(metric: TaskMetric, values, clean_logits, batch) -> jax.Array:
    """Weighted mean over the batch's examples of the distance of the circuit's metric
    ``values [batch]`` from the full model's: the KL itself (``kl_div``), else the squared
    difference of the task metric."""
    per = values if metric.name == "kl_div" else (values - metric(clean_logits, clean_logits, batch)) ** 2
    return (per * batch["weight"]).sum() / jnp.maximum(batch["weight"].sum(), 1.0)


@functools.partial(jit, static_argnames=("cfg", "metric", "intervention", "hc", "lr", "lambda_lr",
                                             "total_edges"))
def _train_step(state, params, batch, means, key, target, scale, *, cfg, metric: TaskMetric,
                intervention: str, hc: HardConcrete, lr: float, lambda_lr: float, total_edges: int):
    """One optimisation step: ``state = (log_alpha, lambdas, adam state, lambda adam state)``
    -> ``(new state, [loss, faithfulness loss, density, lambda_1, lambda_2])``. The
    parameters are an argument, not a closure: a closed-over model would be baked into the
    program as constants (and compiled again for every call)."""
    real = jnp.asarray(GraphSpec.for_coefficients(cfg, state[0].shape[-1]).real_edge_mask, jnp.float32)
    opt, lambda_opt = optax.adam(lr), optax.adam(lambda_lr)

    def loss_fn(log_alpha, lambdas):
        clean_logits, _, corr_outs = jax.lax.stop_gradient(corrupted_outputs(params, cfg, batch, intervention, means))
        z = hc.sample(log_alpha, key)
        values = circuit_values(params, cfg, batch, z, corr_outs, clean_logits, metric)
        faith = _faithfulness_loss(metric, values, clean_logits, batch) / scale
        density = (hc.keep_probability(log_alpha) * real).sum() / total_edges
        gap = density - target
        return faith + lambdas[0] * gap + lambdas[1] * gap ** 2, (faith, density)

    log_alpha, lambdas, opt_state, lambda_state = state
    (loss, (faith, density)), (g_alpha, g_lambda) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        log_alpha, lambdas)
    updates, opt_state = opt.update(g_alpha * real, opt_state, log_alpha)
    lambda_updates, lambda_state = lambda_opt.update(-g_lambda, lambda_state, lambdas)  # ascent
    new = (optax.apply_updates(log_alpha, updates), optax.apply_updates(lambdas, lambda_updates), opt_state,
           lambda_state)
    return new, jnp.stack([loss, faith, density, lambdas[0], lambdas[1]])


def _empty_loss(run: Run) -> float:
    """The faithfulness loss of the empty circuit over the run's data: the unit of the
    loss. The full and the empty circuit are evaluated in one pass, through the graph
    forward, as evaluation does."""
    spec = run.model.graph_spec
    full, empty = run.circuit_metrics(np.stack([spec.real_edge_mask, np.zeros_like(spec.real_edge_mask)]))
    loss = empty if run.metric.name == "kl_div" else (empty - full) ** 2
    if not np.isfinite(loss) or loss <= 1e-12:
        raise ValueError(f"the empty circuit's {run.metric.name} loss is {loss:.3g}: the data do not distinguish the "
                         f"model from the ablated model, so there is no circuit to learn")
    return float(loss)


def _init_log_alpha(shape, real: np.ndarray, n_edges: int, init_logit: float,
                    init_scores: Optional[np.ndarray], absolute: bool = True) -> np.ndarray:
    """Every edge at ``init_logit`` (all kept: training starts from the full model), or,
    from attribution scores, logits spread over ``[-2, 2] * init_logit`` by the rank of
    ``|score|`` (``absolute=False``: of the signed score) with the top ``n_edges``
    positive; ties rank in the order of the flat ``[(pos,) src, dst]`` index."""
    real_b = np.broadcast_to(real, shape)
    if init_scores is None:
        return np.where(real_b, init_logit, 0.0).astype(np.float32)
    scores = np.broadcast_to(np.asarray(init_scores, np.float32), shape)
    flat = np.abs(scores[real_b]) if absolute else scores[real_b]
    rank = np.empty(len(flat))
    rank[np.argsort(flat, kind="stable")] = np.arange(len(flat)) / max(len(flat) - 1, 1)
    threshold = 1.0 - n_edges / len(flat)
    out = np.zeros(shape, np.float32)
    out[real_b] = 2 * init_logit * (rank - threshold)
    return out


def learn_circuit(model, data: Union[str, Pairs], n_edges: int, *, objective: str = "kl_div",
                  intervention: str = "patching", intervention_data: Union[str, Pairs, None] = None,
                  steps: int = 500, lr: float = 0.1, lambda_lr: float = 0.1, warmup: float = 0.5,
                  batch_size: int = 16, init_scores: Optional[Union[Graph, PositionalGraph, np.ndarray]] = None,
                  init_logit: float = 3.0, positional: bool = False, seed: int = 0, mesh=None,
                  quiet: bool = False, hard_concrete: HardConcrete = HardConcrete(),
                  init_absolute: bool = True) -> LearnedCircuit:
    """Learn a circuit of ``n_edges`` edges on ``data`` (a pairs CSV path or :class:`Pairs`).

    objective: ``kl_div`` (KL from the full model at each prompt's last token) or a task
        metric (``logit_diff``, ``prob_diff``) whose squared difference from the full
        model is the loss.
    intervention: what edges outside the circuit carry (as in evaluation).
    steps, lr, lambda_lr, warmup: optimisation (Adam on the mask logits, Adam ascent on
        the two Lagrange multipliers; the target density reaches ``n_edges / total``
        after ``warmup * steps`` steps). Each step uses the next batch, cycling.
    init_scores: attribution scores (e.g. an EAP-IG graph, or a score ensemble,
        :mod:`jaxinterp.ensemble`) to start from instead of the full model: the initial
        logits follow the edges' rank by ``|score|`` (``init_absolute=False``: by signed
        score), from ``-2 * init_logit`` to ``2 * init_logit``, the top ``n_edges`` positive.
    positional: one mask per (position, edge); all prompts must have one token length,
        and ``n_edges`` counts (position, edge) entries.
    mesh: a ``("data", "model")`` mesh (:mod:`jaxinterp.sharding`): batches over ``data``,
        the model over ``model``; the masks are replicated.
    """
    check_name("objective", objective, OBJECTIVES)
    if steps < 1 or not 0.0 <= warmup <= 1.0:
        raise ValueError(f"need steps >= 1 and 0 <= warmup <= 1, got steps={steps}, warmup={warmup}")
    run = prepare_run(model, data, objective, intervention, intervention_data, batch_size, mesh)
    pairs, spec, cfg = run.pairs, model.graph_spec, model.cfg
    shape = ((pairs.n_pos,) if positional else ()) + (spec.n_forward, spec.n_backward)
    if positional:
        check_one_length(pairs.lengths, pairs.n_pos, pairs.corrupted_lengths)
    total_edges = int(np.prod(shape[:-2], dtype=int)) * spec.n_edges
    if not 0 < n_edges <= total_edges:
        raise ValueError(f"n_edges={n_edges} is outside [1, {total_edges}]")
    if isinstance(init_scores, (Graph, PositionalGraph)):
        init_scores = init_scores.scores

    scale = _empty_loss(run)
    final_density = n_edges / total_edges
    opt, lambda_opt = optax.adam(lr), optax.adam(lambda_lr)
    kw = dict(cfg=cfg, metric=run.metric, intervention=intervention, hc=hard_concrete, lr=lr, lambda_lr=lambda_lr,
              total_edges=total_edges)

    log_alpha = replicate(jnp.asarray(_init_log_alpha(shape, spec.real_edge_mask, n_edges, init_logit, init_scores,
                                                      init_absolute)), mesh)
    lambdas = replicate(jnp.zeros(2, jnp.float32), mesh)
    state = (log_alpha, lambdas, opt.init(log_alpha), lambda_opt.init(lambdas))
    batches = list(shard_batches(pairs, batch_size, mesh))
    base_key = jax.random.key(seed)
    records, targets = [], []
    for i in tqdm(range(steps), desc="edge pruning", disable=quiet):
        ramp = min(1.0, i / max(warmup * steps, 1e-9)) if warmup > 0 else 1.0
        target = 1.0 + ramp * (final_density - 1.0)
        state, record = _train_step(state, run.model.params, batches[i % len(batches)], run.means,
                                    jax.random.fold_in(base_key, i), jnp.float32(target), jnp.float32(scale), **kw)
        records.append(record)
        targets.append(target)
    records = np.stack([to_host(r) for r in records])
    if not np.isfinite(records).all():
        raise FloatingPointError(f"edge pruning: non-finite loss at step {int(np.argmin(np.isfinite(records).all(1)))}; "
                                 f"lower lr")
    log_alpha = to_host(state[0])
    history = {name: records[:, j] for j, name in
               enumerate(["loss", "faithfulness_loss", "density", "lambda_1", "lambda_2"])}
    history["target"] = np.asarray(targets)
    return LearnedCircuit(_circuit_graph(model, pairs, log_alpha, n_edges, positional), log_alpha, history)


def _circuit_graph(model, pairs: Pairs, log_alpha: np.ndarray, n_edges: int, positional: bool):
    """The learned circuit as a graph whose scores rank like ``log_alpha`` and are
    positive (so ``|score|`` ranks the same)."""
    spec = model.graph_spec
    real = np.broadcast_to(spec.real_edge_mask, log_alpha.shape)
    scores = np.where(real, log_alpha - log_alpha[real].min() + 1.0, 0.0)
    if positional:
        graph = PositionalGraph(spec, scores, positions=position_labels(model, pairs))
        return graph.apply_topn(n_edges)
    # the top-n by log_alpha alone can be a disconnected part of the (larger) circuit the
    # masks still hold when the density has not quite reached its target
    return Graph(spec, scores).apply_topn_at_least(n_edges)
