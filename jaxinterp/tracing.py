"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

A prompt is run three ways:

* clean: the model predicts ``target`` with probability ``p_clean``;
* corrupted: the token embeddings of the *subject* positions get Gaussian noise
  (``std = 3 x`` the standard deviation of token embeddings, as ROME), ``samples``
  independent draws, or the tokens of a corrupted prompt are used instead; the
  probability drops to ``p_corrupted``;
* restored: the corrupted run, except that one hidden state at one position takes its
  clean value, and the computation after it proceeds from there.

The score of a restoration is the probability of ``target`` at the last position
(mean over noise samples). Hidden states (``kind``):

* ``"resid"``: the residual stream after block ``l`` (the output of layer ``l``);
* ``"attn"``: layer ``l``'s attention output (the sum of its head nodes; the output
  bias is a constant and equal in both runs);
* ``"mlp"``: layer ``l``'s MLP output.

With ``window > 1`` the states of layers ``max(0, l - window // 2)`` up to
``min(L, l + ceil(window / 2)) - 1`` are all restored at once (ROME's
``trace_important_window``; ROME uses 10 for attn/mlp).

How a restoration runs on the circuit-graph engine
--------------------------------------------------
Every run has zero edge coefficients and mode ``"grad"``, whose forward skips (*)'s
contraction over upstream nodes (the coefficients are zero, so (*) adds nothing): a
restoration costs a plain forward pass plus node-wise updates, not a circuit evaluation.

* attn and mlp: ``EdgeIntervention(restore=..., source=clean)`` sets the chosen nodes'
  outputs at the restored position to their clean values, on all their outgoing edges
  and on the residual stream, and the layers after compute from them, as ROME's hooks
  overwrite the same outputs: one pass, however wide the window. attn restores the
  layer's head nodes (each head its own clean output, so their sum is the attention
  output's), mlp the node ``m{l}``.
* resid: an additive shift, ``EdgeIntervention(shift=1, source=delta)`` adds ``delta_u``
  to node ``u``'s output, ``delta`` zero except at the restored position of ``m{l}``,
  where it is ``clean_resid[l+1] - resid[l+1]``. The residual after block ``l`` is
  ``resid[l] + attn_l + m_l`` and nothing inside block ``l`` reads ``m_l``, so the shift
  moves exactly that residual (positions, attention biases and other constants that are
  not graph nodes are included, because the difference of whole residuals is used). In
  parallel-attention models (GPT-NeoX) ``attn_l`` and ``m_l`` both read ``resid[l]`` and
  are added together at the end of the block; nothing inside the block reads either, so
  shifting ``m{l}`` is still exactly "the block's output becomes clean", and restoring
  ``attn`` there leaves the same layer's MLP untouched, as in the Hugging Face model.
  ``resid[l+1]`` of the first restored layer is the corrupted run's; with a window,
  restoring layer ``a`` changes the later layers' values, so ``delta`` is found by the
  fixed-point iteration ``delta <- clean - value(delta)`` (each value computed with its
  own node unshifted): the value of a node depends only on the deltas of nodes upstream
  of it, so ``n`` restored layers are exact after ``n - 1`` iterations, i.e. ``n`` forward
  passes per restoration (ROME's default window for resid is 1: one pass).

Every (layer, position) restoration runs in one compiled call
(``lax.map`` over them, ``vmap`` within chunks).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .compiler import jit
from .config import ModelConfig
from .graph import GraphSpec
from .io import write_figure
from .models import EdgeIntervention, embed_input, forward, residual_stream

KINDS = ("resid", "attn", "mlp")
_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for ``layer`` (ROME's window: ``window // 2`` before,
    ``ceil(window / 2) - 1`` after, clipped to the model)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def restoration_nodes(spec: GraphSpec, kind: str) -> np.ndarray:
    """``[layer, src]`` 0/1: the nodes whose outputs are shifted to restore layer ``l``'s
    state of ``kind`` (the layer's heads for attn, ``m{l}`` for mlp and resid)."""
    _check_kind(kind)
    nodes = np.zeros((spec.n_layers, spec.n_forward), np.float32)
    for layer in range(spec.n_layers):
        if kind == "attn":
            nodes[layer, spec.head_index(layer):spec.head_index(layer) + spec.n_heads] = 1
        else:
            nodes[layer, spec.mlp_index(layer)] = 1
    return nodes


def window_nodes(spec: GraphSpec, kind: str, window: int) -> np.ndarray:
    """``[layer, src]`` 0/1: the nodes shifted for the restoration centred on each layer."""
    per_layer = restoration_nodes(spec, kind)
    return np.stack([per_layer[list(window_layers(l, window, spec.n_layers))].sum(0)
                     for l in range(spec.n_layers)]).astype(np.float32)


def _run_state(params, cfg: ModelConfig, tokens, embeddings, iv: Optional[EdgeIntervention], kind: str):
    """One run: ``(probabilities at the last position [batch, vocab], state [src, batch,
    pos, d_model])`` where ``state`` is what each node contributes to the restorable
    hidden state *as this run sees it* (shifts included): node outputs for attn/mlp; for
    resid, the residual after block ``l`` in ``m{l}``'s row and zeros elsewhere.

    tokens: ``[batch, pos]`` (only their shape is used); embeddings: ``[batch, pos,
    d_model]``, the ``input`` node's output.
    """
    spec = GraphSpec.from_config(cfg)
    if kind == "resid":
        logits, resid = residual_stream(params, cfg, tokens, None, iv, embeddings)
        mlp_rows = np.array([spec.mlp_index(l) for l in range(cfg.n_layers)])
        state = jnp.zeros((spec.n_forward,) + resid.shape[1:], resid.dtype).at[mlp_rows].set(resid[1:])
        logits = logits[:, -1]
    else:
        last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1)
        logits, state = forward(params, cfg, tokens, None, iv, embeddings, return_node_outputs=True,
                                logit_positions=last)
        logits = logits[:, 0]
    return jax.nn.softmax(logits.astype(jnp.float32), -1), state


def _restored_prob(params, cfg: ModelConfig, tokens, embeddings, clean_state, corrupted_state, target,
                   nodes, position, kind: str, n_iterations: int):
    """Mean probability of ``target`` with the state of ``nodes [src]`` restored at
    ``position`` (a scalar index) - see the module docstring for how."""
    n_pos = tokens.shape[1]
    at = jax.nn.one_hot(position, n_pos)
    coef = jnp.zeros((nodes.shape[0], GraphSpec.from_config(cfg).n_backward), jnp.float32)
    if kind != "resid":  # the nodes' outputs take their clean values: one pass, however wide the window
        source = jnp.broadcast_to(clean_state, corrupted_state.shape)
        iv = EdgeIntervention(coef, source, restore=nodes[:, None] * at[None], mode="grad")
        return _run_state(params, cfg, tokens, embeddings, iv, kind)[0][:, target].mean()

    select = nodes[:, None, None, None] * at[None, None, :, None]
    shift = jnp.ones_like(nodes)

    def run(delta):
        return _run_state(params, cfg, tokens, embeddings, EdgeIntervention(coef, delta, shift, mode="grad"), kind)

    def step(delta, _):
        _, state = run(delta)
        # ``state`` includes this run's own shift of each node; the node's value without it:
        return select * (clean_state - (state - delta)), None

    delta = select * (clean_state - corrupted_state)
    delta = jax.lax.scan(step, delta, None, length=n_iterations)[0]
    probs, _ = run(delta)
    return probs[:, target].mean()


def _runs(params, cfg: ModelConfig, tokens, corrupted_embeddings, kind: str):
    """Batched tokens and the clean / corrupted runs' probabilities and states."""
    n_samples = corrupted_embeddings.shape[0]
    batch = jnp.broadcast_to(tokens[None], (n_samples,) + tokens.shape)
    clean_probs, clean_state = _run_state(params, cfg, tokens[None], None, None, kind)
    corr_probs, corr_state = _run_state(params, cfg, batch, corrupted_embeddings, None, kind)
    return batch, (clean_probs, clean_state), (corr_probs, corr_state)


def trace_all(params, cfg: ModelConfig, tokens, corrupted_embeddings, target: int, *, kind: str = "resid",
              window: int = 1, chunk: int = 16):
    """Every (layer, position) restoration in one compiled call.

    tokens: ``[pos]`` the clean prompt; corrupted_embeddings: ``[samples, pos, d_model]``
    (the ``input`` node's output of each corrupted run); target: token id.
    Returns ``(scores [layer, pos], p_clean, p_corrupted)``: the probability of
    ``target`` at the last position after each restoration (mean over samples).
    ``chunk`` restorations run side by side (``vmap``); each holds a few
    ``[src, samples, pos, d_model]`` arrays, so lower it for large models.
    """
    _check_kind(kind)
    _check_trace_args(cfg, tokens, corrupted_embeddings, target, window)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _trace_all(params, cfg, jnp.asarray(tokens), jnp.asarray(corrupted_embeddings), target, kind=kind,
                      window=window, chunk=chunk)


@functools.partial(jit, static_argnames=("cfg", "kind", "window", "chunk"))
def _trace_all(params, cfg: ModelConfig, tokens, corrupted_embeddings, target, *, kind, window, chunk):
    spec = GraphSpec.from_config(cfg)
    batch, (clean_probs, clean_state), (corr_probs, corr_state) = _runs(params, cfg, tokens,
                                                                         corrupted_embeddings, kind)
    nodes = jnp.asarray(window_nodes(spec, kind, window))
    n_pos = tokens.shape[0]
    n = cfg.n_layers * n_pos
    chunk = min(chunk, n)
    # padded to whole chunks: lax.map would compile a second program for a remainder
    flat = jnp.arange(n + (-n) % chunk) % n
    layer_of, pos_of = flat // n_pos, flat % n_pos
    n_iter = min(window, cfg.n_layers) - 1

    def one(xs):
        layer, pos = xs
        return _restored_prob(params, cfg, batch, corrupted_embeddings, clean_state, corr_state, target,
                              nodes[layer], pos, kind, n_iter)

    scores = jax.lax.map(one, (layer_of, pos_of), batch_size=chunk)[:n].reshape(cfg.n_layers, n_pos)
    return scores, clean_probs[0, target], corr_probs[:, target].mean()


@functools.partial(jit, static_argnames=("cfg", "kind", "window"))
def _trace_one(params, cfg, tokens, corrupted_embeddings, target, layer, position, *, kind, window):
    spec = GraphSpec.from_config(cfg)
    batch, (_, clean_state), (_, corr_state) = _runs(params, cfg, tokens, corrupted_embeddings, kind)
    nodes = jnp.asarray(window_nodes(spec, kind, window))[layer]
    return _restored_prob(params, cfg, batch, corrupted_embeddings, clean_state, corr_state, target,
                          nodes, position, kind, min(window, cfg.n_layers) - 1)


def trace_one(params, cfg: ModelConfig, tokens, corrupted_embeddings, target: int, layer: int, position: int,
              kind: str = "resid", window: int = 1) -> float:
    """One restoration (see :func:`trace_all`): the probability of ``target`` with
    ``kind``'s state of ``layer`` (and its window) restored at ``position``."""
    _check_kind(kind)
    _check_trace_args(cfg, tokens, corrupted_embeddings, target, window)
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is outside 0..{cfg.n_layers - 1}")
    if not 0 <= position < len(tokens):
        raise ValueError(f"position {position} is outside the prompt's 0..{len(tokens) - 1}")
    return float(_trace_one(params, cfg, jnp.asarray(tokens), jnp.asarray(corrupted_embeddings), target,
                            layer, position, kind=kind, window=window))


def _check_trace_args(cfg: ModelConfig, tokens, corrupted_embeddings, target: int, window: int) -> None:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) == 0:
        raise ValueError(f"tokens must be one non-empty prompt [pos], got shape {tokens.shape}")
    shape = tuple(np.shape(corrupted_embeddings))
    if len(shape) != 3 or shape[1:] != (len(tokens), cfg.d_model) or shape[0] < 1:
        raise ValueError(f"corrupted_embeddings must be [samples, pos={len(tokens)}, d_model={cfg.d_model}], "
                         f"got {shape}")
    if not 0 <= int(target) < cfg.vocab_size:
        raise ValueError(f"target token {target} is outside the vocabulary of {cfg.vocab_size}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


# --- corruption -------------------------------------------------------------------------

def token_embeddings(params, cfg: ModelConfig, tokens) -> jax.Array:
    """The ``input`` node's output for ``tokens [..., pos]``: ``[..., pos, d_model]``
    (scaled by ``cfg.embed_scale``, as the graph forward does)."""
    return embed_input(params, cfg, jnp.asarray(tokens))


def embedding_std(params, cfg: ModelConfig, tokens=None) -> float:
    """Standard deviation of all entries of the token embeddings of ``tokens`` (ROME's
    ``collect_embedding_std`` takes its subjects' tokens); default: the whole vocabulary."""
    if tokens is None:
        tokens = np.arange(cfg.vocab_size)
    return float(jnp.std(token_embeddings(params, cfg, np.asarray(tokens).reshape(-1))))


def noisy_embeddings(clean_embeddings, positions: Sequence[int], std: float, samples: int = 10,
                     seed: int = 0) -> jax.Array:
    """``clean_embeddings [pos, d_model]`` with ``N(0, std^2)`` noise added at
    ``positions``, ``samples`` independent draws: ``[samples, pos, d_model]``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    n_pos = clean_embeddings.shape[0]
    bad = [p for p in positions if not 0 <= p < n_pos]
    if bad:
        raise ValueError(f"positions {bad} are outside the prompt's 0..{n_pos - 1}")
    where = jnp.zeros(n_pos).at[jnp.asarray(list(positions), jnp.int32)].set(1.0)[None, :, None]
    noise = jax.random.normal(jax.random.PRNGKey(seed), (samples,) + clean_embeddings.shape)
    return clean_embeddings[None] + where * std * noise.astype(clean_embeddings.dtype)


def find_subject(tokenizer, token_ids: Sequence[int], subject: str) -> list[int]:
    """Positions of the tokens covering the first occurrence of ``subject`` in the
    decoded prompt (ROME's ``find_token_range``, on characters, so it works for BPE and
    word-level tokenizers alike; a tokenizer that decodes tokens without their spaces is
    matched with all whitespace removed)."""
    pieces = [tokenizer.decode([t]) for t in token_ids]
    for normal in (lambda s: s, lambda s: "".join(s.split())):
        parts = [normal(p) for p in pieces]
        needle = normal(subject)
        start = "".join(parts).find(needle) if needle else -1
        if start >= 0:
            end = start + len(needle)
            bounds = np.cumsum([0] + [len(p) for p in parts])
            return [i for i in range(len(parts)) if bounds[i] < end and bounds[i + 1] > start]
    raise ValueError(f"subject {subject!r} does not occur in the prompt {''.join(pieces)!r}")


# --- the user-level function and its picture ----------------------------------------------

@dataclasses.dataclass
class Trace:
    """A causal trace of one prompt.

    scores ``[layer, pos]``: p(target) after each restoration; ``p_clean``,
    ``p_corrupted``: without restoration. ``tokens``: the prompt's token strings
    (BOS first), ``subject``: corrupted positions (None for a corrupted prompt).
    """

    scores: np.ndarray
    p_clean: float
    p_corrupted: float
    tokens: list
    target: int
    target_text: str
    kind: str
    window: int
    subject: Optional[list] = None
    noise_std: Optional[float] = None

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}


def target_id(model, target, clean_probs) -> int:
    """The token a trace follows: ``target`` (an id, or a word of one token), or the model's
    top prediction on the clean prompt (``clean_probs [vocab]``), as ROME traces."""
    if target is None:
        return int(np.argmax(clean_probs))  # ROME traces the model's own prediction
    if isinstance(target, (int, np.integer)):
        return int(target)
    from .tasks import word_token_id

    return word_token_id(model.tokenizer, str(target))


def causal_trace(model, prompt: str, subject: Union[str, Sequence[int], None] = None,
                 target: Union[int, str, None] = None, kind: str = "resid", window: int = 1,
                 samples: int = 10, noise: Optional[float] = None, noise_factor: float = 3.0, seed: int = 0,
                 corrupted_prompt: Optional[str] = None, chunk: int = 16) -> Trace:
    """Causal trace of ``prompt`` on a :class:`jaxinterp.Model`.

    subject: the words to corrupt (a string found in the prompt) or their token positions
        (BOS is position 0); needed unless ``corrupted_prompt`` is given.
    target: token id or word; default the model's top prediction on the clean prompt.
    noise: the noise standard deviation; default ``noise_factor x`` :func:`embedding_std`
        over the whole vocabulary (ROME: 3 x the std over subject tokens).
    corrupted_prompt: instead of noise, run this prompt (same number of tokens).
    """
    from .data import tokenize

    _check_kind(kind)
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model directory has no tokenizer to read the prompt with")
    ids = tokenize(model.tokenizer, [prompt])[0]
    tokens = np.asarray(ids, np.int32)
    clean_emb = token_embeddings(model.params, model.cfg, tokens)
    positions, std = None, None
    if corrupted_prompt is not None:
        corr_ids = tokenize(model.tokenizer, [corrupted_prompt])[0]
        if len(corr_ids) != len(ids):
            raise ValueError(f"the corrupted prompt has {len(corr_ids)} tokens, the prompt {len(ids)}; "
                             "restoring a position needs the same number")
        corrupted = token_embeddings(model.params, model.cfg, np.asarray(corr_ids, np.int32))[None]
    else:
        if subject is None:
            raise ValueError("give the subject to corrupt (words or token positions) or a corrupted_prompt")
        positions = (find_subject(model.tokenizer, ids, subject) if isinstance(subject, str)
                     else [int(p) for p in subject])
        std = float(noise) if noise is not None else noise_factor * embedding_std(model.params, model.cfg)
        corrupted = noisy_embeddings(clean_emb, positions, std, samples, seed)
    clean_probs = jax.nn.softmax(model(tokens[None])[0, -1])
    tid = target_id(model, target, clean_probs)
    scores, p_clean, p_corr = trace_all(model.params, model.cfg, tokens, corrupted, tid, kind=kind, window=window,
                                        chunk=chunk)
    return Trace(np.asarray(scores), float(p_clean), float(p_corr),
                 [model.tokenizer.decode([t]) for t in ids], tid, model.tokenizer.decode([tid]), kind, window,
                 positions, std)


def draw_trace(ax, trace: Trace, title: Optional[str] = None):
    """ROME's heat map on a matplotlib ``ax``: prompt tokens down, layers across, colour =
    p(target) after the restoration (from p_corrupted up); subject tokens are starred.
    Returns the colour mesh."""
    scores = trace.scores.T  # [pos, layer]
    n_pos, n_layers = scores.shape
    mesh = ax.pcolormesh(scores, cmap=_CMAPS[trace.kind], vmin=min(trace.p_corrupted, scores.min()),
                         vmax=max(trace.p_clean, scores.max()))
    ax.invert_yaxis()
    subject = set(trace.subject or [])
    labels = [t.strip() or repr(t) for t in trace.tokens]
    ax.set_yticks(np.arange(n_pos) + 0.5)
    ax.set_yticklabels([f"{t}*" if i in subject else t for i, t in enumerate(labels)], fontsize=8)
    ax.set_xticks(np.arange(n_layers) + 0.5)
    ax.set_xticklabels([str(l) for l in range(n_layers)], fontsize=8)
    what = {"resid": "layer output", "attn": "attention", "mlp": "MLP"}[trace.kind]
    ax.set_xlabel(f"single restored {what}" if trace.window == 1 else f"centre of {trace.window} restored "
                  f"{what} layers", fontsize=8)
    ax.set_title(title or f"restoring {what}", fontsize=9)
    return mesh


def plot_trace(traces, path: str, title: Optional[str] = None) -> str:
    """One :class:`Trace` or a list of them (e.g. resid, mlp, attn of one prompt) side by
    side, each with :func:`draw_trace`, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [traces] if isinstance(traces, Trace) else list(traces)
    n_pos, n_layers = traces[0].scores.shape[1], traces[0].scores.shape[0]
    width = 1.6 + 0.4 * max(n_layers, 5)
    fig, axes = plt.subplots(1, len(traces), figsize=(0.6 + (width + 0.4) * len(traces), 1.2 + 0.28 * n_pos),
                             dpi=140, squeeze=False)
    for ax, trace in zip(axes[0], traces):
        cb = fig.colorbar(draw_trace(ax, trace), ax=ax)
        cb.set_label(f"p({trace.target_text.strip()})", fontsize=8)
    t = traces[0]
    fig.suptitle(title or f"causal trace: p({t.target_text.strip()}) clean {t.p_clean:.2f}, "
                 f"corrupted {t.p_corrupted:.2f}", fontsize=9)
    fig.tight_layout()
    return write_figure(fig, path)  # atomic: a failed write leaves an old picture whole
