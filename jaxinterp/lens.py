"""Vocabulary projections: reading activations and parameters as tokens.

* :func:`logit_lens` (nostalgebraist 2020): the residual stream entering each layer,
  decoded as if it were the last one (final norm + unembedding, with the norm's own
  statistics at that layer). The last entry is the model's logits.
* :func:`direct_logit_attribution`: each graph node's (head, MLP, input) direct
  contribution to the logits at the position read.
* :func:`mlp_value_top_tokens` (Geva et al. 2022): the tokens each MLP neuron's value
  vector (a row of ``w_out``) promotes.
* :func:`ov_top_pairs`, :func:`qk_top_pairs` (Dar et al. 2022, "Analyzing Transformers
  in Embedding Space"): a head's OV and QK circuits read as token-to-token matrices.

The final norm's linear part
----------------------------
LayerNorm is ``LN(x) = (x - mean(x)) / s(x) * w + b`` with ``s(x) = sqrt(var(x) + eps)``
(RMSNorm: ``x / s(x) * (offset + w)`` with ``s(x) = sqrt(mean(x^2) + eps)``). Holding
the scale ``s`` fixed, it is affine, and its linear part

    R_s(v) = (v - mean(v)) * w / s        (RMSNorm: v * (offset + w) / s)

distributes over a sum of vectors. Reading a vector ``v`` in vocabulary space means
``R_s(v) @ w_u``: no norm bias and no unembedding bias (those belong to no node).

* Direct logit attribution uses ``s = s(x_final)``, the scale of the actual final
  residual stream at the read position, so that
  ``sum_u R_s(out_u) @ w_u + R_s(constants) @ w_u + b @ w_u + b_u = logits`` exactly,
  where the constants are what the residual stream holds besides node outputs
  (learned position embeddings, attention output biases). ``rest`` is that remainder.
  (Soft-capped logits, Gemma 2, are not a sum and are not decomposed.)
* Parameter projections (value vectors, OV, QK) use ``s = 1``: a direction has no
  scale of its own, and a positive factor does not change which tokens rank highest.
  The same linear part with the first norm of the head's layer (``ln1``) reads token
  embeddings into a head; position embeddings, rotary rotations (QK at relative
  distance 0, where the rotation is the identity) and all biases are left out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .compiler import jit
from .config import ModelConfig
from .io import write_figure
from .models import final_logits, forward, layer_params, norm, residual_stream

Array = jax.Array


# --- the final norm and the unembedding ------------------------------------------------

def decode(params, cfg: ModelConfig, x: Array) -> Array:
    """Residual stream ``x [..., d_model]`` -> float32 logits ``[..., vocab]`` through the
    final norm, the unembedding and the final soft-cap, as the model's last layer does."""
    return final_logits(params, cfg, norm(cfg, params["ln_f"], x))


def norm_scale(cfg: ModelConfig, x: Array) -> Array:
    """``s(x) [..., 1]``: the scale the norm divides ``x [..., d_model]`` by."""
    x = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    return jnp.sqrt(jnp.square(x).mean(-1, keepdims=True) + cfg.norm_eps)


def norm_linear(cfg: ModelConfig, p, v: Array, scale=1.0) -> Array:
    """The norm's linear part ``R_s(v)`` (module docstring) for ``v [..., d_model]`` with
    norm parameters ``p`` (``w``, optional ``b`` which is not used)."""
    v = v.astype(jnp.float32)
    if cfg.norm == "layernorm":
        return (v - v.mean(-1, keepdims=True)) * p["w"] / scale
    return v * (cfg.norm_offset + p["w"]) / scale


def readout(params, cfg: ModelConfig, v: Array, scale=1.0) -> Array:
    """``v [..., d_model]`` read in vocabulary space: ``R_s(v) @ w_u`` -> ``[..., vocab]``."""
    return norm_linear(cfg, params["ln_f"], v, scale) @ params["unembed"]["w_u"].astype(jnp.float32)


# --- activations -------------------------------------------------------------------------

