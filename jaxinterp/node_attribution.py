"""Node- and neuron-level attribution: a score for every node of the circuit graph, or for
every (node, output dimension), as the reference's ``attribute_node`` computes them
(hannamw/EAP-IG ``eap/attribute_node.py``; MIB's node and neuron levels).

The score of node ``u`` is its activation difference times the gradient of the signed
metric there, summed over examples, positions and (node level) the ``d_model`` output
dimensions:

    score[u, h] = mean over examples of  sum_pos  delta_u[pos, h] * g_u[pos, h]

with ``delta = corrupted - clean`` node outputs (what ``intervention`` patches in) and
``g_u`` the gradient of ``ATTRIBUTION_SIGN * metric`` with respect to node ``u``'s output
as every downstream node sees it. All ``g_u`` come from one backward pass: the forward's
node shift (:class:`jaxinterp.models.EdgeIntervention` ``shift``, ``out_u + source_u``
with ``source = 0``) makes the gradient with respect to ``source`` exactly the gradient at
every node output; nothing else is rerun or copied.

**MLP nodes** (``mlp_gradient``). The reference takes an MLP's gradient at the MLP's
*input* (its backward hook sits on ``hook_mlp_in``) and multiplies it by the MLP's
*output* difference; attention heads and the input use the gradient at their output.
``mlp_gradient="input"`` (the default) computes the reference's quantity, with a second
backward pass whose edge coefficients route ``d metric / d x_m`` (the MLP input before its
norm) onto a spare upstream row; ``"output"`` uses the gradient at the MLP's output like
every other node (then node scores equal the sums of the EAP edge scores over each node's
outgoing edges).

**Gemma 2's head definitions** (``ModelConfig.gemma2_heads``). With the default shared
heads a head node's output is its share of the normalised attention output, and the
scores above are that definition's. With ``"per-input"`` (MIB's definition, the
reference's on TransformerLens) a head node is its raw ``z_h W_O[h]``: its gradient is
taken there, through the layer's ``ln1_post``, as the reference's backward hook on
``hook_result`` does. The MLP input gradient is then not routed through a carrier row (the
forward renormalises every head row's contribution to a downstream input, and a carrier
among the MLP rows cannot be found for every EAP-IG-activations group): it is the MLP's own
vector-Jacobian product, ``d metric / d x_m = J_mlp(x_m)^T d metric / d m``, at the MLP
input ``x_m`` of the same run. On Gemma 2, neuron-level circuits are offered with
per-input heads only (:func:`evaluate_neuron_masks`).

Methods (the reference's, its points and averages):

* ``EAP``: the clean run.
* ``EAP-IG-inputs``: token embeddings ``corrupted + a (clean - corrupted)`` for
  ``a = k / steps``, ``k = 1 .. steps`` (the node version's points; the edge version's are
  ``0 .. steps - 1``), averaged.
* ``EAP-IG-activations``: for each group (the input, a layer's heads, an MLP) and
  ``a = k / steps``, ``k = 1 .. steps``: that group's outputs set to ``a clean + (1 - a)
  corrupted``, the gradient into its inputs cut; all runs averaged.
* ``clean-corrupted``: the clean and the corrupted run, averaged.
* ``exact`` (node level only): the metric change when one node's output is patched on
  all its outgoing edges (:func:`jaxinterp.attribution.exact_node_scores`).

Normalisation as :func:`jaxinterp.attribution.attribute`: the mean over examples; the
reference's scores are these divided by the batch size (equal batches).
"""

from __future__ import annotations

import functools
from typing import Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import ops
from .compiler import jit
from .config import ModelConfig
from .data import Pairs, bucket_length
from .graph import Graph, GraphSpec
from .interventions import check_intervention, corrupted_outputs, metric_values, prepare_run, weighted_sum
from .models import EdgeIntervention, activations, layer_params, norm
from .names import IG_METHODS, METHODS, NEURONS_NEED_PER_INPUT, check_name

LEVELS = ("node", "neuron")
MLP_GRADIENTS = ("input", "output")


