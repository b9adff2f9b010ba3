"""Information-flow routes (Ferrando & Voita 2024) as edge scores, the reference's
``attribute(..., method='information-flow-routes')`` (hannamw/EAP-IG).

No metric, no corrupted prompts, no gradient: one clean forward pass. An edge ``u -> v``
scores how much of the downstream input ``x_v`` (the residual stream a head's q/k/v
input or an MLP's input reads before its norm, or the stream entering the final norm for
``logits``) node ``u``'s output makes up, at every real token:

    proximity[u, v] = max(0, |x_v|_1 - |x_v - out_u|_1)      (L1 norms over d_model)
    importance[u, v] = proximity[u, v] / sum_{u' upstream of v} proximity[u', v]

averaged over each prompt's real positions, then over prompts. Every input of one
layer's attention reads the same stream, so its q, k and v columns are equal (per head
and, in the grouped view, per key/value head). Node outputs are the graph forward's
(:mod:`jaxinterp.models`): the token embedding, each head's ``z_h @ w_o[h]``, each MLP's
output; ``x_v`` also holds what is not a node (positions, attention output biases).

Where no upstream node is close to ``x_v`` (every proximity zero; e.g. layer 0 of a model
whose position embedding outweighs the token embedding) the reference divides 0 by 0
and its scores become NaN; here that position contributes 0 to every edge into ``v``.

The reference's greedy route selection is :meth:`jaxinterp.graph.Graph.apply_greedy`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .compiler import jit
from .config import ModelConfig
from .graph import GraphSpec
from .models import activations

METHOD = "information-flow-routes"


def input_groups(spec: GraphSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(group of each dst [dst], upstream count of each group [group])``. A group is one
    residual stream read by downstream inputs: ``2 l`` layer ``l``'s attention inputs,
    ``2 l + 1`` its MLP input, ``2 n_layers`` the logits."""
    group = np.empty(spec.n_backward, np.int64)
    for layer in range(spec.n_layers):
        a = spec.qkv_index(layer, "q")
        group[a:a + spec.n_attn_inputs] = 2 * layer
        group[spec.mlp_in_index(layer)] = 2 * layer + 1
    group[spec.logits_index] = 2 * spec.n_layers
    prev = np.zeros(2 * spec.n_layers + 1, np.int64)
    prev[group] = spec.backward_prev
    return group, prev


def downstream_streams(resid: jax.Array, mlp_out: jax.Array, parallel_attn_mlp: bool) -> jax.Array:
    """``[group, batch, pos, d_model]``: the stream each input group reads (:func:`input_groups`),
    from ``resid [layer + 1, ...]`` (entering each layer, then the final norm) and
    ``mlp_out [layer, ...]``. An MLP reads the stream entering its layer plus the layer's
    attention output (``resid[l + 1] - mlp_out[l]``), or, in parallel, the former."""
    mlp_in = resid[:-1] if parallel_attn_mlp else resid[1:] - mlp_out
    per_layer = jnp.stack([resid[:-1], mlp_in], 1).reshape((-1,) + resid.shape[1:])
    return jnp.concatenate([per_layer, resid[-1:]])


def importance(x: jax.Array, outs: jax.Array, n_upstream) -> jax.Array:
    """``[src, batch, pos]``: each node's share of the proximity to the stream ``x [batch,
    pos, d_model]`` among the first ``n_upstream`` nodes of ``outs [src, batch, pos,
    d_model]`` (zero for the others, and where no node is close)."""
    x = x.astype(jnp.float32)
    prox = jnp.abs(x).sum(-1)[None] - jnp.abs(x[None] - outs.astype(jnp.float32)).sum(-1)
    upstream = (jnp.arange(outs.shape[0]) < n_upstream)[:, None, None]
    prox = jnp.where(upstream, jnp.maximum(prox, 0.0), 0.0)
    total = prox.sum(0, keepdims=True)
    return jnp.where(total > 0, prox / jnp.where(total > 0, total, 1.0), 0.0)


@functools.partial(jit, static_argnames=("cfg", "grouped_kv"))
def batch_routes(params, batch, *, cfg: ModelConfig, grouped_kv: bool = False) -> jax.Array:
    """Sum over the batch's examples (weighted by ``batch["weight"]``) of each example's
    mean over its real positions of every edge's importance: ``[src, dst]`` float32,
    zero outside the real edges, over the graph in the view ``grouped_kv``."""
    spec = GraphSpec.from_config(cfg, grouped_kv)
    acts = activations(params, cfg, batch["clean"], batch["attention_mask"])
    streams = downstream_streams(acts["resid"], acts["mlp_out"], cfg.parallel_attn_mlp)
    group_of, prev = input_groups(spec)
    mask = batch["attention_mask"].astype(jnp.float32)
    per_token = mask * (batch["weight"] / jnp.maximum(batch["lengths"], 1))[:, None]  # [batch, pos]

    def one(xs):  # one group at a time: one [src, batch, pos, d_model] difference lives at once
        x, n_upstream = xs
        return jnp.einsum("fbp,bp->f", importance(x, acts["outs"], n_upstream), per_token)

    per_group = jax.lax.map(one, (streams, jnp.asarray(prev)))  # [group, src]
    scores = per_group[jnp.asarray(group_of)].T
    return jnp.where(jnp.asarray(spec.real_edge_mask), scores, 0.0)