@functools.partial(jit, static_argnames=("cfg",))
def logit_lens(params, cfg: ModelConfig, tokens: Array, attention_mask: Optional[Array] = None) -> Array:
    """``[layer + 1, batch, pos, vocab]`` float32 logits of the residual stream entering
    each layer (``0``: the embeddings with positions) and, last, the stream entering the
    final norm, which decodes to the model's own logits."""
    _, resid = residual_stream(params, cfg, tokens, attention_mask)
    return decode(params, cfg, resid)


@dataclasses.dataclass
class DirectLogits:
    """Direct logit attribution at one position per prompt.

    nodes: ``[src, batch, vocab]`` each graph node's ``R_s(out_u) @ w_u``.
    rest: ``[batch, vocab]`` everything else: ``R_s(constants) @ w_u + b @ w_u + b_u``.
    logits: ``[batch, vocab]`` the model's logits, ``= nodes.sum(0) + rest`` (before any
    soft-cap).
    """

    nodes: np.ndarray
    rest: np.ndarray
    logits: np.ndarray


@functools.partial(jit, static_argnames=("cfg",))
def _direct_logits(params, cfg: ModelConfig, tokens, attention_mask, positions):
    logits, outs = forward(params, cfg, tokens, attention_mask, return_node_outputs=True,
                           logit_positions=positions)
    _, resid = residual_stream(params, cfg, tokens, attention_mask)
    final = jnp.take_along_axis(resid[-1], positions[:, None, None], axis=1)[:, 0]       # [batch, d_model]
    outs = jnp.take_along_axis(outs, positions[None, :, None, None], axis=2)[:, :, 0]   # [src, batch, d_model]
    scale = norm_scale(cfg, final)
    nodes = readout(params, cfg, outs, scale)
    # constants: the residual stream minus the nodes (positions, attention output biases)
    constants = final.astype(jnp.float32) - outs.astype(jnp.float32).sum(0)
    bias = params["ln_f"].get("b")
    rest = readout(params, cfg, constants, scale)
    if bias is not None:
        rest = rest + bias.astype(jnp.float32) @ params["unembed"]["w_u"].astype(jnp.float32)
    if "b_u" in params["unembed"]:
        rest = rest + params["unembed"]["b_u"].astype(jnp.float32)
    return nodes, rest, logits[:, 0]


def direct_logit_attribution(params, cfg: ModelConfig, tokens, attention_mask=None,
                             positions=None) -> DirectLogits:
    """Each node's direct contribution to the logits at ``positions [batch]`` (default:
    each prompt's last real token) of ``tokens [batch, pos]``; see the module docstring
    for the linearisation of the final norm."""
    tokens = jnp.asarray(tokens)
    if attention_mask is None:
        attention_mask = jnp.ones_like(tokens)
    attention_mask = jnp.asarray(attention_mask)
    if positions is None:
        positions = attention_mask.sum(-1) - 1
    positions = np.asarray(positions)
    if positions.shape != (tokens.shape[0],) or not ((0 <= positions) & (positions < tokens.shape[1])).all():
        raise ValueError(f"positions must be [batch={tokens.shape[0]}] in 0..{tokens.shape[1] - 1}, got {positions}")
    if cfg.final_logit_softcap is not None:
        raise NotImplementedError("soft-capped logits are not a sum of contributions")
    nodes, rest, logits = _direct_logits(params, cfg, tokens, attention_mask, jnp.asarray(positions))
    return DirectLogits(np.asarray(nodes), np.asarray(rest), np.asarray(logits))


# --- parameters ----------------------------------------------------------------------------

def _check_layer(cfg: ModelConfig, layer: int, head: Optional[int] = None) -> None:
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is outside 0..{cfg.n_layers - 1}")
    if head is not None and not 0 <= head < cfg.n_heads:
        raise ValueError(f"head {head} is outside 0..{cfg.n_heads - 1}")


def top_k(scores: Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [..., k], values [..., k])`` of the largest entries along the last axis."""
    values, ids = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    return np.asarray(ids), np.asarray(values)


def mlp_value_logits(params, cfg: ModelConfig, layer: int, neurons: Optional[Sequence[int]] = None) -> Array:
    """``[neuron, vocab]``: each value vector (row of ``w_out [d_mlp, d_model]``) read
    through the final norm's linear part at unit scale and the unembedding."""
    _check_layer(cfg, layer)
    w_out = params["blocks"]["mlp"]["w_out"][layer]
    if neurons is not None:
        neurons = np.asarray(neurons)
        if ((neurons < 0) | (neurons >= w_out.shape[0])).any():
            raise ValueError(f"neurons must be in 0..{w_out.shape[0] - 1}")
        w_out = w_out[neurons]
    return readout(params, cfg, w_out)