def _groups(spec: GraphSpec) -> np.ndarray:
    """``[group, src]`` 0/1: the input, then each layer's heads and its MLP (EAP-IG-activations)."""
    rows = [np.eye(spec.n_forward)[0]]
    for layer in range(spec.n_layers):
        heads = np.zeros(spec.n_forward)
        heads[spec.head_index(layer):spec.head_index(layer) + spec.n_heads] = 1
        rows += [heads, np.eye(spec.n_forward)[spec.mlp_index(layer)]]
    return np.stack(rows).astype(np.float32)


def _carriers(spec: GraphSpec, avoid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(coef [src, dst], rows [layer])``: for each layer an upstream row ``rows[l]`` of
    ``m{l}``'s input, distinct across layers and outside ``avoid`` (rows whose source is in
    use), with ``coef[rows[l], m{l} input] = 1`` and zero elsewhere. In ``add`` mode with
    ``source = s`` (zero), ``d metric / d s[rows[l]]`` is then the gradient at ``m{l}``'s
    input, without changing the forward."""
    real = spec.real_edge_mask
    coef = np.zeros((spec.n_forward, spec.n_backward), np.float32)
    rows, used = [], set()
    for layer in range(spec.n_layers):
        col = spec.mlp_in_index(layer)
        free = [u for u in np.nonzero(real[:, col])[0] if u not in used and not avoid[u]]
        if not free:
            raise ValueError(f"no spare upstream row to read m{layer}'s input gradient from")
        u = int(max(free))
        used.add(u)
        rows.append(u)
        coef[u, col] = 1.0
    return coef, np.asarray(rows, np.int32)


def _point_grads(params, cfg, batch, metric, clean_logits, tokens, emb, shift_rows, base, mlp_coef, mlp_rows,
                 mlp_gradient: str):
    """``(g [src, batch, pos, d_model], g_mlp_in [layer, batch, pos, d_model] or None)`` at
    one point: the gradients of the signed metric at every node's output (as seen
    downstream) and, for ``mlp_gradient="input"``, at every MLP's input. ``tokens``/``emb``:
    the run's prompts and input embeddings (None: the tokens'); ``shift_rows [src]`` and
    ``base [src, ...]``: rows whose outputs are moved by ``base`` with the gradient into
    their inputs cut (EAP-IG-activations; zero otherwise)."""
    spec = GraphSpec.from_config(cfg)
    zeros = jnp.zeros(base.shape, jnp.float32)
    no_coef = jnp.zeros((spec.n_forward, spec.n_backward), jnp.float32)
    ones = jnp.ones(spec.n_forward, jnp.float32)

    def signed(iv):
        values = metric_values(params, cfg, batch, metric, clean_logits, iv, tokens, emb)
        return weighted_sum(metric.sign * values, batch)

    # every row shifted by its source: out_u + base_u + s_u; d/ds at s = 0 is the output gradient
    g = jax.grad(lambda s: signed(EdgeIntervention(no_coef, base + s, ones, shift_rows, mode="grad")))(zeros)
    if mlp_gradient != "input":
        return g, None
    if cfg.per_input_heads:
        run = activations(params, cfg, batch["clean"] if tokens is None else tokens, batch["attention_mask"],
                          EdgeIntervention(no_coef, base, ones, shift_rows, mode="grad"), emb)
        return g, _mlp_input_grads(params, cfg, spec, run["resid"], run["outs"], g, shift_rows)
    # the carrier rows are outside shift_rows: their source s only reaches the MLP inputs (coef)
    g_in = jax.grad(lambda s: signed(EdgeIntervention(mlp_coef, base + s, shift_rows, shift_rows, mode="add")))(zeros)
    return g, g_in[mlp_rows]


def _mlp_input_grads(params, cfg: ModelConfig, spec: GraphSpec, resid: jax.Array, outs: jax.Array, g: jax.Array,
                     detach: jax.Array) -> jax.Array:
    """``[layer, batch, pos, d_model]``: the gradient at every MLP's input (before its norm)
    of a per-input Gemma 2 run (module docstring), each MLP's vector-Jacobian product
    applied to the gradient ``g [src, ...]`` at its output, zero where ``detach [src]`` cuts
    the gradient into the node's inputs. ``resid [layer + 1, ...]``, ``outs [src, ...]``:
    the run's residual streams entering each layer and its node outputs (raw heads), from
    which the MLP input ``resid + ln1_post(sum of the layer's heads + b_o)`` is rebuilt as
    the forward builds it."""
    H = cfg.n_heads
    grads = []
    for layer in range(cfg.n_layers):
        p = layer_params(params, layer)
        h0 = spec.head_index(layer)
        attn = outs[h0:h0 + H].sum(0)
        if p["attn"].get("b_o") is not None:
            attn = attn + p["attn"]["b_o"]
        x = resid[layer] if cfg.parallel_attn_mlp else resid[layer] + norm(cfg, p["ln1_post"], attn)

        def mlp(x, p=p):  # the forward's MLP node, from its input to its (normalised) output
            hidden = ops.mlp_hidden(p["mlp"], norm(cfg, p["ln2"], x), cfg.act_fn)
            return norm(cfg, p["ln2_post"], ops.mlp_out(p["mlp"], hidden))

        m = spec.mlp_index(layer)
        g_out = ((1 - detach[m]) * g[m].astype(jnp.float32)).astype(x.dtype)
        grads.append(jax.vjp(mlp, x)[1](g_out)[0])
    return jnp.stack(grads)


def _products(delta, g, g_mlp_in, mlp_rows) -> jax.Array:
    """``[src + layer, d_model]``: ``sum_{batch, pos} delta * g`` per node and dimension
    (gradients at the outputs), then per MLP the same with the gradient at its input
    (zero when ``g_mlp_in`` is None)."""
    p = jnp.einsum("sbpd,sbpd->sd", delta, g.astype(jnp.float32))
    if g_mlp_in is None:
        return jnp.concatenate([p, jnp.zeros((len(mlp_rows), p.shape[1]), p.dtype)])
    return jnp.concatenate([p, jnp.einsum("lbpd,lbpd->ld", delta[mlp_rows], g_mlp_in.astype(jnp.float32))])


@functools.partial(jit, static_argnames=("cfg", "method", "metric", "ig_steps", "intervention", "mlp_gradient"))
def batch_neuron_scores(params, batch, means=None, *, cfg: ModelConfig, method: str, metric, ig_steps: int = 5,
                        intervention: str = "patching", mlp_gradient: str = "input"):
    """Sums over the batch's examples of the per-example neuron scores, ``[src + layer,
    d_model]``: every node with the gradient at its output, then every MLP with the
    gradient at its input (``mlp_gradient="input"``; zero for ``"output"``, which skips
    that backward pass). Node scores are sums over ``d_model``."""
    spec = GraphSpec.from_config(cfg)
    clean_logits, clean_outs, corr_outs = corrupted_outputs(params, cfg, batch, intervention, means)
    delta = jax.lax.stop_gradient(corr_outs - clean_outs).astype(jnp.float32)
    mlps = np.asarray([spec.mlp_index(layer) for layer in range(spec.n_layers)])
    no_shift = jnp.zeros(spec.n_forward, jnp.float32)
    zero_base = jnp.zeros(delta.shape, jnp.float32)
    coef0, rows0 = (jnp.asarray(a) for a in _carriers(spec, np.zeros(spec.n_forward, bool)))

    def at(tokens, emb=None, shift_rows=no_shift, base=zero_base, coef=coef0, rows=rows0):
        g, g_in = _point_grads(params, cfg, batch, metric, clean_logits, tokens, emb, shift_rows, base, coef, rows,
                               mlp_gradient)
        return _products(delta, g, g_in, mlps)

    if method == "EAP":
        return at(batch["clean"])
    if method == "clean-corrupted":
        return (at(batch["clean"]) + at(batch["corrupted"])) / 2
    if method == "EAP-IG-inputs":
        clean_emb, corr_emb = clean_outs[0], corr_outs[0]

        def step(total, alpha):
            return total + at(batch["clean"], corr_emb + alpha * (clean_emb - corr_emb)), None

        alphas = jnp.arange(1, ig_steps + 1, dtype=jnp.float32) / ig_steps
        return jax.lax.scan(step, jnp.zeros((spec.n_forward + spec.n_layers, delta.shape[-1]), jnp.float32),
                            alphas)[0] / ig_steps
    if method == "EAP-IG-activations":
        groups = _groups(spec)
        # the input group is moved through the input embeddings; the others by shifting their rows
        shifted = groups.copy()
        shifted[:, 0] = 0
        carriers = [_carriers(spec, row > 0) for row in shifted]
        coefs = jnp.asarray(np.stack([c for c, _ in carriers]))
        rows = jnp.asarray(np.stack([r for _, r in carriers]))
        n_steps = ig_steps
        group_of = jnp.repeat(jnp.arange(len(groups)), n_steps)
        alpha_of = jnp.tile(jnp.arange(1, n_steps + 1, dtype=jnp.float32) / n_steps, len(groups))
        groups, shifted = jnp.asarray(groups), jnp.asarray(shifted)
        clean_emb = clean_outs[0]

        def step(total, xs):
            k, alpha = xs  # group k's outputs become clean + (1 - alpha) (corrupted - clean)
            emb = clean_emb + groups[k, 0] * (1 - alpha) * delta[0].astype(clean_emb.dtype)
            base = (1 - alpha) * shifted[k][:, None, None, None] * delta
            return total + at(batch["clean"], emb, shifted[k], base, coefs[k], rows[k]), None

        total = jax.lax.scan(step, jnp.zeros((spec.n_forward + spec.n_layers, delta.shape[-1]), jnp.float32),
                             (group_of, alpha_of))[0]
        return total / group_of.shape[0]
    raise ValueError(f"method {method!r} is not a gradient method")


def check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")


def _check(method: str, level: str, intervention: str, intervention_data, mlp_gradient: str, ig_steps: int) -> None:
    check_level(level)
    check_name("method", method, METHODS)
    check_intervention(intervention, intervention_data)
    if mlp_gradient not in MLP_GRADIENTS:
        raise ValueError(f"mlp_gradient must be one of {', '.join(MLP_GRADIENTS)}, not {mlp_gradient!r}")
    if method in ("EAP-IG-inputs", "clean-corrupted") and intervention != "patching":
        raise ValueError(f"{method} is defined for intervention='patching' only")
    if method == "exact" and level == "neuron":
        raise ValueError("exact patching scores nodes, not neurons (as the reference's attribute_node)")
    if ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")


def _run(model, data, metric, intervention, intervention_data, batch_size, mesh):
    run = prepare_run(model, data, metric, intervention, intervention_data, batch_size, mesh)
    if intervention != "mean-positional":  # position-free: a bucketed length reuses compiled programs
        run.pairs = bucket_length(run.pairs, run.model.cfg.n_ctx)
    return run


def neuron_scores(model, data: Union[str, Pairs], method: str = "EAP", metric: str = "logit_diff", ig_steps: int = 5,
                  batch_size: int = 16, intervention: str = "patching", mlp_gradient: str = "input",
                  intervention_data: Union[str, Pairs, None] = None, mesh=None,
                  quiet: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``(outputs [src, d_model], mlp_inputs [layer, d_model] or None)``, float32 means over
    examples: every node's neuron scores with the gradient at its output, and every MLP's
    with the gradient at its input (``mlp_gradient="input"``, one more backward pass per
    point; None for ``"output"``). :func:`attribute_nodes` assembles a graph from them."""
    _check(method, "neuron", intervention, intervention_data, mlp_gradient, ig_steps)
    run = _run(model, data, metric, intervention, intervention_data, batch_size, mesh)
    spec = run.model.graph_spec
    kw = dict(cfg=run.model.cfg, metric=run.metric, intervention=intervention, method=method,
              ig_steps=ig_steps if method in IG_METHODS else 1, mlp_gradient=mlp_gradient)
    sums = run.mean(lambda b: batch_neuron_scores(run.model.params, b, run.means, **kw), f"{method} (neurons)",
                    quiet).astype(np.float32)
    if not np.isfinite(sums).all():
        from .attribution import AttributionError

        bad = int(np.argwhere(~np.isfinite(sums))[0][0])
        where = spec.forward_names[bad] if bad < spec.n_forward else f"m{bad - spec.n_forward} (input gradient)"
        raise AttributionError(f"{method}: non-finite scores (first at node {where}); check the data and the "
                               f"model's numerics (e.g. bfloat16 overflow)")
    return sums[:spec.n_forward], (sums[spec.n_forward:] if mlp_gradient == "input" else None)


