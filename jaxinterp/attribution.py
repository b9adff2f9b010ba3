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

Scores are the mean over examples of the per-example attribution of
``ATTRIBUTION_SIGN * metric``. The reference divides the same sum by the number of
examples *and* by the batch size (its metric is a batch mean): reference scores equal
ours divided by ``batch_size``.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import memory as memory_lib
from . import metrics as metrics_lib
from .config import ModelConfig
from .data import Pairs, load_pairs, year_token_ids
from .graph import Graph, GraphSpec
from .models import Intervention, forward
from .positional import PositionalGraph, check_one_length
from .sharding import batches as shard_batches, replicate, shard_model, to_host

METHODS = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted", "exact")
INTERVENTIONS = ("patching", "zero", "mean", "mean-positional")


class AttributionError(ValueError):
    """Attribution could not produce trustworthy scores (the message says why)."""


def logit_positions(batch) -> jax.Array:
    """``[batch]``: the position each example's metric reads (its last real token)."""
    return batch["lengths"] - 1


def batch_metric(metric, logits, clean_logits, batch) -> jax.Array:
    """``metric`` per example on logits taken at :func:`logit_positions` only
    (``[batch, 1, vocab]``, see ``forward(..., logit_positions=)``)."""
    return metric(logits, clean_logits, jnp.ones_like(batch["lengths"]), batch["labels"])


def _corrupted_outputs(params, cfg, batch, intervention: str, means=None):
    """``(clean_logits [batch, 1, vocab], clean_outs, corrupted_outs)``; outputs
    ``[src, batch, pos, d_model]``. ``means``: ``[src, pos or 1, d_model]`` node means
    (:func:`intervention_means`) for the ``mean`` interventions. Under ``jit`` whatever a
    caller ignores is not computed."""
    mask, at = batch["attention_mask"], logit_positions(batch)
    clean_logits, clean_outs = forward(params, cfg, batch["clean"], mask, return_node_outputs=True, logit_positions=at)
    if intervention == "patching":
        # the reference runs the corrupted prompt with the clean prompt's attention mask
        _, corr_outs = forward(params, cfg, batch["corrupted"], mask, return_node_outputs=True, logit_positions=at)
    elif intervention == "zero":
        corr_outs = jnp.zeros_like(clean_outs)
    elif intervention in ("mean", "mean-positional"):
        if means is None:
            raise ValueError(f"intervention {intervention!r} needs node means (see intervention_means)")
        corr_outs = jnp.broadcast_to(means[:, None].astype(clean_outs.dtype), clean_outs.shape)
    else:
        raise ValueError(f"unknown intervention {intervention!r}; choose from {INTERVENTIONS}")
    return clean_logits, clean_outs, corr_outs


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_node_sums(params, batch, *, cfg: ModelConfig):
    """``(sums [src, pos, d_model], counts [pos])`` of the node outputs on the batch's clean
    prompts over its real (weighted) examples and tokens."""
    _, outs = forward(params, cfg, batch["clean"], batch["attention_mask"], return_node_outputs=True,
                      logit_positions=logit_positions(batch))
    real = batch["attention_mask"].astype(jnp.float32) * batch["weight"][:, None]
    return jnp.einsum("sbpd,bp->spd", outs.astype(jnp.float32), real), real.sum(0)