def mlp_value_top_tokens(params, cfg: ModelConfig, layer: int, k: int = 10, neurons=None,
                         chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Geva et al. (2022): ``(token ids [neuron, k], scores [neuron, k])`` that each
    value vector of ``layer``'s MLP promotes most (bottom tokens: negate ``w_out``).
    ``chunk`` neurons at a time, so ``[d_mlp, vocab]`` is never held for a large model."""
    neurons = np.arange(cfg.d_mlp) if neurons is None else np.asarray(neurons)
    parts = [top_k(mlp_value_logits(params, cfg, layer, neurons[i:i + chunk]), k)
             for i in range(0, len(neurons), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _embeddings_into(params, cfg: ModelConfig, layer: int) -> Array:
    """``[vocab, d_model]``: token embeddings (scaled as the ``input`` node) through the
    linear part of ``layer``'s first norm at unit scale."""
    w_e = params["embed"]["w_e"].astype(jnp.float32) * cfg.embed_scale
    return norm_linear(cfg, layer_params(params, layer)["ln1"], w_e)


def ov_factors(params, cfg: ModelConfig, layer: int, head: int) -> tuple[Array, Array]:
    """The OV circuit of ``a{layer}.h{head}`` as ``left [vocab, d_head] @ right [d_head,
    vocab]``: entry ``(i, j)`` is how much attending to token ``i`` raises the logit of
    token ``j`` (Dar et al.'s ``E W_V W_O E^T`` with the norms' linear parts)."""
    _check_layer(cfg, layer, head)
    attn = layer_params(params, layer)["attn"]
    kv = head // cfg.group_size
    left = _embeddings_into(params, cfg, layer) @ attn["w_v"][kv].astype(jnp.float32)
    right = readout(params, cfg, attn["w_o"][head])
    return left, right


def qk_factors(params, cfg: ModelConfig, layer: int, head: int) -> tuple[Array, Array]:
    """The QK circuit of ``a{layer}.h{head}`` as ``left [vocab, d_head] @ right [d_head,
    vocab]``: entry ``(i, j)`` is the attention logit (before scaling) of a query token
    ``i`` on a key token ``j`` (``E W_Q W_K^T E^T``)."""
    _check_layer(cfg, layer, head)
    attn = layer_params(params, layer)["attn"]
    emb = _embeddings_into(params, cfg, layer)
    kv = head // cfg.group_size
    return emb @ attn["w_q"][head].astype(jnp.float32), (emb @ attn["w_k"][kv].astype(jnp.float32)).T


@dataclasses.dataclass
class TokenPairs:
    """The largest entries of a ``[vocab, vocab]`` matrix: ``rows``, ``cols``, ``values``
    (each ``[k]``, largest first)."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


def top_pairs(left: Array, right: Array, k: int = 20, chunk: int = 2048) -> TokenPairs:
    """The ``k`` largest entries of ``left [n, r] @ right [r, m]`` without holding the
    ``[n, m]`` product: ``chunk`` rows at a time, each chunk's top ``k`` kept."""
    rows, cols, values = [], [], []
    for start in range(0, left.shape[0], chunk):
        block = (left[start:start + chunk] @ right).reshape(-1)
        v, flat = jax.lax.top_k(block, min(k, block.shape[0]))
        flat = np.asarray(flat)
        rows.append(start + flat // right.shape[1])
        cols.append(flat % right.shape[1])
        values.append(np.asarray(v))
    rows, cols, values = map(np.concatenate, (rows, cols, values))
    order = np.argsort(-values, kind="stable")[:k]
    return TokenPairs(rows[order], cols[order], values[order])


def ov_top_pairs(params, cfg: ModelConfig, layer: int, head: int, k: int = 20) -> TokenPairs:
    """(attended token, promoted token) pairs of ``a{layer}.h{head}``'s OV circuit."""
    return top_pairs(*ov_factors(params, cfg, layer, head), k)


def qk_top_pairs(params, cfg: ModelConfig, layer: int, head: int, k: int = 20) -> TokenPairs:
    """(query token, key token) pairs of ``a{layer}.h{head}``'s QK circuit."""
    return top_pairs(*qk_factors(params, cfg, layer, head), k)


# --- the picture -----------------------------------------------------------------------------

def plot_logit_lens(lens_logits: np.ndarray, tokens: Sequence[str], decode_token, path: str,
                    title: str = "logit lens") -> str:
    """nostalgebraist's picture of one prompt: ``lens_logits [layer + 1, pos, vocab]``;
    rows are layers (the embeddings at the bottom), columns the prompt's tokens, each
    cell the top token decoded there, coloured by its probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = np.asarray(jax.nn.softmax(jnp.asarray(lens_logits), -1))
    top = probs.argmax(-1)                           # [layer + 1, pos]
    p_top = np.take_along_axis(probs, top[..., None], -1)[..., 0]
    n_rows, n_pos = top.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.75 * n_pos, 0.9 + 0.42 * n_rows), dpi=140)
    mesh = ax.pcolormesh(p_top, cmap="Blues", vmin=0, vmax=1)
    for r in range(n_rows):
        for c in range(n_pos):
            ax.text(c + 0.5, r + 0.5, decode_token(int(top[r, c])).strip()[:8], ha="center", va="center",
                    fontsize=6.5, color="white" if p_top[r, c] > 0.6 else "black")
    ax.set_yticks(np.arange(n_rows) + 0.5)
    ax.set_yticklabels(["embed"] + [f"after {l}" for l in range(n_rows - 1)], fontsize=8)
    ax.set_ylabel("residual stream", fontsize=8)
    ax.set_xticks(np.arange(n_pos) + 0.5)
    ax.set_xticklabels([t.strip() or repr(t) for t in tokens], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("input token (the cell shows the next-token prediction there)")
    fig.colorbar(mesh, ax=ax).set_label("probability of the top token", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return write_figure(fig, path)  # atomic: a failed write leaves an old picture whole


def token_text(tokenizer, token: int) -> str:
    """How a report shows one token: its decoded text, or, where that is empty or not
    whole characters (a byte-level BPE token holding part of a UTF-8 character decodes to
    '' or U+FFFD on its own), the tokenizer's own name for it (e.g. ``'Ã¥'``, ``'<0xE2>'``)."""
    text = tokenizer.decode([int(token)])
    if text and "\ufffd" not in text:
        return text
    return str(tokenizer.convert_ids_to_tokens(int(token)))


def lens_report(model, prompt: str, k: int = 5) -> dict:
    """Logit lens, top tokens per layer at the last position, and the nodes that most
    directly raise the model's top prediction there, for one prompt."""
    from .data import tokenize

    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model directory has no tokenizer to read the prompt with")
    ids = np.asarray(tokenize(model.tokenizer, [prompt]), np.int32)
    lens = np.asarray(logit_lens(model.params, model.cfg, jnp.asarray(ids)))[:, 0]    # [layer + 1, pos, vocab]
    dec = functools.partial(token_text, model.tokenizer)
    per_layer = []
    for row, name in zip(lens[:, -1], ["embed"] + [f"after layer {l}" for l in range(model.cfg.n_layers)]):
        tok, val = top_k(jax.nn.log_softmax(jnp.asarray(row)), k)
        per_layer.append({"layer": name, "top": [(dec(t), float(np.exp(v))) for t, v in zip(tok, val)]})
    report = {"tokens": [dec(t) for t in ids[0]], "lens": lens, "per_layer": per_layer}
    if model.cfg.final_logit_softcap is None:
        dla = direct_logit_attribution(model.params, model.cfg, ids)
        predicted = int(np.argmax(dla.logits[0]))
        contrib = dla.nodes[:, 0, predicted]
        names = model.graph_spec.forward_names
        order = np.argsort(-np.abs(contrib))[:k]
        report["direct"] = {"token": dec(predicted), "logit": float(dla.logits[0, predicted]),
                            "rest": float(dla.rest[0, predicted]),
                            "nodes": [(names[i], float(contrib[i])) for i in order]}
    return report