def assemble(outputs: np.ndarray, mlp_inputs: Optional[np.ndarray], spec: GraphSpec) -> np.ndarray:
    """``[src, d_model]``: ``outputs`` with the MLP rows replaced by ``mlp_inputs`` (when given)."""
    neurons = np.array(outputs, np.float32)
    if mlp_inputs is not None:
        neurons[[spec.mlp_index(layer) for layer in range(spec.n_layers)]] = mlp_inputs
    return neurons


def attribute_nodes(model, data: Union[str, Pairs], method: str = "EAP", metric: str = "logit_diff",
                    level: Literal["node", "neuron"] = "node", ig_steps: int = 5, batch_size: int = 16,
                    intervention: str = "patching", mlp_gradient: Literal["input", "output"] = "input",
                    intervention_data: Union[str, Pairs, None] = None, mesh=None, quiet: bool = True) -> Graph:
    """Score every node (``level="node"``: ``graph.nodes_scores [src]``) or every node's
    every output dimension (``"neuron"``: ``graph.neurons_scores [src, d_model]``, and
    ``nodes_scores`` their sums) of ``model``'s graph on ``data``; edge scores stay zero.
    See the module docstring for the methods and ``mlp_gradient``. Means over examples
    (the reference's are these divided by its batch size)."""
    _check(method, level, intervention, intervention_data, mlp_gradient, ig_steps)
    graph = Graph(model.graph_spec)
    if method == "exact":
        from .attribution import exact_node_scores

        graph.nodes_scores = exact_node_scores(_run(model, data, metric, intervention, intervention_data,
                                                    batch_size, mesh))
        return graph
    outputs, mlp_inputs = neuron_scores(model, data, method, metric, ig_steps, batch_size, intervention, mlp_gradient,
                                        intervention_data, mesh, quiet)
    neurons = assemble(outputs, mlp_inputs, model.graph_spec)
    graph.nodes_scores = neurons.sum(1)
    if level == "neuron":
        graph.neurons_scores = neurons
    return graph


