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

``cfg.gemma2_heads = "per-input"`` is MIB's definition instead (the reference on
TransformerLens): ``a{l}.h{h}`` is the raw ``z_h @ w_o[h]``, and a downstream input ``v``
sees layer ``l``'s attention as ``rms_norm(S_l + sum_{h in l} coef[h, v] delta_h)``, its
own mix of heads renormalised, in place of (*)'s linear term for those heads
(``S_l``: this run's raw sum and ``b_o``). The gradient modes keep (*)'s linear term,
``delta_h . d metric / d x_v`` with the raw ``delta_h``, which is what the reference's
EAP scores are (it is not the derivative of that renormalisation). The layers run
unrolled, and a single-edge ``add-one`` run is not offered.

Parameters: a nested dict whose leaves, logical axes (``layer`` leading on every block
leaf) and optional leaves are the table :data:`jaxinterp.layout.LEAVES` (print it with
``python -m jaxinterp.layout``). The forward reads an optional leaf (biases, ``w_gate``,
a norm's ``b``) by its presence; conversion checks presence against the config.

One forward serves every family; :class:`jaxinterp.config.ModelConfig` fields switch
RMSNorm (with Gemma's ``1 + w``), the embedding scale (part of the ``input`` node, so
patching ``input`` patches the scaled embedding), rotary positions (partial, scaled),
grouped-query attention, sliding windows, gated MLPs, parallel attention + MLP, and
Gemma 2's soft-capping and sandwich norms. The graph's grouped-query view is not in the
config: an intervention's coefficients carry it in their shape (their ``dst`` axis has
the default view's ``n_backward``, each query head with its own ``<k>``/``<v>`` inputs as
the reference's ``ungroup_grouped_query_attention``, or the grouped view's, one per
key/value head; :meth:`jaxinterp.graph.GraphSpec.for_coefficients`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import ops
from .config import ModelConfig
from .graph import GraphSpec
from .sharding import model_ways, split_heads, split_nodes

Array = jax.Array
Params = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EdgeIntervention:
    """Per-edge rewiring for :func:`forward` (see the module docstring). Not the
    ``intervention="patching" | "zero" | "mean"`` choice of the methods, which picks the
    values an ablated edge carries (:mod:`jaxinterp.interventions`) and becomes the
    ``source`` here.

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
    restore: optional ``[src, pos]`` in [0, 1]: node ``u``'s output at ``pos`` becomes
            ``out_u + restore_u (source_u - out_u)`` (1: ``source_u``'s value) on all its
            outgoing edges, in one pass: causal tracing's restoration of a hidden state
            (:mod:`jaxinterp.tracing`), whose later nodes then compute from it.
    """

    coef: Array
    source: Array
    shift: Optional[Array] = None
    detach: Optional[Array] = None
    restore: Optional[Array] = None
    mode: Literal["replace", "add", "grad", "grad-replace", "add-one"] = dataclasses.field(
        default="replace", metadata=dict(static=True))


MODES = ("replace", "add", "grad", "grad-replace", "add-one")
GRAD_MODES = ("grad", "grad-replace")


# --- the edge probe of the gradient modes ------------------------------------------------
# With coef = 0 the forward skips (*); the backward contracts each downstream input's own
# gradient with delta [src, batch, pos, d_model] into coef's cotangent. delta reaches every
# layer's probe as the cotangent of a *carrier*: a zero array of delta's shape that the
# probes pass along in the forward, in layer order, to the logits' probe (the last one),
# whose backward puts delta there and which each earlier probe hands back unchanged. So
# delta is one src-major array, formed once after the forward from this run's outputs
# (grad-replace: EAP's corrupted - clean, with no separate clean run, scanned or not), and
# each probe contracts it in one product. (Per node group instead, as before, XLA:CPU
# re-read each layer's gradients once per group and formed the groups' deltas once per
# layer.) The carrier's forward value is never read, so XLA drops it. Scanned, the carrier
# (and delta) is in pieces, one per segment of layers (:func:`_segments`), and a probe
# contracts the pieces of its own and the earlier segments only.
# A layer's MLP-input probe contracts nothing itself: its backward leaves its input's
# gradient in the carrier's last slot (*pending*, zeros in the forward), and the same
# layer's attention probe, whose backward runs next, contracts its own inputs' gradients
# and that one in one product, so a layer reads delta once (as the MLP's own matrix-vector
# product, delta was read twice per layer: Llama-3-8B EAP, 8 x 64 tokens, 264 of the dots'
# 747 GiB). Rows not upstream of a destination get zero cotangents from the forward's
# coefficients, which are masked to the real edges (_upstream), not from the probes.
_PENDING_ROWS = 1  # the pending slot's rows: the MLP's one input


def _probe_grads(cfg: ModelConfig, resid: Array, norm_params, coef: Optional[Array], delta, gs: tuple,
                 segment: Optional[Array] = None, pending: Optional[Array] = None):
    """``(resid's, norm_params' and coef's cotangents)`` of ``norm(cfg, norm_params, resid)``
    broadcast to the ``[n_dst, ...]`` inputs, in groups of consecutive inputs with
    cotangents ``gs`` (``[n_group, batch, pos, d_model]`` each), edges from ``delta``: one
    array, or a tuple of consecutive pieces of its src rows, one per scanned segment (with
    ``segment`` given, the pieces after the layer's segment are not contracted: their rows
    are not upstream, zeros in the cotangent). ``pending``: ``[n, batch, pos, d_model]``
    gradients of later inputs (a deferred probe's) contracted with them, as ``coef``'s last
    ``n`` columns. ``coef`` None: nothing is contracted, and the third value is the inputs'
    own gradients ``[n_dst, batch, pos, d_model]`` (for a later probe to contract)."""
    # resid's and the norm's own cotangents: the norm's vjp is linear in the cotangent, so
    # one vjp of the summed cotangents. The edges need each input's own: g_x [n_dst, batch,
    # pos, d_model] (transient, backward only), written out by ops.norm_input_vjps. (Taken
    # at n_dst broadcast copies of resid instead, XLA:CPU wrote g_x through a transposing
    # copy; on CPU both are only right with XLA's YNNPACK reduce fusion off, which
    # jaxinterp.compiler does: under a plain jax.jit this was wrong from 32 x 15 tokens.)
    g_params, g_resid = jax.vjp(functools.partial(norm, cfg), norm_params, resid)[1](sum(g.sum(0) for g in gs))
    deltas = delta if isinstance(delta, tuple) else (delta,)
    # per group, then joined: on a mesh each group's cotangents arrive split by heads, and are
    # re-split along d_model before the groups are joined (joined first, the groups' head
    # splits did not line up with the joined array's, and XLA moved it between devices)
    g_x = [split_nodes(norm_input_vjps(cfg, norm_params, resid, g).astype(deltas[0].dtype)) for g in gs]
    if coef is None:
        return g_resid, g_params, g_x[0] if len(g_x) == 1 else jnp.concatenate(g_x)
    g_x += [] if pending is None else [split_nodes(pending.astype(deltas[0].dtype))]
    g_x = g_x[0] if len(g_x) == 1 else jnp.concatenate(g_x)

    def contract(d):
        # position-aware coefficients [pos, src, dst] keep the position axis of the contraction;
        # the others contract as one 2-D product: as a 3-axis einsum XLA:CPU laid both operands
        # out with pos and d_model swapped, through a copy of each every layer
        if coef.ndim == 3:
            return jnp.einsum("fbpd,vbpd->pfv", d, g_x, preferred_element_type=jnp.float32)
        if model_ways() > 1:  # d_model split over the mesh: a flattened (batch, pos, d_model) axis
            # cannot be split by its minor part, and the operands were gathered whole on every device
            return jnp.einsum("fbpd,vbpd->fv", d, g_x, preferred_element_type=jnp.float32)
        return jnp.einsum("fn,vn->fv", d.reshape(d.shape[0], -1), g_x.reshape(g_x.shape[0], -1),
                          preferred_element_type=jnp.float32)

    def upto(k: int) -> Array:  # the pieces 0..k, zeros for the others
        bars = [contract(d) if i <= k else jnp.zeros(coef.shape[:-2] + d.shape[:1] + coef.shape[-1:], jnp.float32)
                for i, d in enumerate(deltas)]
        return bars[0] if len(bars) == 1 else jnp.concatenate(bars, axis=-2)

    # a real branch (the segment is per layer): later segments' products are not run
    coef_bar = upto(len(deltas) - 1) if segment is None else jax.lax.switch(
        segment, [functools.partial(upto, k) for k in range(len(deltas))])
    return g_resid, g_params, coef_bar.astype(coef.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _normed_probe(cfg: ModelConfig, sizes: tuple, resid: Array, norm_params, coef: Optional[Array],
                  carrier: tuple, segment: Optional[Array]):
    """``(norm(norm_params, resid)`` broadcast to ``[n, batch, pos, d_model]`` for each group
    of ``n`` in ``sizes``: the normalised inputs of ``sum(sizes)`` downstream nodes that all
    see ``resid``, ``carrier)``. One array per group (a layer's q, k and v inputs), not one
    split afterwards: on a mesh each group's broadcast is then formed where its heads are
    computed (split, the groups' pieces were moved between devices: Llama-3-70B EAP on 8
    devices, 2 GiB per layer).
    ``carrier``: delta's pieces (scanned: one per segment of layers, ``segment`` this
    layer's), then the pending slot ``[n, batch, pos, d_model]``. Backward: with ``coef``
    ``[(pos,) src, sum(sizes) + n]``, its cotangent from delta's pieces (those after
    ``segment`` are not upstream: zeros) against these inputs' gradients and the pending
    ones, which are then cleared; with ``coef`` None (a deferred probe: ``n ==
    sum(sizes)``), these inputs' gradients become the pending ones. Delta's pieces are passed
    on. Nothing of the inputs' size is kept from the forward pass."""
    y = norm(cfg, norm_params, resid)
    return tuple(jnp.broadcast_to(y[None], (n,) + resid.shape) for n in sizes), carrier


def _normed_probe_fwd(cfg, sizes, resid, norm_params, coef, carrier, segment):
    out = _normed_probe(cfg, sizes, resid, norm_params, coef, carrier, segment)
    return out, (resid, norm_params, coef, segment)


def _normed_probe_bwd(cfg, sizes, res, cts):
    resid, norm_params, coef, segment = res
    g, carrier = cts
    delta, pending = carrier[:-1], carrier[-1]
    # every row of each piece, upstream or not: XLA:CPU copied a slice of delta's upstream
    # rows (a transposing copy for some) before the product, slower than the product it saved
    g_resid, g_params, out = _probe_grads(cfg, resid, norm_params, coef, delta, g, segment, pending)
    seg_bar = None if segment is None else np.zeros(segment.shape, jax.dtypes.float0)
    if coef is None:  # deferred: these gradients are contracted by the next probe back
        return g_resid, g_params, None, delta + (out.astype(pending.dtype),), seg_bar
    return g_resid, g_params, out, delta + (jnp.zeros_like(pending),), seg_bar


_normed_probe.defvjp(_normed_probe_fwd, _normed_probe_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _root_probe(cfg: ModelConfig, resid: Array, norm_params, coef: Array, carrier: Array, delta: Array,
                delta_here: Array):
    """The logits' probe: ``norm(norm_params, resid)[None]``; its backward contracts
    ``delta_here`` (delta at ``resid``'s positions) into ``coef [(pos,) src, 1]``'s cotangent
    and puts ``delta [src, batch, pos, d_model]``, in the carrier's pieces (tuples alike), on
    the carrier for the earlier probes."""
    return norm(cfg, norm_params, resid)[None]


def _root_probe_fwd(cfg, resid, norm_params, coef, carrier, delta, delta_here):
    return _root_probe(cfg, resid, norm_params, coef, carrier, delta, delta_here), (resid, norm_params, coef, delta,
                                                                                     delta_here)


def _root_probe_bwd(cfg, res, g):
    resid, norm_params, coef, delta, delta_here = res
    carrier = delta + (jnp.zeros((_PENDING_ROWS,) + delta[0].shape[1:], delta[0].dtype),)  # nothing pending here
    return _probe_grads(cfg, resid, norm_params, coef, delta_here, (g,)) + (
        carrier, jax.tree.map(jnp.zeros_like, delta), jnp.zeros_like(delta_here))


_root_probe.defvjp(_root_probe_fwd, _root_probe_bwd)


def norm(cfg: ModelConfig, p, x: Array) -> Array:
    """The model's norm (LayerNorm, RMSNorm or Gemma's ``1 + w`` RMSNorm) of ``x [..., d_model]``."""
    if cfg.norm == "layernorm":
        return ops.layer_norm(x, p["w"], p.get("b"), cfg.norm_eps)
    return ops.rms_norm(x, p["w"], cfg.norm_eps, cfg.norm_offset)


def norm_input_vjps(cfg: ModelConfig, p, x: Array, g: Array) -> Array:
    """``x``'s cotangents ``[n, ..., d_model]`` of :func:`norm` at ``x``, one per cotangent
    ``g [n, ..., d_model]`` of its output (:func:`jaxinterp.ops.norm_input_vjps`)."""
    layer_norm = cfg.norm == "layernorm"
    return ops.norm_input_vjps(x, p["w"], cfg.norm_eps, g, layer_norm, 0.0 if layer_norm else cfg.norm_offset)


def embed_input(params: Params, cfg: ModelConfig, tokens: Array) -> Array:
    """The ``input`` node's output, ``[batch, pos, d_model]``: the token embedding, times
    ``cfg.embed_scale`` (Gemma) rounded to the activation dtype first, as Hugging Face does."""
    emb = ops.embed(params["embed"]["w_e"], tokens)
    if cfg.embed_scale != 1.0:
        emb = emb * jnp.asarray(cfg.embed_scale, emb.dtype)
    return emb


def layer_params(params: Params, layer: int) -> Params:
    """Layer ``layer``'s parameters (the ``blocks`` leaves without their leading ``layer`` axis)."""
    return jax.tree.map(lambda a: a[layer], params["blocks"])


def final_logits(params: Params, cfg: ModelConfig, normed: Array) -> Array:
    """Float32 logits ``[..., vocab]`` of the final-normed residual ``normed [..., d_model]``
    (unembedding, its bias, Gemma 2's soft-cap)."""
    logits = ops.unembed(params["unembed"]["w_u"], normed, params["unembed"].get("b_u")).astype(jnp.float32)
    return ops.softcap(logits, cfg.final_logit_softcap)


def _rotary(cfg: ModelConfig, n_pos: int):
    """``q or k [batch, pos, head, d_head]`` -> rotated, or None for learned positions.
    Positions are ``0 .. n_pos - 1`` for every row, which is right for right padding."""
    if cfg.positional != "rotary":
        return None
    cos, sin = ops.rotary_tables(jnp.arange(n_pos), cfg.rotary_dim or cfg.d_head, cfg.rope.theta,
                                 **cfg.rope.scaling())
    return lambda x: ops.apply_rotary(x, cos.astype(x.dtype), sin.astype(x.dtype))


# --- the edge machinery: what (*) adds to the downstream inputs -------------------------

def _mix(delta: Array, coef: Array) -> Array:
    """(*)'s sum for some inputs: ``delta [src, batch, pos, d_model]`` contracted with
    ``coef [src, dst]`` (or position-aware ``[pos, src, dst]``) -> ``[dst, batch, pos, d_model]``."""
    return jnp.einsum("fbpd,pfv->vbpd" if coef.ndim == 3 else "fbpd,fv->vbpd", delta, coef)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["coef", "source", "outs", "posts", "segment"],
                   meta_fields=["mode", "bounds", "scanned", "buffered"])
@dataclasses.dataclass(frozen=True)
class _Edges:
    """What one layer's (or the logits') downstream inputs see of an intervention.

    coef:    ``[(pos,) src, dst]`` this layer's block of coefficients (scanned: masked to
             real edges), or ``[1, dst]`` for ``add-one``.
    source:  ``[src, batch, pos, d_model]`` (``[1, ...]`` for ``add-one``).
    bounds, outs: the upstream rows (*) contracts and what it reads of this run.
             *Buffered* (``replace``, and every mode scanned): for ``replace``, buffers
             ``outs[i]`` of ``delta_u = source_u - out_u``, formed once when node ``u`` is
             produced (rows not produced yet are zero), buffer ``i`` holding rows
             ``bounds[i] = (start, stop)``; the gradient modes' carrier in the same pieces
             (:func:`_normed_probe`); the other modes have one bound ``(0, stop)`` and
             read ``source`` only (None). Unrolled, one buffer ``[src, batch, pos,
             d_model]`` and ``stop`` the number of rows produced so far, so each layer
             contracts its upstream rows only, in one product. Scanned, one buffer per
             segment of layers (:func:`_segments`), each with ``n_heads`` spare rows at its
             end that the other segments' layers write to (so that every layer writes every
             buffer, in place, in one body); a layer contracts the buffers of its own and
             the earlier segments (spare rows and rows not upstream with zero
             coefficients). *Grouped* (unrolled, the other modes, and every mode with
             per-input Gemma 2 heads): ``outs[i] [stop -
             start, batch, pos, d_model]`` this run's outputs of node group ``bounds[i] =
             (start, stop)``, one per group produced so far.
    posts:   grouped only, per group, None or (per-input Gemma 2 heads) ``(S [batch, pos,
             d_model], norm params)``: the layer's raw sum of heads and its output norm,
             which every downstream input applies to its own mix of the group's heads.
    segment: scanned ``replace`` and gradient modes in more than one segment, inside the
             layer loop: the (traced) segment of this layer; None elsewhere.
    """

    coef: Array
    source: Array
    outs: tuple
    mode: str
    bounds: tuple
    scanned: bool = False
    posts: tuple = ()
    buffered: bool = False
    segment: Optional[Array] = None

    def delta(self, i: int) -> Array:
        """``delta_u`` of (*) for group (or buffer) ``i``."""
        if self.buffered and self.mode == "replace":
            start, stop = self.bounds[i]
            return self.outs[i] if self.scanned else self.outs[i][:stop - start]
        src = self.source[slice(*self.bounds[i])]
        if self.mode == "replace":
            return src - self.outs[i]
        return src

    def inputs(self, cfg: ModelConfig, resid: Array, dst: slice) -> Array:
        """(*) for the downstream inputs ``dst`` (modes replace, add, add-one):
        ``[dst, batch, pos, d_model]``."""
        n_dst = dst.stop - dst.start
        x = jnp.broadcast_to(resid[None], (n_dst,) + resid.shape)
        if self.mode == "add-one":
            return x + self.coef[0, dst].astype(x.dtype)[:, None, None, None] * self.source[0][None].astype(x.dtype)
        for i in range(len(self.bounds)):
            mix = _mix(self.delta(i).astype(x.dtype), self.coef_rows(i, self.coef[..., dst]).astype(x.dtype))
            post = self.posts[i] if self.posts else None
            if post is not None:  # per-input heads: this input's own mix of the layer's heads, renormalised
                mix = norm(cfg, post[1], post[0][None] + mix) - norm(cfg, post[1], post[0])[None]
            x = x + mix
        return x

    def coef_rows(self, i: int, coef: Array) -> Array:
        """The rows of ``coef [..., src, dst]`` that group (or buffer) ``i`` holds, scanned
        buffers' spare rows as zeros: ``[..., rows, dst]``."""
        start, stop = self.bounds[i]
        rows = coef[..., start:stop, :]
        spare = self.outs[i].shape[0] - (stop - start) if self.buffered and self.scanned and self.outs[i] is not None \
            else 0
        return jnp.pad(rows, [(0, 0)] * (rows.ndim - 2) + [(0, spare), (0, 0)]) if spare else rows

    def replaced_rows(self, dst: slice) -> Array:
        """Buffered ``replace``: (*)'s sum over the buffers' rows (scanned in segments: of
        this layer's segment and the earlier ones) for the inputs ``dst``: ``[dst, batch,
        pos, d_model]``."""
        coef = self.coef[..., dst]

        def upto(k: int) -> Array:  # the buffers 0..k
            mixes = [_mix(self.delta(i), self.coef_rows(i, coef).astype(self.outs[i].dtype)) for i in range(k + 1)]
            return functools.reduce(jnp.add, mixes)

        if self.segment is None:
            return upto(len(self.outs) - 1)
        # a real branch (the segment is per layer, not batched): later segments' products are not run
        return jax.lax.switch(self.segment, [functools.partial(upto, k) for k in range(len(self.outs))])

    def fresh_rows(self, dst: slice, start, out: Array) -> Array:
        """Buffered ``replace``: (*)'s sum over nodes ``start ..`` that this layer has just
        produced, ``out [n, batch, pos, d_model]`` (as given to :meth:`with_outputs`), for
        the inputs ``dst``: ``[dst, batch, pos, d_model]``."""
        n, buf = out.shape[0], self.outs[-1]
        diff = (jax.lax.dynamic_slice_in_dim(self.source, start, n, 0) - out).astype(buf.dtype)
        coef = self.coef[..., dst]
        return _mix(diff, jax.lax.dynamic_slice_in_dim(coef, start, n, coef.ndim - 2).astype(buf.dtype))

    def normed_inputs(self, cfg: ModelConfig, resid: Array, dst: slice, norm_params,
                      sizes: Optional[tuple] = None, pending: int = 0) -> tuple:
        """``(the normalised downstream inputs dst [dst, batch, pos, d_model], or a tuple of
        them in groups of ``sizes`` consecutive inputs, these edges after them)`` (the
        gradient modes' probe passes the carrier on). Gradient modes: ``pending`` > 0: the
        probe also contracts the pending gradients of the ``pending`` inputs after ``dst``
        (their probe deferred); -1: this probe defers (module comment above
        :func:`_probe_grads`)."""
        groups = (dst.stop - dst.start,) if sizes is None else sizes
        if self.mode in GRAD_MODES:
            coef = None if pending < 0 else self.coef[..., dst.start:dst.stop + pending]
            xs, carrier = _normed_probe(cfg, groups, resid, norm_params, coef, self.outs, self.segment)
            return xs[0] if sizes is None else xs, dataclasses.replace(self, outs=carrier)
        x = norm(cfg, norm_params, self.inputs(cfg, resid, dst))
        return x if sizes is None else _groups(x, sizes), self

    def at_positions(self, idx: Array) -> "_Edges":
        """These edges at positions ``idx [batch, k]`` only (every ``[..., batch, pos,
        d_model]`` array gathered to ``[..., batch, k, d_model]``): the logits' input, read
        at the positions a metric reads. Position-free coefficients only."""
        take = lambda a: None if a is None else _at_positions(a, idx)  # noqa: E731
        posts = tuple(None if p is None else (_at_positions(p[0], idx), p[1]) for p in self.posts)
        return dataclasses.replace(self, source=take(self.source), outs=tuple(take(o) for o in self.outs), posts=posts)

    def with_outputs(self, start, out: Array, post: Optional[tuple] = None) -> "_Edges":
        """These edges after nodes ``start ..`` produced ``out [n, batch, pos, d_model]``
        (``post``: see ``posts``; ``start`` is traced when scanned)."""
        n = out.shape[0]
        if not self.buffered:
            posts = (self.posts or (None,) * len(self.outs)) + (post,)
            return dataclasses.replace(self, outs=self.outs + (out,), posts=posts,
                                       bounds=self.bounds + ((start, start + n),))
        bounds = self.bounds if self.scanned else ((0, start + n),)
        if self.mode != "replace":  # the other modes never read this run's outputs
            return dataclasses.replace(self, bounds=bounds)
        diff = jax.lax.dynamic_slice_in_dim(self.source, start, n, 0) - out  # delta_u, formed once
        if self.segment is None:  # one buffer
            at = [start]
        else:  # this segment's buffer at the nodes' rows, every other one at its spare rows
            at = [jnp.where(self.segment == i, start - a, b - a) for i, (a, b) in enumerate(self.bounds)]
        outs = tuple(split_nodes(jax.lax.dynamic_update_slice_in_dim(buf, diff.astype(buf.dtype), row, 0))
                     for buf, row in zip(self.outs, at))
        return dataclasses.replace(self, outs=outs, bounds=bounds)


def _at_positions(a: Array, idx: Array) -> Array:
    """``a [..., batch, pos, d_model]`` at positions ``idx [batch, k]``: ``[..., batch, k, d_model]``."""
    return jnp.take_along_axis(a, idx.reshape((1,) * (a.ndim - 3) + idx.shape + (1,)), axis=a.ndim - 2)


def _buffered(edges: _Edges, scanned: bool, rows: Optional[tuple] = None, spare: int = 0) -> _Edges:
    """``edges`` entering the first layer (grouped: the ``input`` node's output its only
    group) in the buffered form (``_Edges``), scanned or not: ``replace``'s buffers (scanned,
    one per bound of ``rows``, default one of every row, each with ``spare`` rows more), the
    gradient modes' carrier (zeros of delta's shape and dtype, in pieces as ``replace``'s
    buffers, then the pending slot ``[1, batch, pos, d_model]``: :func:`_normed_probe`)."""
    n_src, emb = edges.source.shape[0], edges.outs[0][0]
    rows = ((0, n_src if scanned else 1),) if rows is None else rows
    dtype = edges.source.dtype if edges.mode == "grad" else jnp.result_type(edges.source.dtype, emb.dtype)
    outs = (None,)
    if edges.mode == "replace":
        outs = tuple(jnp.zeros((n,) + emb.shape, dtype) for n in ([b - a + spare for a, b in rows] if scanned
                                                                    else [n_src]))
        outs = (outs[0].at[0].set((edges.source[0] - emb).astype(dtype)),) + outs[1:]
    elif edges.mode in GRAD_MODES:  # one carrier per bound, scanned; the MLP probe's pending slot last
        outs = tuple(jnp.zeros((n,) + emb.shape, dtype) for n in ([b - a for a, b in rows] if scanned else [n_src])
                     + [_PENDING_ROWS])
    return dataclasses.replace(edges, outs=outs, bounds=rows, scanned=scanned, buffered=True)


def _groups(x: Array, sizes: tuple) -> tuple:
    """``x [sum(sizes), ...]`` split into consecutive groups of ``sizes`` rows."""
    return tuple(jnp.split(x, np.cumsum(sizes)[:-1]))


def _normed(cfg: ModelConfig, edges: Optional[_Edges], resid: Array, dst: slice, norm_params,
            sizes: Optional[tuple] = None, pending: int = 0) -> tuple:
    """``(normalised inputs [dst, batch, pos, d_model] (or in groups, ``sizes``; ``pending``:
    see :meth:`_Edges.normed_inputs`), or [batch, pos, d_model] (the same for all) without
    an intervention, the edges after them)``."""
    if edges is None:
        return norm(cfg, norm_params, resid), None
    return edges.normed_inputs(cfg, resid, dst, norm_params, sizes, pending)


def _node_out(x: Array, nodes: Optional[tuple]) -> Array:
    """Node outputs ``x`` (``[batch, pos, d_model]`` or ``[n, batch, pos, d_model]``) as seen
    downstream: with the gradient into their inputs scaled by ``1 - detach``, moved toward
    ``source`` by ``restore`` and shifted by ``shift * source``. ``nodes``: ``(shift [n] or
    None, detach [n] or None, source [n, ...] or None, restore [n, pos] or None)``."""
    if nodes is None:
        return x
    shift, detach, source, restore = nodes
    expand = (lambda a: a[:, None, None, None]) if x.ndim == 4 else (lambda a: a[0])
    if source is not None:
        source = (source if x.ndim == 4 else source[0]).astype(x.dtype)
    if detach is not None:
        sg = jax.lax.stop_gradient(x)
        x = sg + (1 - expand(detach)) * (x - sg)
    if restore is not None:
        r = (restore[:, None, :, None] if x.ndim == 4 else restore[0][None, :, None]).astype(x.dtype)
        x = x + r * (source - x)
    if shift is not None:
        x = x + expand(shift) * source
    return x


def _block(cfg: ModelConfig, spec: GraphSpec, rotary, key_mask: Array, window, start, p, resid: Array,
           edges: Optional[_Edges], nodes: Optional[tuple], blocked: Optional[Array] = None,
           m_delta: Optional[Array] = None):
    """One transformer layer over the circuit graph, as nanoGPT's block plus (*).

    ``window``: its sliding window (None, or an int); ``start``: the src index of its first
    head; ``p``: its parameters; ``edges``: its :class:`_Edges` (coefficients
    ``[..., src, n_attn_inputs + 1]``) or None (plain forward); ``nodes``: :func:`_node_out`'s
    arrays for its ``head + 1`` nodes; ``blocked``: None or ``[batch or 1, pos_q, pos_k]``
    bool, attention edges knocked out in this layer (every head); ``m_delta``: None or
    ``[batch, pos, d_model]`` added to its MLP node's output. Returns ``(resid out,
    heads [head, batch, pos, d_model], mlp out [batch, pos, d_model], mlp hidden [batch,
    pos, d_mlp], edges after this layer)``.
    """
    H, A = cfg.n_heads, spec.n_attn_inputs
    qkv = (H, spec.n_kv_inputs, spec.n_kv_inputs)  # q per query head, k and v per query or key/value head
    head_nodes, mlp_nodes = (None, None) if nodes is None else (
        tuple(None if a is None else a[:H] for a in nodes), tuple(None if a is None else a[H:] for a in nodes))
    early = None
    if edges is not None and edges.buffered and edges.mode == "replace":
        # (*) over the rows produced before this layer for all its inputs, the MLP's too, in
        # one product: the [src, batch, pos, d_model] buffer is read once per layer, not
        # twice (the MLP's own product was a matrix-vector one, bound by that read)
        early = edges.replaced_rows(slice(0, A + 1)).astype(resid.dtype)
        x_q, x_k, x_v = _groups(norm(cfg, p["ln1"], resid[None] + early[:A]), qkv)
    else:
        # the gradient modes' probe also contracts the MLP input's gradient, which its probe defers
        x, edges = _normed(cfg, edges, resid, slice(0, A), p["ln1"], qkv, pending=_PENDING_ROWS)
        x_q, x_k, x_v = (x,) * 3 if edges is None else x
    if edges is not None:
        # per-head k/v inputs kept split along d_model, like the projections' weights
        # (sharding.LEAF_RULES): under grouped-query attention whose key/value heads the model
        # axis does not divide, their gradients were otherwise formed split by query heads,
        # and XLA regathered each layer's k/v weights whole to form them ("Involuntary full
        # rematerialization"; Llama-3-70B EAP on 16 devices, Gemma-2-2B on 8)
        x_k, x_v = split_nodes(x_k), split_nodes(x_v)
    mask = ops.attention_mask(key_mask, window)
    if blocked is not None:  # attention knockout: the query does not see these keys
        mask = mask & ~blocked
    heads = ops.attention_heads(p["attn"], x_q, x_k, x_v, mask, rotary, head_major=True, scale=cfg.attn_scale,
                                logit_softcap=cfg.attn_logit_softcap, layout=split_heads)
    b_o = p["attn"].get("b_o")
    if cfg.sandwich_norms and not cfg.per_input_heads:  # the heads' shares of the normalised sum (module docstring)
        heads, b_o = ops.rms_norm_shares(heads, p["ln1_post"]["w"], cfg.norm_eps, cfg.norm_offset, b_o)
    heads = _node_out(heads, head_nodes)
    attn_out = heads.sum(0) if b_o is None else heads.sum(0) + b_o
    post = None
    if cfg.per_input_heads:  # raw heads; each downstream input renormalises its own mix (module docstring)
        post = (attn_out, p["ln1_post"])
        attn_out = norm(cfg, p["ln1_post"], attn_out)
    if edges is not None and not cfg.parallel_attn_mlp:  # the MLP reads this layer's heads
        edges = edges.with_outputs(start, heads, post)

    m_in = resid if cfg.parallel_attn_mlp else resid + attn_out
    if early is None:
        x, edges = _normed(cfg, edges, m_in, slice(A, A + 1), p["ln2"], pending=-1)
    else:
        m_in = m_in[None] + early[A:]
        if not cfg.parallel_attn_mlp:  # and this layer's heads, produced since
            m_in = m_in + edges.fresh_rows(slice(A, A + 1), start, heads).astype(m_in.dtype)
        x = norm(cfg, p["ln2"], m_in)
    hidden = ops.mlp_hidden(p["mlp"], x if edges is None else x[0], cfg.act_fn)
    m_out = ops.mlp_out(p["mlp"], hidden)
    if cfg.sandwich_norms:
        m_out = norm(cfg, p["ln2_post"], m_out)
    m_out = _node_out(m_out, mlp_nodes)
    if m_delta is not None:  # a value delta (ROME's v*, MEMIT's z): the node's output moves, downstream sees it
        m_out = m_out + m_delta.astype(m_out.dtype)
    if edges is not None:
        if cfg.parallel_attn_mlp:  # the heads join the stream beside the MLP
            edges = edges.with_outputs(start, heads, post)
        edges = edges.with_outputs(start + H, m_out[None])
    # the node outputs kept for the edges, split over a model axis (jaxinterp.sharding.split_nodes)
    return resid + attn_out + m_out, split_nodes(heads), split_nodes(m_out), hidden, edges


# --- the layer loop: unrolled, or one lax.scan over stacked layers ----------------------

SCAN_MIN_LAYERS = 6
"""``forward(scan=None)`` scans from this depth on (unrolled below; see :func:`forward`).

Scanned, compile time is independent of depth (narrow Llama EAP: 8.2 s at 12 layers,
10.3 s at 48; unrolled 31 s at 12, 126 s at 24), and circuit evaluation holds ~3 node-output
arrays per circuit instead of ~10-22. One EAP batch at GPT-2-small's width (32 x 16 tokens;
2-core Xeon, idle) compiles and runs in: 2 layers, unrolled 1.65 s + 0.38 s, scanned
1.95 s + 0.43 s; 4 layers, 2.49 + 0.77 s against 2.00 + 0.87 s; 8 layers, 4.25 + 1.6-2.1 s
against 1.98 + 1.8 s; 12 layers, 6.3 + 2.6 s against 2.2 + 2.7 s. So shallow models stay
unrolled and from 6 layers on the compile saved outweighs the run: a whole `jaxinterp
attribute` at 12 layers takes 6.0 s cold and 4.1-4.5 s warm scanned, 11.5 s and 4.2-4.8 s
unrolled (the scanned program is also quicker to read from the compilation cache)."""


SCAN_SEGMENTS = 2
"""Scanned ``replace`` runs (circuit evaluation) and gradient modes (EAP and its kin) hold
their buffered rows in this many segments of layers (fewer if there are fewer layers;
:func:`_segments`)."""


def _segments(spec: GraphSpec, mode: Optional[str]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``[((first layer, stop layer), (first src row, stop row))]``: the scanned layers in
    segments of consecutive layers and the upstream rows each produces (the ``input``
    node's with the first). One segment except for ``replace`` and the gradient modes, whose
    layers then contract the buffered rows (the probes: delta's rows) of their own and the
    earlier segments only, not every row (zeros for those not produced yet, or not
    upstream). EAP's batch, SmolLM2-135M, 32 IOI pairs: 8.3-8.7 -> 7.4-7.9 s, the same
    scores. For ``replace``, (*)'s products are most of a patched forward's time (SmolLM2-
    135M, batch 32 x 24: 2.2 of 3.7 s), and their time grows with the rows read, hardly with
    the inputs fed (XLA:CPU, [28, 301] x [301, 442368]: 85 ms, [8, 301]: 51, [28, 150]:
    47). Two segments read a fifth fewer rows: a batch of two circuits and the clean and
    corrupted runs 9.6-9.8 -> 8.5-8.8 s, a 10-size curve 40.9-41.3 -> 36.6-37.3 s whole
    process (44.2-45.3 -> 42.4-42.9 s in the machine's slower phase), XLA's temporaries 1.60
    -> 1.44 GB. Three or four were no faster (8.7-8.9 s): a layer then adds up more,
    smaller products."""
    L = spec.n_layers
    n = min(SCAN_SEGMENTS, L) if mode in ("replace",) + GRAD_MODES else 1
    cuts = [round(i * L / n) for i in range(n + 1)]
    row = lambda layer: spec.head_index(layer) if layer else 0  # noqa: E731  (head_index(L) = src)
    return [((a, b), (row(a), row(b))) for a, b in zip(cuts, cuts[1:])]


def _layer_coef(spec: GraphSpec, coef: Array) -> tuple[Array, Array]:
    """``(per-layer blocks [layer, ..., src, n_attn_inputs + 1], logits column [..., src, 1])``
    of ``coef [..., src, dst]`` (or ``add-one``'s ``[1, dst]``)."""
    L, A1 = spec.n_layers, spec.n_attn_inputs + 1
    blocks = coef[..., :L * A1].reshape(coef.shape[:-1] + (L, A1))
    return jnp.moveaxis(blocks, -2, 0), coef[..., L * A1:]


def _upstream(spec: GraphSpec, start) -> Array:
    """``[src, n_attn_inputs + 1]`` 0/1: the real edges into the layer whose first head is
    src ``start`` (its attention inputs read the nodes before it; its MLP also reads its
    heads unless attention and MLP run in parallel). Computed, not a constant of size
    ``src x dst``, so that nothing in the compiled program grows with the square of depth."""
    limit = start + jnp.asarray([0] * spec.n_attn_inputs + [0 if spec.parallel_attn_mlp else spec.n_heads])
    return (jnp.arange(spec.n_forward)[:, None] < limit[None, :]).astype(jnp.float32)


def _upstream_coef(spec: GraphSpec, mode: str, coef: Array, start) -> Array:
    """A layer's block of coefficients ``coef [..., src, n_attn_inputs + 1]`` with the rows
    not upstream of it (first head ``start``) zeroed: they are no edges. In both layer
    loops: the scanned one contracts every row, and the gradient modes' probes contract
    every row of delta, so the mask, not the rows read, keeps their cotangents zero.
    (``add-one``'s ``[1, dst]`` has no rows.)"""
    return coef if mode == "add-one" else coef * _upstream(spec, start).astype(coef.dtype)


def _layer_nodes(iv: Optional[EdgeIntervention], cfg: ModelConfig) -> tuple[Optional[tuple], Optional[tuple]]:
    """:func:`_node_out`'s arrays for the input node and for every layer's nodes
    (``[layer, head + 1, ...]``); None where no node is shifted or detached."""
    if iv is None or (iv.shift is None and iv.detach is None and iv.restore is None):
        return None, None
    arrays = (iv.shift, iv.detach, None if iv.shift is None and iv.restore is None else iv.source, iv.restore)
    L, n = cfg.n_layers, cfg.n_heads + 1
    return (tuple(None if a is None else a[:1] for a in arrays),
            tuple(None if a is None else a[1:].reshape((L, n) + a.shape[1:]) for a in arrays))


def _layers(params, cfg: ModelConfig, spec: GraphSpec, resid: Array, key_mask: Array, edges: Optional[_Edges],
            nodes: Optional[tuple], remat: bool, scan: bool, blocked: Optional[Array] = None,
            mlp_delta: Optional[tuple] = None, first: Optional[Array] = None):
    """Every layer. ``edges``: the intervention with the input node's output, coefficients
    ``[..., src, dst]``; ``blocked``: None or ``[layer, batch or 1, pos_q, pos_k]`` knocked-out
    attention edges; ``mlp_delta``: None or ``(layer, delta [batch, pos, d_model])``;
    ``first``: None, or the (traced) first layer to run, ``resid`` entering it (scanned only:
    the layers before pass the stream through and give zero outputs).
    Returns ``(resid, edges for the logits, resid entering each layer
    [layer, ...], heads [layer, head, ...], MLP outputs [layer, ...], MLP hidden
    activations [layer, batch, pos, d_mlp])``."""
    rotary = _rotary(cfg, resid.shape[1])
    starts = [spec.head_index(layer) for layer in range(cfg.n_layers)]
    blocks, logits_coef = (None, None) if edges is None else _layer_coef(spec, edges.coef)
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731  (a layer's slice)
    # remat: the backward recomputes a layer from its inputs instead of keeping its intermediates
    checkpoint = jax.checkpoint if remat else (lambda f: f)

    def layer_delta(layer):  # the delta where ``layer`` is the chosen one, zeros elsewhere (layer may be traced)
        if mlp_delta is None:
            return None
        return (jnp.asarray(layer) == mlp_delta[0]).astype(mlp_delta[1].dtype) * mlp_delta[1]

    if not scan:
        if edges is not None and (edges.mode in GRAD_MODES or edges.mode == "replace" and not cfg.per_input_heads):
            edges = _buffered(edges, False)  # replace: one contraction per layer, upstream rows only
        rs, hs, ms, ks = [], [], [], []
        for layer in range(cfg.n_layers):
            rs.append(resid)
            step = checkpoint(functools.partial(_block, cfg, spec, rotary, key_mask, cfg.window(layer), starts[layer]))
            e = None if edges is None else dataclasses.replace(
                edges, coef=_upstream_coef(spec, edges.mode, blocks[layer], starts[layer]))
            resid, heads, m_out, hidden, edges = step(at(params["blocks"], layer), resid, e,
                                                      None if nodes is None else at(nodes, layer),
                                                      None if blocked is None else blocked[layer],
                                                      layer_delta(layer))
            hs.append(heads)
            ms.append(m_out)
            ks.append(hidden)
        return (resid, None if edges is None else dataclasses.replace(edges, coef=logits_coef),
                jnp.stack(rs), jnp.stack(hs), jnp.stack(ms), jnp.stack(ks))

    # Scanned: one compiled layer body for all layers. Its upstream axis has a fixed width
    # (every src row, zero coefficients for those not upstream), so the bodies are identical;
    # replace's buffers are per segment of layers, a layer contracting only those of its own
    # and the earlier segments (:func:`_segments`).
    n_pos, n_src = resid.shape[1], spec.n_forward
    windows = None if cfg.sliding_window is None else jnp.asarray(
        [cfg.window(layer) or n_pos + 1 for layer in range(cfg.n_layers)], jnp.int32)  # n_pos + 1: no window
    mode, source = (None, None) if edges is None else (edges.mode, edges.source)
    segments = _segments(spec, mode)
    many = len(segments) > 1
    # replace: delta_u of the nodes produced so far (zero beyond), filled in layer by layer (carried)
    bufs, rows = None, ((0, n_src),)
    if mode is not None:
        first_in = _buffered(edges, True, tuple(r for _, r in segments), spec.n_heads if many else 0)
        bufs, rows = first_in.outs, first_in.bounds
    step = checkpoint(functools.partial(_block, cfg, spec, rotary, key_mask))

    def body(carry, xs):
        resid, bufs = carry
        p, coef, window, start, layer_nodes, layer_blocked, index, segment = xs
        # source is closed over, not carried: a loop invariant, never stacked per layer
        if mode is not None:
            coef = _upstream_coef(spec, mode, coef, start)

        def run(resid):
            e = None if mode is None else _Edges(coef, source, bufs, mode, rows, scanned=True, buffered=True,
                                                 segment=segment)
            out, heads, m_out, hidden, e = step(window, start, p, resid, e, layer_nodes, layer_blocked,
                                                None if mlp_delta is None else layer_delta(index))
            return out, heads, m_out, hidden, None if e is None else e.outs

        if first is None:
            out, heads, m_out, hidden, bufs = run(resid)
        else:  # a real branch (the predicate is not batched under vmap): skipped layers cost nothing
            def skip(resid):
                zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(run, resid))
                return (resid,) + zeros[1:4] + (bufs,)

            out, heads, m_out, hidden, bufs = jax.lax.cond(index >= first, run, skip, resid)
        return (out, bufs), (resid, heads, m_out, hidden)

    # the delta itself is closed over (a loop invariant); only the layer index is scanned
    segment_of = jnp.asarray([k for k, ((a, b), _) in enumerate(segments) for _ in range(a, b)], jnp.int32) \
        if many else None
    xs = (params["blocks"], blocks, windows, jnp.asarray(starts, jnp.int32), nodes, blocked,
          None if mlp_delta is None and first is None else jnp.arange(cfg.n_layers), segment_of)
    (resid, bufs), (rs, hs, ms, ks) = jax.lax.scan(body, (resid, bufs), xs)
    edges = None if mode is None else _Edges(logits_coef, source, bufs, mode, rows, scanned=True, buffered=True)
    return resid, edges, rs, hs, ms, ks


def forward(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array] = None,
            intervention: Optional[EdgeIntervention] = None, input_embeddings: Optional[Array] = None,
            return_node_outputs: bool = False, logit_positions: Optional[Array] = None, remat: bool = False,
            scan: Optional[bool] = None, attention_block: Optional[Array] = None,
            mlp_delta: Optional[tuple] = None, resume: Optional[tuple] = None):
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
    scan: run the layers as one ``lax.scan`` over the stacked layer parameters (compile
        time independent of depth) or unrolled (each layer's contraction runs over its
        upstream nodes only); None: scan from :data:`SCAN_MIN_LAYERS` layers on. Both
        compute the same numbers to float rounding.
    attention_block: ``[layer, batch or 1, pos_q, pos_k]`` bool, True where query ``pos_q``
        must not attend to key ``pos_k`` in that layer (every head): attention knockout
        (:mod:`jaxinterp.knockout`). The caller keeps at least one key per query unblocked.
    mlp_delta: ``(layer, delta [batch, pos, d_model])``: ``delta`` is added to that layer's
        MLP node output (the ``m{layer}`` node, so the residual stream and every edge out of
        it see it; ``layer`` may be traced). The value a ROME/MEMIT edit asks for
        (:mod:`jaxinterp.editing`); a node shift without a ``[src, ...]``-sized source.
    resume: ``(layer, resid [batch, pos, d_model])``: start at ``layer`` (may be traced;
        ``n_layers``: only the final norm and unembedding) from ``resid``, the residual
        stream entering it (e.g. :func:`residual_stream`'s of a run whose earlier layers
        are the same). The layers before are skipped (a ``lax.cond`` in the scanned loop,
        so one compiled program serves every ``layer``); their node outputs are zeros, so
        only the plain model or an ``add-one`` intervention into ``layer`` and later may
        be given: exact patching of an edge from its destination's layer
        (:func:`jaxinterp.attribution.batch_exact`).

    Returns float32 logits ``[batch, pos, vocab]`` (and the node outputs).
    """
    run = _run(params, cfg, tokens, attention_mask, intervention, input_embeddings, logit_positions, remat, scan,
               attention_block, mlp_delta, resume)
    return (run["logits"], run["outs"]) if return_node_outputs else run["logits"]


def residual_stream(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array] = None,
                    intervention: Optional[EdgeIntervention] = None, input_embeddings: Optional[Array] = None,
                    scan: Optional[bool] = None, attention_block: Optional[Array] = None):
    """``(logits [batch, pos, vocab], resid [n_layers + 1, batch, pos, d_model])``: the
    residual stream entering each layer (embeddings and positions included) and, last,
    the stream entering the final norm. With an intervention, this run's streams (the
    per-edge inputs of (*) differ from them only where edges are patched)."""
    run = _run(params, cfg, tokens, attention_mask, intervention, input_embeddings, scan=scan, blocked=attention_block)
    return run["logits"], run["resid"]


def activations(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array] = None,
                intervention: Optional[EdgeIntervention] = None, input_embeddings: Optional[Array] = None,
                scan: Optional[bool] = None, attention_block: Optional[Array] = None,
                mlp_delta: Optional[tuple] = None) -> dict:
    """One run of :func:`forward` with its capture points: ``logits [batch, pos, vocab]``,
    ``resid [n_layers + 1, batch, pos, d_model]`` (as :func:`residual_stream`),
    ``mlp_hidden [layer, batch, pos, d_mlp]`` (each MLP's input to ``w_out``: ROME's keys),
    ``mlp_out [layer, batch, pos, d_model]`` and ``outs [src, batch, pos, d_model]``
    (every node's output). Under jit the ones a caller does not read are not computed.
    ``mlp_delta`` as :func:`forward`."""
    run = _run(params, cfg, tokens, attention_mask, intervention, input_embeddings, scan=scan, blocked=attention_block,
               mlp_delta=mlp_delta)
    return {k: run[k] for k in ("logits", "resid", "mlp_hidden", "mlp_out", "outs")}


def use_scan(cfg: ModelConfig) -> bool:
    """``forward(scan=None)``'s choice: scan from :data:`SCAN_MIN_LAYERS` layers on, every
    mode and backend alike. (On CPU the gradient modes once ran unrolled because the
    scanned probe's backward gave wrong scores from 152 tokens per batch; the cause was
    XLA:CPU's YNNPACK reduce fusion, which :mod:`jaxinterp.compiler` turns off.) Per-input
    Gemma 2 heads run unrolled: the scanned layer body has no per-layer groups of heads."""
    return cfg.n_layers >= SCAN_MIN_LAYERS and not cfg.per_input_heads


def _run(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array],
         iv: Optional[EdgeIntervention], input_embeddings: Optional[Array], logit_positions: Optional[Array] = None,
         remat: bool = False, scan: Optional[bool] = None, blocked: Optional[Array] = None,
         mlp_delta: Optional[tuple] = None, resume: Optional[tuple] = None) -> dict:
    # the graph view the coefficients are laid out in (their shape says it; no view without them)
    spec = GraphSpec.from_config(cfg) if iv is None else GraphSpec.for_coefficients(cfg, iv.coef.shape[-1])
    n_batch, n_pos = tokens.shape
    if resume is not None:
        if scan is False or (iv is not None and iv.mode != "add-one") or input_embeddings is not None:
            raise ValueError("resume runs the scanned layers, with no intervention or an add-one one (the skipped "
                             "layers' node outputs are not computed) and no input_embeddings")
        if tuple(resume[1].shape) != (n_batch, n_pos, cfg.d_model):
            raise ValueError(f"resume's residual {tuple(resume[1].shape)} must be [batch={n_batch}, pos={n_pos}, "
                             f"d_model={cfg.d_model}]")
        scan = True
    if cfg.per_input_heads and scan:
        raise ValueError("gemma2_heads='per-input' runs the layers unrolled: scan and resume (exact patching from "
                         "the destination's layer) are not offered with it")
    scan = use_scan(cfg) if scan is None else scan
    if attention_mask is None:
        attention_mask = jnp.ones((n_batch, n_pos), jnp.int32)
    if iv is not None and iv.mode not in MODES:
        raise ValueError(f"unknown intervention mode {iv.mode!r}; choose from {MODES}")
    if iv is not None and iv.coef.ndim == 3 and (iv.mode == "add-one" or iv.coef.shape[0] != n_pos):
        raise ValueError(f"position-aware coefficients {iv.coef.shape} need one row per position ({n_pos}) "
                         f"and a mode other than add-one")
    if mlp_delta is not None and tuple(mlp_delta[1].shape) != (n_batch, n_pos, cfg.d_model):
        raise ValueError(f"mlp_delta's delta {tuple(mlp_delta[1].shape)} must be [batch={n_batch}, pos={n_pos}, "
                         f"d_model={cfg.d_model}]")
    if blocked is not None:
        if blocked.ndim != 4 or blocked.shape[0] != cfg.n_layers or blocked.shape[1] not in (1, n_batch) \
                or blocked.shape[2:] != (n_pos, n_pos):
            raise ValueError(f"attention_block {blocked.shape} must be [layer={cfg.n_layers}, batch={n_batch} or 1, "
                             f"pos_q={n_pos}, pos_k={n_pos}]")
        blocked = blocked.astype(bool)
    in_nodes, nodes = _layer_nodes(iv, cfg)
    emb = _node_out(embed_input(params, cfg, tokens) if input_embeddings is None else input_embeddings, in_nodes)
    resid = emb
    if cfg.positional == "learned":
        resid = resid + ops.pos_embed(params["embed"]["w_pos"], n_pos)[None]
    first = None
    if resume is not None:
        first, resid = jnp.asarray(resume[0], jnp.int32), resume[1].astype(resid.dtype)
    edges = None if iv is None else _Edges(iv.coef, iv.source, (emb[None],), iv.mode, ((0, 1),))
    resid, edges, resids, heads, mlps, hidden = _layers(params, cfg, spec, resid, attention_mask, edges, nodes, remat,
                                                        scan, blocked, mlp_delta, first)

    # only the positions a metric reads: most of the unembedding and, with an intervention,
    # of the logits' contraction over every upstream node is skipped (position-aware
    # coefficients: taken after (*), which needs every position's row of them)
    idx = None if logit_positions is None else logit_positions.reshape(n_batch, -1)
    outs = split_nodes(jnp.concatenate([emb[None], jnp.concatenate([heads, mlps[:, None]], 1)
                                        .reshape((-1,) + emb.shape)]))
    x_f, e_f = resid, edges
    if idx is not None and (edges is None or edges.coef.ndim == 2):
        x_f = _at_positions(resid, idx)
        e_f = None if edges is None or edges.mode in GRAD_MODES else edges.at_positions(idx)
    if edges is not None and edges.mode in GRAD_MODES:  # the logits' probe: delta, formed once, onto the carrier
        carrier = edges.outs  # delta's pieces and the pending slot
        delta = edges.source if edges.mode == "grad" else edges.source - jax.lax.stop_gradient(outs)
        delta = delta.astype(carrier[0].dtype)
        pieces = tuple(delta[a:b] for a, b in edges.bounds) if len(carrier) > 2 else (delta,)
        n_f = _root_probe(cfg, x_f, params["ln_f"], edges.coef, carrier, pieces,
                          delta if x_f is resid else _at_positions(delta, idx))[0]
    else:
        n_f = _normed(cfg, e_f, x_f, slice(0, 1), params["ln_f"])[0]
        n_f = n_f if e_f is None else n_f[0]
    if idx is not None and x_f is resid:  # position-aware coefficients: taken after (*)
        n_f = _at_positions(n_f, idx)
    return {"logits": final_logits(params, cfg, n_f), "outs": outs,
            "resid": jnp.concatenate([resids, resid[None]]), "mlp_hidden": hidden, "mlp_out": mlps}


def node_outputs(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array] = None) -> Array:
    """Every upstream node's output on a plain run, ``[batch, pos, src, d_model]``
    (the transpose of the src-major arrays :func:`forward` works with)."""
    outs = forward(params, cfg, tokens, attention_mask, return_node_outputs=True)[1]
    return jnp.moveaxis(outs, 0, 2)
