"""Edge attribution over all edges at once: EAP, EAP-IG (inputs / activations),
clean-corrupted and exact patching, with the reference's ``method=`` names.

Every gradient method is one identity (see :mod:`jaxinterp.models`): with
``x_v = resid_v + sum_u coef[u, v] * delta_u`` and ``delta = corrupted - clean`` node
outputs, the gradient of the metric with respect to ``coef`` is

    d metric / d coef[u, v] = sum_{batch, pos} delta_u . d metric / d x_v,

the EAP score of every edge from one backward pass, contracted inside the backward pass
without materialising per-input gradients. The methods differ only in *where* that
gradient is taken:

* ``EAP``: the clean run (``coef = 0``).
* ``EAP-IG-inputs``: runs whose token embeddings are ``corrupted + a (clean - corrupted)``,
  ``a = k / steps`` for ``k = 0 .. steps-1`` (the reference's points), averaged.
* ``EAP-IG-activations``: as the reference: for each group of nodes (the input, one
  layer's heads, one MLP) and ``a = k / steps``, ``k = 1 .. steps``, that group's outputs
  are set to ``a clean + (1 - a) corrupted`` (the gradient through them into their own
  inputs cut, as an overwriting hook does); all runs averaged.
* ``clean-corrupted``: the average of the clean and the corrupted run.
* ``exact``: the true metric change when one edge alone carries its corrupted value.

``information-flow-routes`` (Ferrando & Voita) is no gradient method and reads no metric:
each edge's share of its destination's residual stream on the clean prompts
(:mod:`jaxinterp.routes`).

Scores are the mean over examples of the per-example attribution of
``ATTRIBUTION_SIGN * metric``. What the corrupted activations are (``intervention=``),
the data, the metric and the batch loop come from :mod:`jaxinterp.interventions`. The reference divides the same sum by the number of
examples *and* by the batch size (its metric is a batch mean): reference scores equal
ours divided by ``batch_size``.
"""

from __future__ import annotations

import functools
from typing import Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import memory as memory_lib
from .compiler import jit
from .config import ModelConfig
from .data import Pairs, bucket_length
from .graph import Graph, GraphSpec
from .interventions import (Run, TaskMetric, check_intervention, corrupted_outputs, metric_values, prepare_run,
                            weighted_sum)
from .models import EdgeIntervention, residual_stream
from .names import EDGE_METHODS, IG_METHODS, check_name
from .positional import PositionalGraph, check_one_length, position_labels
from .routes import METHOD as ROUTES, batch_routes
from .sharding import replicate, to_host

# ``prepare_data`` and ``mean_activations`` stay importable from here: they were public here
# before the substrate moved to :mod:`jaxinterp.interventions`.


class AttributionError(ValueError):
    """Attribution could not produce trustworthy scores (the message says why)."""


def _objective(params, cfg: ModelConfig, metric: TaskMetric, batch, clean_logits, source, mode="grad",
               remat: bool = False):
    """``f(coef, tokens, input_embeddings, shift, detach)``: weighted sum of the signed
    metric; its gradient w.r.t. ``coef`` (which must be zero) gives the edge scores."""

    def f(coef, tokens, input_embeddings=None, shift=None, detach=None):
        iv = EdgeIntervention(coef, source, shift, detach, mode=mode)
        values = metric_values(params, cfg, batch, metric, clean_logits, iv, tokens, input_embeddings, remat)
        return weighted_sum(metric.sign * values, batch)

    return f


def _activation_groups(spec: GraphSpec) -> np.ndarray:
    """``[group, src]`` 0/1: the input, then each layer's heads and its MLP."""
    groups = [np.eye(spec.n_forward)[0]]
    for layer in range(spec.n_layers):
        heads = np.zeros(spec.n_forward)
        h0 = spec.head_index(layer)
        heads[h0:h0 + spec.n_heads] = 1
        groups += [heads, np.eye(spec.n_forward)[spec.mlp_index(layer)]]
    return np.stack(groups).astype(np.float32)