# --- neuron-level circuits ----------------------------------------------------------------

def _kept_params(params, cfg: ModelConfig, spec: GraphSpec, keep: jax.Array):
    """``params`` whose head and MLP outputs are multiplied by ``keep [src, d_model]`` per
    output dimension (``w_o`` columns per head, ``w_out`` columns and ``b_out`` per MLP):
    a node's output then is ``keep * out`` computed from this run's own inputs. With
    sandwich norms (per-input Gemma 2 heads: raw head outputs) the MLP node's output is
    ``ln2_post``'s, ``y * (offset + w)``, so its scale is masked instead: ``w`` becomes
    ``keep * w - (1 - keep) * offset`` (``w`` itself where kept, scale 0 where not)."""
    L, H = spec.n_layers, spec.n_heads
    rows = keep[1:].reshape(L, H + 1, -1)  # [layer, head + MLP, d_model]
    blocks = dict(params["blocks"])
    attn, mlp = dict(blocks["attn"]), dict(blocks["mlp"])
    attn["w_o"] = attn["w_o"] * rows[:, :H, None, :].astype(attn["w_o"].dtype)
    if cfg.sandwich_norms:
        post = dict(blocks["ln2_post"])
        kept = rows[:, H].astype(post["w"].dtype)
        post["w"] = kept * post["w"] - (1 - kept) * cfg.norm_offset
        blocks["ln2_post"] = post
    else:
        mlp["w_out"] = mlp["w_out"] * rows[:, H, None, :].astype(mlp["w_out"].dtype)
        if "b_out" in mlp:
            mlp["b_out"] = mlp["b_out"] * rows[:, H].astype(mlp["b_out"].dtype)
    blocks["attn"], blocks["mlp"] = attn, mlp
    return dict(params, blocks=blocks)


