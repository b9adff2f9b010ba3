"""Functional transformer ops: pure functions of (params, inputs), safe under jit/vmap/grad.

Shapes are named with one vocabulary everywhere: ``batch, pos, head, kv_head, group,
d_head, d_model, d_mlp, vocab``. Every function here can be imported and used on its own;
the circuit-graph forward in :mod:`jaxinterp.models` is built from them.

Parameters of one layer are the ``blocks/attn`` and ``blocks/mlp`` leaves of the layout
table :data:`jaxinterp.layout.LEAVES` without their leading ``layer`` axis (e.g.
``w_k [kv_head, d_model, d_head]``); biases are optional and read by their presence.

Grouped-query attention stays grouped: queries are reshaped to ``[kv_head, group]``
instead of repeating keys and values.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
Params = Mapping[str, Array]


# --- embeddings -------------------------------------------------------------------------

def embed(w_e: Array, tokens: Array) -> Array:
    """Token embedding. ``w_e [vocab, d_model]``, ``tokens [batch, pos]`` -> ``[batch, pos, d_model]``."""
    return jnp.take(w_e, tokens, axis=0)


def pos_embed(w_pos: Array, n_pos: int) -> Array:
    """Learned absolute positions 0..n_pos-1. ``w_pos [n_ctx, d_model]`` -> ``[pos, d_model]``."""
    if n_pos > w_pos.shape[0]:
        raise ValueError(f"sequence of {n_pos} tokens exceeds the model's context of {w_pos.shape[0]}")
    return w_pos[:n_pos]


def unembed(w_u: Array, x: Array, b_u: Optional[Array] = None) -> Array:
    """``x [..., d_model]`` @ ``w_u [d_model, vocab]`` (+ ``b_u [vocab]``) -> ``[..., vocab]``."""
    logits = jnp.einsum("...d,dv->...v", x, w_u)
    return logits if b_u is None else logits + b_u


# --- norms ------------------------------------------------------------------------------

def layer_norm(x: Array, w: Array, b: Optional[Array], eps: float) -> Array:
    """LayerNorm over the last axis (``d_model``), computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * w
    return (y if b is None else y + b).astype(x.dtype)