@functools.partial(jit, persist=True, static_argnames=("cfg", "method", "metric", "ig_steps", "intervention", "remat",
                                             "positional", "grouped_kv"))
def batch_scores(params, batch, means=None, *, cfg: ModelConfig, method: str, metric: TaskMetric,
                 ig_steps: int = 5, intervention: str = "patching", remat: bool = False, positional: bool = False,
                 grouped_kv: bool = False):
    """Sum over the batch's examples of the per-example edge scores: ``[src, dst]``, or
    ``[pos, src, dst]`` when ``positional`` (float32 also for bfloat16 parameters), over
    the graph in the view ``grouped_kv`` (``Model.grouped_kv``). ``remat``
    rematerialises each layer; ``means``: see :func:`jaxinterp.interventions.intervention_means`."""
    spec = GraphSpec.from_config(cfg, grouped_kv)
    clean_logits, clean_outs, corr_outs = corrupted_outputs(params, cfg, batch, intervention, means)
    delta = jax.lax.stop_gradient(corr_outs - clean_outs)
    f = _objective(params, cfg, metric, batch, clean_logits, delta, remat=remat)
    grad = jax.grad(f)
    zeros = jnp.zeros(((batch["clean"].shape[1],) if positional else ()) + (spec.n_forward, spec.n_backward),
                      jnp.float32)

    if method == "EAP":
        # the clean run's own outputs form corrupted - clean, so the separate clean run
        # above is only computed when the metric reads the clean logits (KL)
        f_eap = _objective(params, cfg, metric, batch, clean_logits, corr_outs, mode="grad-replace", remat=remat)
        scores = jax.grad(f_eap)(zeros, batch["clean"])
    elif method == "clean-corrupted":
        scores = (grad(zeros, batch["clean"]) + grad(zeros, batch["corrupted"])) / 2
    elif method == "EAP-IG-inputs":
        clean_emb, corr_emb = clean_outs[0], corr_outs[0]

        def step(total, alpha):
            emb = corr_emb + alpha * (clean_emb - corr_emb)
            return total + grad(zeros, batch["clean"], emb), None

        alphas = jnp.arange(ig_steps, dtype=jnp.float32) / ig_steps
        scores = jax.lax.scan(step, zeros, alphas)[0] / ig_steps
    elif method == "EAP-IG-activations":
        groups = jnp.asarray(_activation_groups(spec))
        alphas = jnp.arange(1, ig_steps + 1, dtype=jnp.float32) / ig_steps
        group_of = jnp.repeat(groups, ig_steps, axis=0)
        alpha_of = jnp.tile(alphas, groups.shape[0])

        def step(total, xs):
            group, alpha = xs  # the group's outputs become clean + (1 - alpha) (corrupted - clean)
            return total + grad(zeros, batch["clean"], None, (1 - alpha) * group, group), None

        scores = jax.lax.scan(step, zeros, (group_of, alpha_of))[0] / group_of.shape[0]
    else:
        raise ValueError(f"method {method!r} is not a gradient method")
    return jnp.where(jnp.asarray(spec.real_edge_mask), scores, 0.0)


@functools.partial(jit, static_argnames=("cfg", "metric", "intervention", "grouped_kv"))
def batch_exact(params, batch, layer, src, dst, means=None, *, cfg: ModelConfig, metric: TaskMetric,
                intervention: str = "patching", grouped_kv: bool = False):
    """Exact patching of edges ``(src[i], dst[i])`` (indices in the view ``grouped_kv``),
    every ``dst`` an input of layer ``layer`` (``n_layers``: the logits; :func:`dst_layers`),
    one at a time: ``[edges]`` sums over the batch of ``sign * (metric(patched) - metric(clean))``.

    A patched run equals the clean run up to its destination's layer, so each starts there
    from the clean residual stream (``forward(resume=...)``): edges into late layers cost a
    fraction of a forward pass. ``layer`` is traced: one compiled program for every layer."""
    spec = GraphSpec.from_config(cfg, grouped_kv)
    clean_logits, clean_outs, corr_outs = corrupted_outputs(params, cfg, batch, intervention, means)
    resid = residual_stream(params, cfg, batch["clean"], batch["attention_mask"])[1][layer]
    # A single patched edge cannot change its own source (it lies upstream), so
    # "carry the corrupted value" equals "add the fixed clean->corrupted difference".
    delta = corr_outs - clean_outs
    base = metric(clean_logits, clean_logits, batch)

    def one(s, d):
        coef = jax.nn.one_hot(d, spec.n_backward)[None]
        values = metric_values(params, cfg, batch, metric, clean_logits,
                               EdgeIntervention(coef, delta[s][None], mode="add-one"), resume=(layer, resid))
        return weighted_sum(metric.sign * (values - base), batch)

    return jax.vmap(one)(src, dst)