@functools.partial(jit, static_argnames=("cfg", "metric", "intervention", "chunk"))
def batch_neuron_circuit_metrics(params, batch, neurons, means=None, *, cfg: ModelConfig, metric, intervention: str,
                                 chunk: int = 8) -> jax.Array:
    """Weighted metric sums ``[circuit]`` over the batch for neuron circuits ``neurons
    [circuit, src, d_model]`` (bool): each node's output dimension outside the circuit
    carries ``intervention``'s value on every outgoing edge, the others this run's own
    output. That is the reference's neuron-level ``evaluate_graph``: with neurons, an
    edge's membership no longer matters (its mask ``(1 - in_graph * node_fully_in) * (1 -
    neuron)`` is ``1 - neuron``). Built from the forward's node shift: ``keep * out``
    through masked output weights, plus ``(1 - keep) * corrupted`` as a shift."""
    spec = GraphSpec.from_config(cfg)
    clean_logits, clean_outs, corr_outs = corrupted_outputs(params, cfg, batch, intervention, means)
    no_coef = jnp.zeros((spec.n_forward, spec.n_backward), jnp.float32)
    shift = jnp.ones(spec.n_forward, jnp.float32).at[0].set(0.0)

    def one(keep):
        keep = keep.astype(jnp.float32)
        drop = (1.0 - keep)[:, None, None, :]
        # the input has no inputs of its own: its output is fixed, given as the embeddings
        emb = (keep[0] * clean_outs[0] + (1.0 - keep[0]) * corr_outs[0]).astype(clean_outs.dtype)
        iv = EdgeIntervention(no_coef, drop * corr_outs.astype(jnp.float32), shift, mode="grad")
        values = metric_values(_kept_params(params, cfg, spec, keep), cfg, batch, metric, clean_logits, iv,
                               input_embeddings=emb)
        return weighted_sum(values, batch)

    return jax.lax.map(one, neurons, batch_size=chunk)