def mean_activations(model, data: Union[str, Pairs], per_position: bool = False, batch_size: int = 16,
                     mesh=None, quiet: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every node's mean output over the *clean* prompts of ``data`` (a pairs CSV or
    :class:`Pairs`), real tokens only: ``(means, counts)`` with ``means [src, d_model]``
    averaged over all real tokens, or ``[src, pos, d_model]`` averaged per position over
    the prompts that reach it (zero where none does), and ``counts [pos]`` the number of
    prompts that reach each position.

    The reference (hannamw/EAP-IG ``compute_mean_activations``, commit 795f560) differs
    on purpose: its non-positional mean takes only each prompt's *last* token divided by
    the prompt's length and then averages over *all nodes* (one ``[d_model]`` vector for
    every node), and its positional mean includes padding tokens. Those are not means of
    a node's activation; the means here are.
    """
    if isinstance(data, str):
        data, _ = prepare_data(model, data, "kl_div")
    model = shard_model(model, mesh)
    sums = np.zeros((model.graph_spec.n_forward, data.n_pos, model.cfg.d_model))
    counts = np.zeros(data.n_pos)
    for batch in tqdm(shard_batches(data, batch_size, mesh), total=data.n_batches(batch_size), desc="means",
                      disable=quiet):
        s, c = _batch_node_sums(model.params, batch, cfg=model.cfg)
        sums += to_host(s)
        counts += to_host(c)
    if per_position:
        return (sums / np.maximum(counts, 1)[None, :, None]).astype(np.float32), counts
    return (sums.sum(1) / counts.sum()).astype(np.float32), counts


def intervention_means(model, pairs: Pairs, intervention: str, intervention_data: Union[str, Pairs, None] = None,
                       batch_size: int = 16, mesh=None) -> Optional[np.ndarray]:
    """What the ``mean`` interventions patch in for ``pairs``: ``[src, 1, d_model]``
    (``mean``) or ``[src, pairs.n_pos, d_model]`` (``mean-positional``), from the clean
    prompts of ``intervention_data`` (default: ``pairs`` itself); None for the others."""
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {intervention!r}; choose from {INTERVENTIONS}")
    if intervention in ("patching", "zero"):
        if intervention_data is not None:
            raise ValueError(f"intervention_data is used by the mean interventions only, not {intervention!r}")
        return None
    source = pairs if intervention_data is None else intervention_data
    if intervention == "mean":
        return mean_activations(model, source, False, batch_size, mesh)[0][:, None]
    means, counts = mean_activations(model, source, True, batch_size, mesh)
    covered = int(np.count_nonzero(counts))
    if pairs.lengths.max() > covered:
        raise ValueError(f"mean-positional: the intervention data's prompts are at most {covered} tokens long "
                         f"(BOS included) but the data has prompts of {int(pairs.lengths.max())}; give "
                         f"intervention data whose prompts reach every position")
    # positions past every prompt's end are padding, which cannot influence real tokens
    # (causal attention): any value does there
    means = means[:, :pairs.n_pos]
    return np.pad(means, ((0, 0), (0, pairs.n_pos - means.shape[1]), (0, 0)))


def _objective(params, cfg: ModelConfig, metric, sign: float, batch, clean_logits, source, mode="grad",
               remat: bool = False):
    """``f(coef, tokens, input_embeddings, shift, detach)``: weighted sum of the signed
    metric; its gradient w.r.t. ``coef`` (which must be zero) gives the edge scores."""

    def f(coef, tokens, input_embeddings=None, shift=None, detach=None):
        iv = Intervention(coef, source, shift, detach, mode=mode)
        logits = forward(params, cfg, tokens, batch["attention_mask"], iv, input_embeddings,
                         logit_positions=logit_positions(batch), remat=remat)
        values = batch_metric(metric, logits, clean_logits, batch)
        return (sign * values * batch["weight"]).sum()

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


@functools.partial(jax.jit, static_argnames=("cfg", "method", "metric_name", "ig_steps", "intervention", "remat",
                                             "positional"))
def batch_scores(params, batch, year_ids, means=None, *, cfg: ModelConfig, method: str, metric_name: str,
                 ig_steps: int = 5, intervention: str = "patching", remat: bool = False, positional: bool = False):
    """Sum over the batch's examples of the per-example edge scores: ``[src, dst]``, or
    ``[pos, src, dst]`` when ``positional`` (float32 also for bfloat16 parameters).
    ``remat`` rematerialises each layer; ``means``: see :func:`intervention_means`."""
    spec = GraphSpec.from_config(cfg)
    metric = metrics_lib.get_metric(metric_name, year_ids)
    sign = metrics_lib.ATTRIBUTION_SIGN[metric_name]
    clean_logits, clean_outs, corr_outs = _corrupted_outputs(params, cfg, batch, intervention, means)
    delta = jax.lax.stop_gradient(corr_outs - clean_outs)
    f = _objective(params, cfg, metric, sign, batch, clean_logits, delta, remat=remat)
    grad = jax.grad(f)
    zeros = jnp.zeros(((batch["clean"].shape[1],) if positional else ()) + (spec.n_forward, spec.n_backward),
                      jnp.float32)

    if method == "EAP":
        # the clean run's own outputs form corrupted - clean, so the separate clean run
        # above is only computed when the metric reads the clean logits (KL)
        f_eap = _objective(params, cfg, metric, sign, batch, clean_logits, corr_outs, mode="grad-replace",
                           remat=remat)
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


@functools.partial(jax.jit, static_argnames=("cfg", "metric_name", "intervention"))
def batch_exact(params, batch, year_ids, src, dst, means=None, *, cfg: ModelConfig, metric_name: str,
                intervention: str = "patching"):
    """Exact patching of edges ``(src[i], dst[i])`` one at a time: ``[edges]`` sums over
    the batch of ``sign * (metric(patched) - metric(clean))``."""
    spec = GraphSpec.from_config(cfg)
    metric = metrics_lib.get_metric(metric_name, year_ids)
    sign = metrics_lib.ATTRIBUTION_SIGN[metric_name]
    clean_logits, clean_outs, corr_outs = _corrupted_outputs(params, cfg, batch, intervention, means)
    # A single patched edge cannot change its own source (it lies upstream), so
    # "carry the corrupted value" equals "add the fixed clean->corrupted difference".
    delta = corr_outs - clean_outs
    base = batch_metric(metric, clean_logits, clean_logits, batch)

    def one(s, d):
        coef = jax.nn.one_hot(d, spec.n_backward)[None]
        iv = Intervention(coef, delta[s][None], mode="add-one")
        logits = forward(params, cfg, batch["clean"], batch["attention_mask"], iv,
                         logit_positions=logit_positions(batch))
        values = batch_metric(metric, logits, clean_logits, batch)
        return (sign * (values - base) * batch["weight"]).sum()

    return jax.vmap(one)(src, dst)


def _check_finite(scores: np.ndarray, what: str) -> None:
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise AttributionError(f"{what}: non-finite scores (first at src={bad[-2]}, dst={bad[-1]}); "
                               f"check the data and the model's numerics (e.g. bfloat16 overflow)")


def position_labels(model, pairs: Pairs) -> list[str]:
    """A label per position: ``{index}:{first prompt's token}`` (indices only without a tokenizer)."""
    if model.tokenizer is None:
        return [str(p) for p in range(pairs.n_pos)]
    return [f"{p}:{model.tokenizer.convert_ids_to_tokens(int(t))}" for p, t in enumerate(pairs.clean[0])]


def prepare_data(model, data: Union[str, Pairs], metric: str) -> tuple[Pairs, Optional[np.ndarray]]:
    """Tokenise ``data`` (a CSV path or :class:`Pairs`) and get the metric's extra inputs."""
    if isinstance(data, str):
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: the model directory has no tokenizer to read {data} with")
        data = load_pairs(data, model.tokenizer, model.cfg.vocab_size, model.cfg.n_ctx)
    if metric not in metrics_lib.METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; choose from {metrics_lib.METRIC_NAMES}")
    year_ids = None
    if data.labels.ndim == 1:
        if metric == "logit_diff":
            raise ValueError("logit_diff needs correct_idx/incorrect_idx labels; this data has integer "
                             "'label' values (greater-than): use --metric prob_diff")
        if model.tokenizer is None:
            raise ValueError("integer labels need the model's tokenizer to find the year tokens")
        year_ids = year_token_ids(model.tokenizer)
    return data, (np.zeros(100, np.int32) if year_ids is None else year_ids)


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
        :func:`mean_activations`. EAP-IG-inputs and clean-corrupted need ``patching``.
    positional: score every (position, edge) (gradient methods; all prompts must have one
        token length): returns a :class:`jaxinterp.positional.PositionalGraph` whose scores
        ``[pos, src, dst]`` sum over positions to the position-free scores.
    Returns a :class:`Graph` whose ``scores [src, dst]`` are the mean over examples, and
    whose ``nodes_scores`` are each node's score summed over its outgoing edges (its
    output's attribution), or, for ``exact``, each node's own exact patching effect.
    remat: recompute each layer in the backward pass instead of storing its activations
        (gradient methods; about one more forward pass, much less memory).
    Models loaded in bfloat16 (``load_model(path, dtype=jnp.bfloat16)``) compute in
    bfloat16; edge scores are accumulated in float32.
    mesh: a ``("data", "model")`` :class:`jax.sharding.Mesh` (:func:`jaxinterp.sharding.make_mesh`):
        examples split over ``data``, heads / MLP units / vocabulary over ``model``.
    max_memory: device memory to fit in (``"70GB"``, ``"512MiB"``, bytes): the batch size is
        the largest that :func:`jaxinterp.memory.estimate_peak_bytes` fits (at most the number
        of examples), *instead of* ``batch_size``. Running out of device memory raises
        :class:`jaxinterp.memory.OutOfMemoryError` with what to change.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {intervention!r}; choose from {INTERVENTIONS}")
    if method in ("EAP-IG-inputs", "clean-corrupted") and intervention != "patching":
        raise ValueError(f"{method} is defined for intervention='patching' only")
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    pairs, year_ids = prepare_data(model, data, metric)
    if positional:
        if method == "exact":
            raise ValueError("position-aware scores are offered for the gradient methods, not 'exact'")
        check_one_length(pairs.lengths, pairs.n_pos, pairs.corrupted_lengths)
    if max_memory is not None:
        batch_size = memory_lib.batch_size_for(model, pairs, method, max_memory, mesh, exact_chunk, quiet)
    model, year_ids = shard_model(model, mesh), replicate(year_ids, mesh)
    means = replicate(intervention_means(model, pairs, intervention, intervention_data, batch_size, mesh), mesh)
    spec = model.graph_spec
    total = np.zeros(((pairs.n_pos,) if positional else ()) + (spec.n_forward, spec.n_backward), np.float64)
    n_batches = pairs.n_batches(batch_size)
    kw = dict(cfg=model.cfg, metric_name=metric, intervention=intervention)
    if method == "exact":
        src, dst = np.nonzero(spec.real_edge_mask)
        pad = (-len(src)) % exact_chunk
        src_p, dst_p = np.concatenate([src, np.zeros(pad, int)]), np.concatenate([dst, np.zeros(pad, int)])
        bar = tqdm(total=n_batches * len(src_p) // exact_chunk, desc="exact", disable=quiet)
        for batch in shard_batches(pairs, batch_size, mesh):
            for i in range(0, len(src_p), exact_chunk):
                vals = batch_exact(model.params, batch, year_ids, replicate(src_p[i:i + exact_chunk], mesh),
                                   replicate(dst_p[i:i + exact_chunk], mesh), means, **kw)
                np.add.at(total, (src_p[i:i + exact_chunk], dst_p[i:i + exact_chunk]),
                          np.where(np.arange(i, i + exact_chunk) < len(src), to_host(vals), 0.0))
                bar.update()
        bar.close()
    else:
        steps = ig_steps if "IG" in method else 1  # static in batch_scores: no recompilation over unused steps
        for batch in tqdm(shard_batches(pairs, batch_size, mesh), total=n_batches, desc=method, disable=quiet):
            total += to_host(batch_scores(model.params, batch, year_ids, means, method=method, ig_steps=steps,
                                          remat=remat, positional=positional, **kw))
    scores = (total / len(pairs)).astype(np.float32)
    _check_finite(scores, method)
    if positional:
        return PositionalGraph(spec, scores, positions=position_labels(model, pairs))
    graph = Graph(spec, scores)
    graph.nodes_scores = (exact_node_scores(model, pairs, metric, batch_size, intervention, year_ids, mesh, means)
                          if method == "exact" else graph.scores.sum(1))
    return graph


@functools.partial(jax.jit, static_argnames=("cfg", "metric_name", "intervention"))
def _batch_exact_nodes(params, batch, year_ids, means=None, *, cfg, metric_name, intervention):
    spec = GraphSpec.from_config(cfg)
    metric = metrics_lib.get_metric(metric_name, year_ids)
    sign = metrics_lib.ATTRIBUTION_SIGN[metric_name]
    clean_logits, clean_outs, corr_outs = _corrupted_outputs(params, cfg, batch, intervention, means)
    base = batch_metric(metric, clean_logits, clean_logits, batch)
    real = jnp.asarray(spec.real_edge_mask, jnp.float32)

    def one(node):
        coef = jax.nn.one_hot(node, spec.n_forward)[:, None] * real  # all of the node's outgoing edges
        logits = forward(params, cfg, batch["clean"], batch["attention_mask"], Intervention(coef, corr_outs),
                         logit_positions=logit_positions(batch))
        values = batch_metric(metric, logits, clean_logits, batch)
        return (sign * (values - base) * batch["weight"]).sum()

    return jax.lax.map(one, jnp.arange(spec.n_forward))


def exact_node_scores(model, pairs: Pairs, metric: str, batch_size: int, intervention: str,
                      year_ids, mesh=None, means=None) -> np.ndarray:
    """``[src]``: the exact effect of patching each node's output on all its outgoing edges."""
    total = np.zeros(model.graph_spec.n_forward)
    for batch in shard_batches(pairs, batch_size, mesh):
        total += to_host(_batch_exact_nodes(model.params, batch, year_ids, means, cfg=model.cfg,
                                            metric_name=metric, intervention=intervention))
    return (total / len(pairs)).astype(np.float32)
