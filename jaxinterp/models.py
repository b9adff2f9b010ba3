"""One functional transformer whose forward pass is written over the circuit graph.

Every downstream input ``v`` of the graph (a head's q/k/v input, an MLP input, the
logits' input) is computed as

    x_v = resid_v + sum_u coef[u, v] * delta_u                               (*)

where ``resid_v`` is the ordinary residual stream at ``v`` and ``u`` runs over the
upstream nodes before ``v``. With ``coef = 0`` this is the ordinary forward pass. The
intervention's ``mode`` gives ``delta`` its meaning:

* ``"replace"``: ``delta_u = source_u - out_u`` where ``out_u`` is node ``u``'s output
  *in this run*, so ``coef[u, v] = 1`` makes edge ``u->v`` carry ``source_u`` (e.g. the
  corrupted activation) instead. ``coef = 1 - in_graph`` evaluates a circuit.
* ``"add"``: ``delta_u = source_u``, a fixed perturbation.
* ``"grad"``: as ``"add"`` with ``coef`` promised to be zero: the forward skips (*) and
  only its gradient is formed, ``d metric / d coef[u, v] = sum_{batch,pos} source_u .
  d metric / d x_v`` for every edge at once. With ``source = corrupted - clean`` this
  *is* the EAP score; it costs one contraction per layer inside the backward pass.
* ``"grad-replace"``: ``"replace"`` linearised the same way: the gradient carries
  ``source_u - out_u`` with this run's own outputs, so EAP needs no separate clean run
  to form ``corrupted - clean``.
* ``"add-one"``: a single perturbation ``source [1, batch, pos, d_model]`` added to
  every downstream input ``v`` with weight ``coef[0, v]`` (exact patching of one edge,
  without a product over all upstream nodes).

Node outputs are *src-major*, ``[src, batch, pos, d_model]``, so that every contraction
over upstream nodes is a plain matrix product: ``input`` is the token embedding
(positions, attention output biases and other constants are not nodes, as in the
reference), ``a{l}.h{h}`` is ``z_h @ w_o[h]`` and ``m{l}`` is the MLP output.

With sandwich norms (Gemma 2) the attention output joining the residual stream is
``rms_norm(S)``, ``S = sum_h z_h @ w_o[h] (+ b_o)``. Given its scale RMSNorm is linear,
so ``a{l}.h{h}`` is head ``h``'s *share* of the normalised attention output,
``(z_h @ w_o[h]) * (1 + w) / rms(S)``, with the normaliser computed from the whole
layer's ``S`` in the same run (:func:`jaxinterp.ops.rms_norm_shares`). The shares (and
``b_o``'s, a constant like ``b_o`` elsewhere) sum to the normalised output exactly, so
(*) with ``coef = 0`` is still the plain forward; a patched edge into a head changes
``S``, and with it every head's share of that layer, in that run. ``m{l}`` is the
normalised MLP output.

Parameters (``layer`` leading on every block leaf; biases are optional, ``b`` of a norm
is absent for RMSNorm)::

    embed:   w_e [vocab, d_model], w_pos [n_ctx, d_model] (learned positions only)
    blocks:  ln1 {w, b}, attn {w_q [head, d_model, d_head], b_q [head, d_head],
                               w_k, w_v [kv_head, d_model, d_head], b_k, b_v [kv_head, d_head],
                               w_o [head, d_head, d_model], b_o [d_model]},
             ln2 {w, b}, mlp {w_in, b_in, (w_gate, b_gate), w_out, b_out},
             (ln1_post {w}, ln2_post {w} with ``cfg.sandwich_norms``)
    ln_f:    {w, b}
    unembed: w_u [d_model, vocab], (b_u [vocab])

One forward serves every family; :class:`jaxinterp.config.ModelConfig` fields switch
RMSNorm (with Gemma's ``1 + w``), the embedding scale (part of the ``input`` node, so
patching ``input`` patches the scaled embedding), rotary positions (partial, scaled),
grouped-query attention (by default each query head has its own ``<k>``/``<v>`` inputs:
the reference's ``ungroup_grouped_query_attention`` view; with ``cfg.group_kv_inputs``
they are one per key/value head, :mod:`jaxinterp.graph`), sliding windows, gated MLPs,
parallel attention + MLP, and Gemma 2's soft-capping and sandwich norms. Models whose
``cfg.graph_unsupported_reason`` is set run the plain forward only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp

from . import ops
from .config import ModelConfig
from .graph import GraphSpec

Array = jax.Array
Params = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervention:
    """Per-edge intervention for :func:`forward` (see the module docstring).

    coef:   ``[src, dst]`` edge coefficients (entries outside the real edges are ignored), or
            ``[pos, src, dst]``: one per edge and position (position-aware edges; the
            gradient modes then give per-position scores, and ``add-one`` is not offered).
    source: ``[src, batch, pos, d_model]`` activations (``replace``) or differences
            (``add``, ``grad``).
    shift:  optional ``[src]``: node ``u``'s output becomes ``out_u + shift_u * source_u``
            on all its outgoing edges.
    detach: optional ``[src]`` in [0, 1]: scales the gradient that flows back *through* a
            node's output into its inputs (1 cuts it, as a hook that overwrites the
            output does); values are unchanged.
    """

    coef: Array
    source: Array
    shift: Optional[Array] = None
    detach: Optional[Array] = None
    mode: Literal["replace", "add", "grad", "grad-replace", "add-one"] = dataclasses.field(
        default="replace", metadata=dict(static=True))


MODES = ("replace", "add", "grad", "grad-replace", "add-one")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _normed_probe(norm, n_dst: int, resid: Array, norm_params, coef: list, source: list) -> Array:
    """``norm(norm_params, resid)`` broadcast to ``[n_dst, batch, pos, d_model]``: the
    normalised inputs of ``n_dst`` downstream nodes that all see ``resid`` (the grad modes,
    ``coef = 0``). The backward is that of ``norm(broadcast(resid))`` with an edge probe in
    between (each input's own gradient, contracted with ``source`` into ``coef``'s
    cotangent), but nothing of size ``n_dst`` is kept from the forward pass."""
    return jnp.broadcast_to(norm(norm_params, resid)[None], (n_dst,) + resid.shape)


def _normed_probe_fwd(norm, n_dst, resid, norm_params, coef, source):
    return _normed_probe(norm, n_dst, resid, norm_params, coef, source), (resid, norm_params, coef, source)


def _normed_probe_bwd(norm, n_dst, res, g):
    resid, norm_params, coef, source = res
    # The vjp of the norm at n_dst copies of resid (transient, backward only). Not
    # vmap(jax.vjp(norm, ...)[1]) over g: under jit on CPU (jax 0.10.2) that gives wrong
    # gradients for batch * pos >= a few hundred (tests/test_models.py checks this path).
    x = jnp.broadcast_to(resid[None], g.shape)
    # The barrier keeps XLA from fusing the broadcast and the norm's vjp into the edge
    # contraction below: on CPU (jax 0.10.2) that fusion is miscompiled for RMSNorm once
    # batch * pos >= 152 tokens (scores off by up to 2x their scale; eager is right).
    # Minimal reproduction: docs/upstream/jax_cpu_rmsnorm_vjp.py.
    x, g = jax.lax.optimization_barrier((x, g))
    g_params, g_x = jax.vjp(norm, norm_params, x)[1](g)  # g_x per downstream input: [n_dst, batch, pos, d_model]
    # position-aware coefficients [pos, src, dst] keep the position axis of the contraction
    coef_bar = [jnp.einsum("fbpd,vbpd->pfv" if c.ndim == 3 else "fbpd,vbpd->fv", s, g_x.astype(s.dtype),
                           preferred_element_type=jnp.float32).astype(c.dtype)
                for c, s in zip(coef, source)]
    return g_x.sum(0), g_params, coef_bar, [jnp.zeros_like(s) for s in source]


_normed_probe.defvjp(_normed_probe_fwd, _normed_probe_bwd)


def _norm(cfg: ModelConfig, p, x):
    if cfg.norm == "layernorm":
        return ops.layer_norm(x, p["w"], p.get("b"), cfg.norm_eps)
    return ops.rms_norm(x, p["w"], cfg.norm_eps, cfg.norm_offset)


def _rotary(cfg: ModelConfig, n_pos: int):
    """``q or k [batch, pos, head, d_head]`` -> rotated, or None for learned positions.
    Positions are ``0 .. n_pos - 1`` for every row, which is right for right padding."""
    if cfg.positional != "rotary":
        return None
    cos, sin = ops.rotary_tables(
        jnp.arange(n_pos), cfg.rotary_dim or cfg.d_head, cfg.rope_theta, rope_type=cfg.rope_type,
        factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor, original_max_position=cfg.rope_original_max_position)
    return lambda x: ops.apply_rotary(x, cos.astype(x.dtype), sin.astype(x.dtype))


def _node_out(x: Array, iv: Optional["Intervention"], index) -> Array:
    """A node's output as seen downstream: shifted by ``shift * source`` and with the
    gradient into its inputs scaled by ``1 - detach``. ``index`` is a src index or slice;
    ``x`` is ``[batch, pos, d_model]`` or ``[head, batch, pos, d_model]``."""
    if iv is None:
        return x
    if iv.detach is not None:
        d = iv.detach[index]
        d = d[:, None, None, None] if x.ndim == 4 else d
        sg = jax.lax.stop_gradient(x)
        x = sg + (1 - d) * (x - sg)
    if iv.shift is not None:
        sh = iv.shift[index]
        x = x + (sh[:, None, None, None] if x.ndim == 4 else sh) * iv.source[index].astype(x.dtype)
    return x


def forward(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array] = None,
            intervention: Optional[Intervention] = None, input_embeddings: Optional[Array] = None,
            return_node_outputs: bool = False, logit_positions: Optional[Array] = None, remat: bool = False):
    """Run the model on ``tokens [batch, pos]``.

    attention_mask: ``[batch, pos]``, 1 for real tokens (right padding); default all ones.
    intervention: per-edge intervention (module docstring); None runs the plain model.
    input_embeddings: ``[batch, pos, d_model]`` replaces the ``input`` node's output
        (the token embedding), e.g. for integrated gradients over the inputs.
    return_node_outputs: also return every upstream node's output
        ``[src, batch, pos, d_model]``.

    logit_positions: ``[batch]`` or ``[batch, k]`` positions; the logits are computed
        there only, ``[batch, 1 or k, vocab]`` (a metric reads one position per prompt).
    remat: rematerialise each layer in the backward pass (less memory, one more forward).

    Returns float32 logits ``[batch, pos, vocab]`` (and the node outputs).
    """
    run = _run(params, cfg, tokens, attention_mask, intervention, input_embeddings, return_node_outputs,
               logit_positions, remat)
    return (run["logits"], run["outs"]) if return_node_outputs else run["logits"]


def residual_stream(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array] = None,
                    intervention: Optional[Intervention] = None, input_embeddings: Optional[Array] = None):
    """``(logits [batch, pos, vocab], resid [n_layers + 1, batch, pos, d_model])``: the
    residual stream entering each layer (embeddings and positions included) and, last,
    the stream entering the final norm. With an intervention, this run's streams (the
    per-edge inputs of (*) differ from them only where edges are patched)."""
    run = _run(params, cfg, tokens, attention_mask, intervention, input_embeddings, False)
    return run["logits"], jnp.stack(run["resid"])


def _run(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array],
         intervention: Optional[Intervention], input_embeddings: Optional[Array], return_node_outputs: bool,
         logit_positions: Optional[Array] = None, remat: bool = False) -> dict:
    if (intervention is not None or return_node_outputs) and cfg.graph_unsupported_reason:
        raise NotImplementedError(f"no circuit-graph forward: {cfg.graph_unsupported_reason}")
    # unchecked: a model without a graph still runs its plain forward on the index arithmetic
    spec = GraphSpec.from_config(cfg, check_supported=False)
    n_batch, n_pos = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((n_batch, n_pos), jnp.int32)
    masks = {w: ops.attention_mask(attention_mask, w) for w in {cfg.window(i) for i in range(cfg.n_layers)}}
    rotary = _rotary(cfg, n_pos)
    H = cfg.n_heads
    iv = intervention
    if iv is not None and iv.mode not in MODES:
        raise ValueError(f"unknown intervention mode {iv.mode!r}; choose from {MODES}")
    if iv is not None and iv.coef.ndim == 3 and (iv.mode == "add-one" or iv.coef.shape[0] != n_pos):
        raise ValueError(f"position-aware coefficients {iv.coef.shape} need one row per position ({n_pos}) "
                         f"and a mode other than add-one")

    # Node outputs are kept per group (the input, one layer's heads, one MLP) as they are
    # produced: (*) is then a sum of one small product per group, and the backward of the
    # edge probe keeps only these arrays alive (not one copy of the growing stack per layer).
    groups: list[tuple[slice, Array]] = []

    def delta(sl: slice, out: Array) -> Array:
        """``delta_u`` of (*) for the group of nodes ``sl`` whose outputs here are ``out``."""
        if iv.mode == "replace":
            return iv.source[sl] - out
        if iv.mode == "grad-replace":
            return iv.source[sl] - jax.lax.stop_gradient(out)
        return iv.source[sl]

    def edge_inputs(resid, dst: slice, groups: list):
        """(*) for the downstream inputs ``dst`` fed by ``groups`` (those produced so far):
        ``[dst, batch, pos, d_model]`` (modes replace, add, add-one)."""
        n_dst = dst.stop - dst.start
        x = jnp.broadcast_to(resid[None], (n_dst,) + resid.shape)
        if iv.mode == "add-one":
            return x + iv.coef[0, dst].astype(x.dtype)[:, None, None, None] * iv.source[0][None].astype(x.dtype)
        contract = "fbpd,pfv->vbpd" if iv.coef.ndim == 3 else "fbpd,fv->vbpd"
        for sl, out in groups:
            x = x + jnp.einsum(contract, delta(sl, out).astype(x.dtype), iv.coef[..., sl, dst].astype(x.dtype))
        return x

    def normed_inputs(resid, dst: slice, groups: list, norm_params):
        """The normalised downstream inputs ``dst``: ``[dst, batch, pos, d_model]``, or
        ``[batch, pos, d_model]`` (the same for all) without an intervention."""
        if iv is None:
            return _norm(cfg, norm_params, resid)
        if iv.mode in ("grad", "grad-replace"):
            return _normed_probe(functools.partial(_norm, cfg), dst.stop - dst.start, resid, norm_params,
                                 [iv.coef[..., sl, dst] for sl, _ in groups], [delta(sl, out) for sl, out in groups])
        return _norm(cfg, norm_params, edge_inputs(resid, dst, groups))

    if input_embeddings is None:
        emb = ops.embed(params["embed"]["w_e"], tokens)
        if cfg.embed_scale != 1.0:  # Gemma; rounded to the activation dtype first, as Hugging Face does
            emb = emb * jnp.asarray(cfg.embed_scale, emb.dtype)
    else:
        emb = input_embeddings
    emb = _node_out(emb, iv, 0)
    groups.append((slice(0, 1), emb[None]))
    resid = emb
    if cfg.positional == "learned":
        resid = resid + ops.pos_embed(params["embed"]["w_pos"], n_pos)[None]

    def block(layer: int, p, resid, bounds, arrays):
        """One layer given the node outputs so far (``arrays``, one per group):
        ``(resid out, heads [head, batch, pos, d_model], mlp out [batch, pos, d_model])``."""
        groups = [(slice(*b), a) for b, a in zip(bounds, arrays)]
        a0 = spec.qkv_index(layer, "q")
        n_qkv = normed_inputs(resid, slice(a0, a0 + spec.n_attn_inputs), groups, p["ln1"])
        # q per query head, then k and v per query head (default view) or per key/value head
        x_q, x_k, x_v = (n_qkv,) * 3 if iv is None else jnp.split(n_qkv, [H, H + spec.n_kv_inputs])
        h0 = spec.head_index(layer)
        heads = ops.attention_heads(p["attn"], x_q, x_k, x_v, masks[cfg.window(layer)], rotary, head_major=True,
                                    scale=cfg.attn_scale, logit_softcap=cfg.attn_logit_softcap)
        b_o = p["attn"].get("b_o")
        if cfg.sandwich_norms:  # the nodes are the heads' shares of the normalised sum (module docstring)
            heads, b_o = ops.rms_norm_shares(heads, p["ln1_post"]["w"], cfg.norm_eps, cfg.norm_offset, b_o)
        heads = _node_out(heads, iv, slice(h0, h0 + H))
        attn_out = heads.sum(0) if b_o is None else heads.sum(0) + b_o
        if not cfg.parallel_attn_mlp:
            groups.append((slice(h0, h0 + H), heads))

        m_in = resid if cfg.parallel_attn_mlp else resid + attn_out
        mi = spec.mlp_in_index(layer)
        n_m = normed_inputs(m_in, slice(mi, mi + 1), groups, p["ln2"])
        m_out = ops.mlp(p["mlp"], n_m if iv is None else n_m[0], cfg.act_fn)
        if cfg.sandwich_norms:
            m_out = _norm(cfg, p["ln2_post"], m_out)
        m_out = _node_out(m_out, iv, spec.mlp_index(layer))
        return resid + attn_out + m_out, heads, m_out

    resids = []
    for layer in range(cfg.n_layers):
        resids.append(resid)
        p = jax.tree.map(lambda a: a[layer], params["blocks"])
        bounds, arrays = tuple((sl.start, sl.stop) for sl, _ in groups), [a for _, a in groups]
        # remat: the backward recomputes the layer from its inputs instead of keeping its
        # intermediates (attention weights, MLP hidden units) alive
        step = jax.checkpoint(block, static_argnums=(0, 3)) if remat else block
        resid, heads, m_out = step(layer, p, resid, bounds, arrays)
        h0, m_idx = spec.head_index(layer), spec.mlp_index(layer)
        groups.append((slice(h0, h0 + H), heads))
        groups.append((slice(m_idx, m_idx + 1), m_out[None]))

    resids.append(resid)
    n_f = normed_inputs(resid, slice(spec.logits_index, spec.logits_index + 1), groups, params["ln_f"])
    n_f = n_f if iv is None else n_f[0]
    if logit_positions is not None:  # only the positions a metric reads: most of the unembedding is skipped
        n_f = jnp.take_along_axis(n_f, logit_positions.reshape(n_batch, -1)[..., None], axis=1)
    logits = ops.unembed(params["unembed"]["w_u"], n_f, params["unembed"].get("b_u")).astype(jnp.float32)
    logits = ops.softcap(logits, cfg.final_logit_softcap)
    outs = jnp.concatenate([out for _, out in groups]) if return_node_outputs else None
    return {"logits": logits, "outs": outs, "resid": resids}


def node_outputs(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array] = None) -> Array:
    """Every upstream node's output on a plain run, ``[batch, pos, src, d_model]``
    (the transpose of the src-major arrays :func:`forward` works with)."""
    outs = forward(params, cfg, tokens, attention_mask, return_node_outputs=True)[1]
    return jnp.moveaxis(outs, 0, 2)