def check_neuron_circuits(cfg: ModelConfig) -> None:
    """Refuse neuron-level circuits on Gemma 2 with shared heads (:func:`evaluate_neuron_masks`)."""
    if cfg.sandwich_norms and not cfg.per_input_heads:
        raise ValueError(f"neuron-level circuits on Gemma 2 need gemma2_heads='per-input' ({NEURONS_NEED_PER_INPUT})")


def evaluate_neuron_masks(model, neurons: np.ndarray, data: Union[str, Pairs], metric: str = "logit_diff",
                          intervention: str = "patching", batch_size: int = 16, chunk: int = 8, mesh=None,
                          quiet: bool = True, intervention_data: Union[str, Pairs, None] = None) -> np.ndarray:
    """``[circuit]``: the mean metric over ``data``'s examples of each neuron circuit
    ``neurons [circuit, src, d_model]`` (see :func:`batch_neuron_circuit_metrics`). Gemma 2
    (sandwich norms) is offered with ``gemma2_heads="per-input"`` only (raw head outputs,
    the reference's neuron-level ``evaluate_graph``: a layer's attention output is
    ``ln1_post`` of its heads' kept dimensions plus the others' patched values): a shared
    head's output is its share of the *normalised* layer output, whose dimensions are not
    the output weights' columns.
    ``intervention_data``: what the ``mean`` interventions average over, or the ``optimal``
    intervention's constants (:func:`jaxinterp.interventions.intervention_means`)."""
    from .sharding import replicate

    cfg = model.cfg
    check_neuron_circuits(cfg)
    run = prepare_run(model, data, metric, intervention, intervention_data, batch_size, mesh)
    if intervention != "mean-positional":
        run.pairs = bucket_length(run.pairs, cfg.n_ctx)
    spec = run.model.graph_spec
    neurons = np.asarray(neurons, bool)
    if neurons.ndim != 3 or neurons.shape[1:] != (spec.n_forward, cfg.d_model):
        raise ValueError(f"neuron masks have shape {neurons.shape}, expected [circuit, {spec.n_forward}, {cfg.d_model}]")
    masks = replicate(neurons, mesh)
    kw = dict(cfg=run.model.cfg, metric=run.metric, intervention=intervention, chunk=chunk)
    return run.mean(lambda b: batch_neuron_circuit_metrics(run.model.params, b, masks, run.means, **kw),
                    "evaluate neurons", quiet)
