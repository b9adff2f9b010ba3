"""Functional transformer ops: pure functions of (params, inputs), safe under jit/vmap/grad.

Shapes are named with one vocabulary everywhere: ``batch, pos, head, kv_head, group,
d_head, d_model, d_mlp, vocab``. Every function here can be imported and used on its own;
the circuit-graph forward in :mod:`jaxinterp.models` is built from them.

Attention parameters (one layer)::

    w_q [head, d_model, d_head]      b_q [head, d_head]
    w_k [kv_head, d_model, d_head]   b_k [kv_head, d_head]
    w_v [kv_head, d_model, d_head]   b_v [kv_head, d_head]
    w_o [head, d_head, d_model]      b_o [d_model]

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
    """Position-wise MLP. ``x [..., d_model]`` -> ``[..., d_model]``.

    ``p``: ``w_in [d_model, d_mlp]``, optional ``b_in [d_mlp]``, ``w_out [d_mlp, d_model]``,
    optional ``b_out [d_model]``; with ``w_gate [d_model, d_mlp]`` it is a gated MLP
    (SwiGLU/GeGLU): ``act(x @ w_gate) * (x @ w_in)``.
    """
    act = ACTIVATIONS[act_fn]
    h = jnp.einsum("...d,dm->...m", x, p["w_in"])
    if "b_in" in p:
        h = h + p["b_in"]
    h = act(jnp.einsum("...d,dm->...m", x, p["w_gate"])) * h if "w_gate" in p else act(h)
    out = jnp.einsum("...m,md->...d", h, p["w_out"])
    return out + p["b_out"] if "b_out" in p else out


# --- attention --------------------------------------------------------------------------

def attention_mask(key_mask: Array) -> Array:
    """Causal mask combined with key padding.

    ``key_mask [batch, pos]`` (1 for real tokens) -> boolean ``[batch, pos_q, pos_k]``.
    Padded keys are never attended to; padded queries still see the real prefix, so no
    row is fully masked.
    """
    n = key_mask.shape[-1]
    causal = jnp.tril(jnp.ones((n, n), dtype=bool))
    return causal[None] & (key_mask[:, None, :] > 0)


def project_heads(x: Array, w: Array, b: Optional[Array] = None) -> Array:
    """Per-head projection.

    ``x [batch, pos, d_model]`` (shared by all heads) or ``[head, batch, pos, d_model]``
    (one input per head, head-major so the per-head matmuls batch over a leading axis),
    ``w [head, d_model, d_head]`` -> ``[batch, pos, head, d_head]``.
    """
    if x.ndim == 3:
        y = jnp.einsum("bpd,hde->bphe", x, w)
    else:
        y = jnp.einsum("hbpd,hde->bphe", x, w)
    return y if b is None else y + b


def attention_pattern(q: Array, k: Array, mask: Array) -> Array:
    """Softmax attention probabilities, grouped-query aware.

    ``q [batch, pos_q, head, d_head]``, ``k [batch, pos_k, kv_head, d_head]`` with
    ``head % kv_head == 0``, ``mask [batch, pos_q, pos_k]`` ->
    ``[batch, kv_head, group, pos_q, pos_k]`` (float32).
    """
    b, p, h, e = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, p, kvh, h // kvh, e)
    scores = jnp.einsum("bqkge,bske->bkgqs", qg, k).astype(jnp.float32) / math.sqrt(e)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attention_heads(p: Params, x_q: Array, x_k: Array, x_v: Array, mask: Array,
                    rotary: Optional[Callable[[Array], Array]] = None, head_major: bool = False) -> Array:
    """Multi-head (or grouped-query) attention, returned per head.

    ``x_q, x_k, x_v``: normalised inputs, each ``[batch, pos, d_model]`` or one per query
    head ``[head, batch, pos, d_model]`` (the circuit graph's separate q/k/v inputs).
    With per-head k/v inputs under grouped-query attention, every query head gets its
    own copy of its key/value head's weights.

    Returns each head's contribution to the residual stream, ``z_h @ w_o[h]``:
    ``[batch, pos, head, d_model]``, or ``[head, batch, pos, d_model]`` with
    ``head_major``. The layer output is the sum over heads plus ``b_o``
    (see :func:`attention`).
    """
    n_heads = p["w_q"].shape[0]
    w_k, b_k, w_v, b_v = p["w_k"], p.get("b_k"), p["w_v"], p.get("b_v")
    if x_k.ndim == 4 and w_k.shape[0] != n_heads:
        group = n_heads // w_k.shape[0]
        w_k, w_v = jnp.repeat(w_k, group, 0), jnp.repeat(w_v, group, 0)
        b_k = None if b_k is None else jnp.repeat(b_k, group, 0)
        b_v = None if b_v is None else jnp.repeat(b_v, group, 0)
    q = project_heads(x_q, p["w_q"], p.get("b_q"))
    k = project_heads(x_k, w_k, b_k)
    v = project_heads(x_v, w_v, b_v)
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    probs = attention_pattern(q, k, mask).astype(v.dtype)
    b, s, kvh, e = v.shape
    z = jnp.einsum("bkgqs,bske->bqkge", probs, v).reshape(b, s, n_heads, e)
    return jnp.einsum("bqhe,hed->" + ("hbqd" if head_major else "bqhd"), z, p["w_o"])


def attention(p: Params, x: Array, mask: Array, rotary=None) -> tuple[Array, Array]:
    """Standard attention on one shared input ``x [batch, pos, d_model]``.

    Returns ``(out [batch, pos, d_model], per_head [batch, pos, head, d_model])`` where
    ``out = per_head.sum(2) + b_o``.
    """
    per_head = attention_heads(p, x, x, x, mask, rotary)
    out = per_head.sum(2)
    return (out + p["b_o"] if "b_o" in p else out), per_head


# --- rotary position embedding ----------------------------------------------------------

def rotary_tables(positions: Array, rotary_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables ``[pos, rotary_dim]`` for the rotate-half (GPT-NeoX/Llama) layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None]
    emb = jnp.concatenate([freqs, freqs], -1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first ``rotary_dim`` features of ``x [batch, pos, head, d_head]``."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rotated = jnp.concatenate([-x2, x1], -1)
    out = xr * cos[None, :, None] + rotated * sin[None, :, None]
    return jnp.concatenate([out.astype(x.dtype), xp], -1)