def rms_norm(x: Array, w: Array, eps: float, offset: float = 0.0) -> Array:
    """RMSNorm over the last axis; ``offset=1`` gives Gemma's ``(1 + w)`` scaling."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * (offset + w)).astype(x.dtype)


def norm_input_vjps(x: Array, w: Array, eps: float, g: Array, centred: bool, offset: float = 0.0) -> Array:
    """``x``'s cotangents ``[n, ..., d_model]`` (float32) of :func:`layer_norm` (``centred``)
    or :func:`rms_norm` at ``x [..., d_model]``, one per cotangent ``g [n, ..., d_model]``
    of the norm's output. With ``x_hat`` the normalised ``x``, ``r = 1 / rms(x - mean)``
    and ``gw = g * (offset + w)``: ``r (gw - mean(gw) - x_hat mean(gw x_hat))``, RMSNorm
    without the ``mean(gw)`` term.

    ``vmap`` of ``jax.vjp`` over ``g`` to float32 rounding, written out for XLA:CPU, which
    wrote each of the vjp's three reductions' elementwise operands out in full first: here
    two reductions, ``mean(gw)`` a matrix-vector product. (Edge probes of a scanned EAP at
    GPT-2-small's shape, n = 36: 2.69-2.71 s a batch, now 2.53-2.58. As products both means
    were slower, 2.64-2.75 s: XLA transposed ``g`` for the batched one; as sums, 2.66-2.74.)"""
    x32 = x.astype(jnp.float32)
    xc = x32 - x32.mean(-1, keepdims=True) if centred else x32
    r = jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + eps)
    x_hat, scale = xc * r, (offset + w).astype(jnp.float32)
    g = g.astype(jnp.float32)
    d = x.shape[-1]
    out = g * scale - (g * (x_hat * (scale / d))).sum(-1, keepdims=True) * x_hat
    if centred:
        out = out - jnp.einsum("n...d,d->n...", g, scale / d)[..., None]
    return out * r


def rms_norm_shares(parts: Array, w: Array, eps: float, offset: float = 0.0,
                    bias: Optional[Array] = None) -> tuple[Array, Optional[Array]]:
    """RMSNorm of a sum, split into the summands' shares.

    ``parts [n, ..., d_model]`` and optional ``bias [d_model]`` sum to
    ``S = parts.sum(0) + bias``. Given its scale, RMSNorm is linear:
    ``rms_norm(S) = S * (offset + w) / rms(S)``, so part ``i``'s share is
    ``parts[i] * (offset + w) / rms(S)``, with ``rms(S)`` of the *whole* sum. Returns
    ``(shares [n, ..., d_model], bias share [..., d_model] or None)``, which sum to
    ``rms_norm(S, w, eps, offset)`` (to rounding). Gradients flow through ``rms(S)``.
    """
    total = parts.astype(jnp.float32).sum(0)
    if bias is not None:
        total = total + bias.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.square(total).mean(-1, keepdims=True) + eps) * (offset + w.astype(jnp.float32))
    shares = (parts.astype(jnp.float32) * scale).astype(parts.dtype)
    return shares, None if bias is None else (bias.astype(jnp.float32) * scale).astype(parts.dtype)


# --- activations and MLP ----------------------------------------------------------------

def _gelu_fast(x):
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": _gelu_fast,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def mlp(p: Params, x: Array, act_fn: str = "gelu_new") -> Array:
    """Position-wise MLP. ``x [..., d_model]`` -> ``[..., d_model]``:
    ``mlp_out(p, mlp_hidden(p, x, act_fn))``.

    ``p``: ``w_in [d_model, d_mlp]``, optional ``b_in [d_mlp]``, ``w_out [d_mlp, d_model]``,
    optional ``b_out [d_model]``; with ``w_gate [d_model, d_mlp]`` (optional ``b_gate``) it is
    a gated MLP (SwiGLU/GeGLU): ``act(x @ w_gate + b_gate) * (x @ w_in + b_in)``.
    """
    return mlp_out(p, mlp_hidden(p, x, act_fn))


def mlp_hidden(p: Params, x: Array, act_fn: str = "gelu_new") -> Array:
    """The MLP's hidden activation ``[..., d_mlp]`` of ``x [..., d_model]``: the input of
    ``w_out`` (GPT-2's ``c_proj``, Llama's ``down_proj``), the *key* a ROME edit writes to."""
    act = ACTIVATIONS[act_fn]
    h = jnp.einsum("...d,dm->...m", x, p["w_in"])
    if "b_in" in p:
        h = h + p["b_in"]
    if "w_gate" not in p:
        return act(h)
    gate = jnp.einsum("...d,dm->...m", x, p["w_gate"])
    if "b_gate" in p:  # Llama-style mlp_bias: gate_proj has a bias too
        gate = gate + p["b_gate"]
    return act(gate) * h


def mlp_out(p: Params, h: Array) -> Array:
    """``h [..., d_mlp] @ w_out (+ b_out)`` -> ``[..., d_model]``: the MLP's output for a
    hidden activation (a ROME *value*)."""
    out = jnp.einsum("...m,md->...d", h, p["w_out"])
    return out + p["b_out"] if "b_out" in p else out


# --- attention --------------------------------------------------------------------------

def attention_mask(key_mask: Array, window: Optional[int] = None) -> Array:
    """Causal mask combined with key padding (and an optional sliding window).

    ``key_mask [batch, pos]`` (1 for real tokens) -> boolean ``[batch, pos_q, pos_k]``.
    Padded keys are never attended to; padded queries still see the real prefix, so no
    row is fully masked. With ``window``, query ``i`` sees keys ``i - window < j <= i``
    (Hugging Face's ``sliding_window`` convention: ``window`` keys including itself).
    """
    n = key_mask.shape[-1]
    q, k = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed[None] & (key_mask[:, None, :] > 0)


def softcap(x: Array, cap: Optional[float]) -> Array:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping); identity when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def project_heads(x: Array, w: Array, b: Optional[Array] = None) -> Array:
    """Per-head projection.

    ``x [batch, pos, d_model]`` (shared by all heads) or ``[head, batch, pos, d_model]``
    (one input per head, head-major so the per-head matmuls batch over a leading axis),
    ``w [head, d_model, d_head]`` -> ``[batch, pos, head, d_head]``. Per-head inputs may
    outnumber the weights' heads by a whole factor ``g`` (grouped-query attention's per-query-
    head k/v inputs): input ``h`` uses weights ``h // g``.
    """
    if x.ndim == 3:
        y = jnp.einsum("bpd,hde->bphe", x, w)
    else:
        # head-major out, then moved: written as "hbpd,hde->bphe", XLA:CPU transposed every
        # head's input [batch·pos, d_model] first (2.3x the time at SmolLM2's shape,
        # 9 x 768 tokens x 576; ~1.2 s of a 2-circuit evaluation batch). More inputs than
        # weights (one k/v input per query head under grouped-query attention): each
        # key/value head's weights serve its group's inputs, never copied per query head (a
        # scanned forward kept every layer's copy for the backward: 4 GiB at Llama-3-8B)
        group = x.shape[0] // w.shape[0]
        xg = x.reshape((w.shape[0], group) + x.shape[1:])
        y = jnp.moveaxis(jnp.einsum("kgbpd,kde->kgbpe", xg, w).reshape(x.shape[:-1] + w.shape[-1:]), 0, 2)
        if b is not None and group > 1:
            b = jnp.repeat(b, group, 0)
    return y if b is None else y + b


def attention_pattern(q: Array, k: Array, mask: Array, scale: Optional[float] = None,
                      logit_softcap: Optional[float] = None) -> Array:
    """Softmax attention probabilities, grouped-query aware.

    ``q [batch, pos_q, head, d_head]``, ``k [batch, pos_k, kv_head, d_head]`` with
    ``head % kv_head == 0``, ``mask [batch, pos_q, pos_k]`` ->
    ``[batch, kv_head, group, pos_q, pos_k]`` (float32). Logits are ``q . k * scale``
    (default ``d_head**-0.5``), soft-capped by ``logit_softcap`` before masking.
    """
    b, p, h, e = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, p, kvh, h // kvh, e)
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    scores = jnp.einsum("bqkge,bske->bkgqs", qg, k).astype(jnp.float32) * scale
    scores = softcap(scores, logit_softcap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attention_heads(p: Params, x_q: Array, x_k: Array, x_v: Array, mask: Array,
                    rotary: Optional[Callable[[Array], Array]] = None, head_major: bool = False,
                    scale: Optional[float] = None, logit_softcap: Optional[float] = None,
                    layout: Optional[Callable[[Array], Array]] = None) -> Array:
    """Multi-head (or grouped-query) attention, returned per head.

    ``x_q, x_k, x_v``: normalised inputs, each ``[batch, pos, d_model]`` or one per query
    head ``[head, batch, pos, d_model]`` (the circuit graph's separate q/k/v inputs).
    With per-query-head k/v inputs under grouped-query attention, every query head's input
    goes through its key/value head's weights (:func:`project_heads`, no copies); ``x_k,
    x_v`` may instead be one per key/value head, ``[kv_head, batch, pos, d_model]`` (the
    graph's grouped view).

    ``rotary`` maps ``q`` and ``k`` (``[batch, pos, head, d_head]``) to their rotated
    values; ``scale`` and ``logit_softcap`` as :func:`attention_pattern`; ``layout`` maps
    the projected ``q``, ``k`` and ``v`` (``[batch, pos, head, d_head]``) to themselves
    with a sharding (:func:`jaxinterp.sharding.split_heads`).

    Returns each head's contribution to the residual stream, ``z_h @ w_o[h]``:
    ``[batch, pos, head, d_model]``, or ``[head, batch, pos, d_model]`` with
    ``head_major``. The layer output is the sum over heads plus ``b_o``
    (see :func:`attention`).
    """
    n_heads = p["w_q"].shape[0]
    w_k, b_k, w_v, b_v = p["w_k"], p.get("b_k"), p["w_v"], p.get("b_v")
    for x in (x_k, x_v):
        if x.ndim == 4 and x.shape[0] not in (n_heads, w_k.shape[0]):
            raise ValueError(f"per-head k/v inputs {x.shape}: the leading axis must be the {n_heads} query "
                             f"heads or the {w_k.shape[0]} key/value heads")
    q = project_heads(x_q, p["w_q"], p.get("b_q"))
    k = project_heads(x_k, w_k, b_k)
    v = project_heads(x_v, w_v, b_v)
    if layout is not None:
        q, k, v = layout(q), layout(k), layout(v)
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    probs = attention_pattern(q, k, mask, scale, logit_softcap).astype(v.dtype)
    b, s, kvh, e = v.shape
    z = jnp.einsum("bkgqs,bske->bqkge", probs, v).reshape(b, s, n_heads, e)
    return jnp.einsum("bqhe,hed->" + ("hbqd" if head_major else "bqhd"), z, p["w_o"])


def attention(p: Params, x: Array, mask: Array, rotary=None, scale: Optional[float] = None,
              logit_softcap: Optional[float] = None) -> tuple[Array, Array]:
    """Standard attention on one shared input ``x [batch, pos, d_model]``.

    Returns ``(out [batch, pos, d_model], per_head [batch, pos, head, d_model])`` where
    ``out = per_head.sum(2) + b_o``.
    """
    per_head = attention_heads(p, x, x, x, mask, rotary, scale=scale, logit_softcap=logit_softcap)
    out = per_head.sum(2)
    return (out + p["b_o"] if "b_o" in p else out), per_head


# --- rotary position embedding ----------------------------------------------------------

def rope_inv_freq(rotary_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position: int = 8192) -> Array:
    """RoPE inverse frequencies ``[rotary_dim // 2]`` (float32), as Hugging Face computes them.

    ``rope_type``: "default" (``theta ** (-2i / rotary_dim)``), "linear" (divided by
    ``factor``: positions interpolated) or "llama3" (Llama 3.1: wavelengths longer than
    ``original_max_position / low_freq_factor`` are divided by ``factor``, shorter than
    ``original_max_position / high_freq_factor`` kept, and the band between interpolated
    smoothly).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low_wavelen = original_max_position / low_freq_factor
        high_wavelen = original_max_position / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: ('default', 'linear', 'llama3')")


def rotary_tables(positions: Array, rotary_dim: int, theta: float, **scaling) -> tuple[Array, Array]:
    """cos/sin tables ``[pos, rotary_dim]`` for the rotate-half (GPT-NeoX/Llama) layout.

    ``scaling``: the keyword arguments of :func:`rope_inv_freq` after ``theta``.
    """
    inv_freq = rope_inv_freq(rotary_dim, theta, **scaling)
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None]
    emb = jnp.concatenate([freqs, freqs], -1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first ``rotary_dim`` (``cos [pos, rotary_dim]``) features of
    ``x [batch, pos, head, d_head]``; the remaining ``d_head - rotary_dim`` pass through
    (GPT-NeoX partial rotary). Pairs are ``(i, i + rotary_dim / 2)`` (rotate-half)."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rotated = jnp.concatenate([-x2, x1], -1)
    out = xr * cos[None, :, None] + rotated * sin[None, :, None]
    return jnp.concatenate([out.astype(x.dtype), xp], -1)