def dst_layers(spec: GraphSpec) -> np.ndarray:
    """``[dst]``: the layer each downstream input belongs to (``n_layers`` for the logits)."""
    per_layer = spec.n_attn_inputs + 1  # a layer's q/k/v inputs and its MLP input, in dst order
    return np.minimum(np.arange(spec.n_backward) // per_layer, spec.n_layers)


@functools.partial(jit, static_argnames=("cfg", "metric", "intervention"))
def batch_exact_nodes(params, batch, means=None, *, cfg: ModelConfig, metric: TaskMetric, intervention: str):
    """``[src]`` sums over the batch of ``sign * (metric(patched) - metric(clean))`` with
    each node's output patched on all its outgoing edges at once."""
    spec = GraphSpec.from_config(cfg)
    clean_logits, _, corr_outs = corrupted_outputs(params, cfg, batch, intervention, means)
    base = metric(clean_logits, clean_logits, batch)
    real = jnp.asarray(spec.real_edge_mask, jnp.float32)

    def one(node):
        coef = jax.nn.one_hot(node, spec.n_forward)[:, None] * real  # all of the node's outgoing edges
        values = metric_values(params, cfg, batch, metric, clean_logits, EdgeIntervention(coef, corr_outs))
        return weighted_sum(metric.sign * (values - base), batch)

    return jax.lax.map(one, jnp.arange(spec.n_forward))


def _check_finite(scores: np.ndarray, what: str) -> None:
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise AttributionError(f"{what}: non-finite scores (first at src={bad[-2]}, dst={bad[-1]}); "
                               f"check the data and the model's numerics (e.g. bfloat16 overflow)")


@memory_lib.explain_out_of_memory
def attribute(model, data: Union[str, Pairs], method: str = "EAP-IG-inputs", metric: str = "logit_diff",
              ig_steps: int = 5, batch_size: int = 16,
              intervention: Literal["patching", "zero", "mean", "mean-positional"] = "patching",
              exact_chunk: int = 64, quiet: bool = False, remat: bool = False, mesh=None,
              max_memory: Union[str, int, None] = None, intervention_data: Union[str, Pairs, None] = None,
              positional: bool = False) -> Union[Graph, PositionalGraph]:
    """Score every edge of ``model``'s circuit graph on ``data``.

    model: a :class:`jaxinterp.Model` (``jaxinterp.load_model``).
    data: a pairs CSV path or :class:`jaxinterp.data.Pairs`.
    intervention: what the corrupted activations are: the corrupted prompts' (``patching``),
        zero, or each node's mean output over ``intervention_data``'s clean prompts (default:
        ``data``'s), over all tokens (``mean``) or per position (``mean-positional``); see
        :func:`jaxinterp.interventions.mean_activations`. EAP-IG-inputs and clean-corrupted
        need ``patching``.
    positional: score every (position, edge) (gradient methods; all prompts must have one
        token length): returns a :class:`jaxinterp.positional.PositionalGraph` whose scores
        ``[pos, src, dst]`` sum over positions to the position-free scores.
    Returns a :class:`Graph` whose ``scores [src, dst]`` are the mean over examples, and
    whose ``nodes_scores`` are each node's score summed over its outgoing edges (its
    output's attribution), or, for ``exact``, each node's own exact patching effect.
    remat: recompute each layer in the backward pass instead of storing its activations
        (gradient methods; about one more forward pass, much less memory).
    ``information-flow-routes`` reads the clean prompts only (no metric, labels or
    corrupted prompts; ``intervention`` must be the default) and is selected as MIB does
    with :meth:`Graph.apply_greedy`; ``positional``, ``remat`` and ``max_memory`` are not
    offered with it.
    Models loaded in bfloat16 (``load_model(path, dtype=jnp.bfloat16)``) compute in
    bfloat16; edge scores are accumulated in float32.
    mesh: a ``("data", "model")`` :class:`jax.sharding.Mesh` (:func:`jaxinterp.sharding.make_mesh`):
        examples split over ``data``, heads / MLP units / vocabulary over ``model``.
    max_memory: device memory to fit in (``"70GB"``, ``"512MiB"``, bytes): the batch size is
        the largest that :func:`jaxinterp.memory.estimate_peak_bytes` fits (at most the number
        of examples), *instead of* ``batch_size``. Running out of device memory raises
        :class:`jaxinterp.memory.OutOfMemoryError` with what to change.
    """
    check_name("method", method, EDGE_METHODS)
    check_intervention(intervention, intervention_data)
    if method == ROUTES:
        given = [name for name, on in (("intervention", intervention != "patching"), ("positional", positional),
                                       ("remat", remat), ("max_memory", max_memory is not None)) if on]
        if given:
            raise ValueError(f"{ROUTES} reads one clean forward pass: {given[0]} is not offered with it")
    if method in ("EAP-IG-inputs", "clean-corrupted") and intervention != "patching":
        raise ValueError(f"{method} is defined for intervention='patching' only")
    if method == "exact" and model.cfg.per_input_heads:
        raise ValueError("exact is not offered with gemma2_heads='per-input' (its runs start at the destination's "
                         "layer, which needs the scanned layers; per-input heads run unrolled)")
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    run = prepare_run(model, data, metric, intervention, intervention_data, batch_size, mesh)
    if not positional and intervention != "mean-positional":  # position-free: reuse compiled programs
        run.pairs = bucket_length(run.pairs, run.model.cfg.n_ctx)
    pairs, spec = run.pairs, run.model.graph_spec
    if positional:
        if method == "exact":
            raise ValueError("position-aware scores are offered for the gradient methods, not 'exact'")
        check_one_length(pairs.lengths, pairs.n_pos, pairs.corrupted_lengths)
    if max_memory is not None:  # before the means are computed: they use the batch size too
        run.batch_size = memory_lib.batch_size_for(run.model, pairs, method, max_memory, mesh, exact_chunk, quiet)
    if method == "exact":
        scores = exact_edge_scores(run, exact_chunk, quiet)
    elif method == ROUTES:
        kw = dict(cfg=run.model.cfg, grouped_kv=run.model.grouped_kv)
        scores = run.mean(lambda b: batch_routes(run.model.params, b, **kw), method, quiet)
    else:
        steps = ig_steps if method in IG_METHODS else 1  # static in batch_scores: no recompilation over unused steps
        kw = dict(cfg=run.model.cfg, metric=run.metric, intervention=intervention, method=method, ig_steps=steps,
                  remat=remat, positional=positional, grouped_kv=run.model.grouped_kv)
        scores = run.mean(lambda b: batch_scores(run.model.params, b, run.means, **kw), method, quiet)
    scores = scores.astype(np.float32)
    _check_finite(scores, method)
    if positional:
        return PositionalGraph(spec, scores, positions=position_labels(model, pairs))
    graph = Graph(spec, scores)
    graph.nodes_scores = exact_node_scores(run) if method == "exact" else graph.scores.sum(1)
    return graph


def _exact_chunks(spec: GraphSpec, exact_chunk: int) -> list[tuple[int, np.ndarray, np.ndarray, int]]:
    """``(layer, src, dst, n real)`` chunks of ``exact_chunk`` edges (at most the most edges
    into one layer; padded with copies of an edge whose effect is dropped) that share their
    destination's layer. One chunk size: one compiled program."""
    src, dst = np.nonzero(spec.real_edge_mask)
    layer_of = dst_layers(spec)[dst]
    exact_chunk = min(exact_chunk, int(np.bincount(layer_of).max()))
    chunks = []
    for layer in np.unique(layer_of):
        s, d = src[layer_of == layer], dst[layer_of == layer]
        for i in range(0, len(s), exact_chunk):
            n = len(s[i:i + exact_chunk])
            pad = exact_chunk - n
            chunks.append((int(layer), np.concatenate([s[i:i + n], np.repeat(s[i:i + 1], pad)]),
                           np.concatenate([d[i:i + n], np.repeat(d[i:i + 1], pad)]), n))
    return chunks


def exact_edge_scores(run: Run, exact_chunk: int = 64, quiet: bool = True) -> np.ndarray:
    """``[src, dst]`` float64: the mean over ``run``'s examples of each edge's exact
    patching effect, ``exact_chunk`` patched forward passes at a time, each chunk's edges
    into one layer (the runs start there)."""
    spec, mesh = run.model.graph_spec, run.mesh
    chunks = _exact_chunks(spec, exact_chunk)
    kw = dict(cfg=run.model.cfg, metric=run.metric, intervention=run.intervention, grouped_kv=run.model.grouped_kv)
    bar = tqdm(total=run.pairs.n_batches(run.batch_size) * len(chunks), desc="exact", disable=quiet)

    def one_batch(batch) -> np.ndarray:
        total = np.zeros((spec.n_forward, spec.n_backward))
        for layer, src, dst, n in chunks:
            vals = batch_exact(run.model.params, batch, replicate(np.int32(layer), mesh), replicate(src, mesh),
                               replicate(dst, mesh), run.means, **kw)
            np.add.at(total, (src[:n], dst[:n]), to_host(vals)[:n])
            bar.update()
        return total

    scores = run.mean(one_batch)
    bar.close()
    return scores


def exact_node_scores(run: Run) -> np.ndarray:
    """``[src]``: the exact effect of patching each node's output on all its outgoing edges."""
    kw = dict(cfg=run.model.cfg, metric=run.metric, intervention=run.intervention)
    return run.mean(lambda b: batch_exact_nodes(run.model.params, b, run.means, **kw)).astype(np.float32)


def compiled_peak_bytes(cfg: ModelConfig, batch_size: int, n_pos: int, method: str = "EAP-IG-inputs",
                        dtype=jnp.float32, ig_steps: int = 5, metric: str = "logit_diff",
                        exact_chunk: int = 64, grouped_kv: bool = False) -> int:
    """XLA's own figure for one compiled batch of :func:`batch_scores` (:func:`batch_exact`
    for ``exact``) on the default backend: arguments + outputs + temporaries. Compiles the
    program from shapes alone (no weights needed); the check of
    :func:`jaxinterp.memory.estimate_peak_bytes` (which lives here, not in ``memory``, so
    that ``memory`` does not import the methods it estimates)."""
    sds = jax.ShapeDtypeStruct
    i32 = jnp.int32
    batch = {"clean": sds((batch_size, n_pos), i32), "corrupted": sds((batch_size, n_pos), i32),
             "attention_mask": sds((batch_size, n_pos), i32), "lengths": sds((batch_size,), i32),
             "labels": sds((batch_size, 2), i32), "weight": sds((batch_size,), jnp.float32)}
    args = (memory_lib.abstract_params(cfg, dtype), batch)
    if method == "exact":
        edges = sds((exact_chunk,), i32)
        lowered = batch_exact.lower(*args, sds((), i32), edges, edges, cfg=cfg, metric=TaskMetric(metric),
                                    grouped_kv=grouped_kv)
    else:
        lowered = batch_scores.lower(*args, cfg=cfg, method=method, metric=TaskMetric(metric), ig_steps=ig_steps,
                                     grouped_kv=grouped_kv)
    m = lowered.compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
