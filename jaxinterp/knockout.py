"""Attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations").

To ask *where* information reaches the prediction, the attention edges from a set of
source positions to the last position are cut in a window of consecutive layers (every
head), and the probability of the target at the last position is read:

    blocked[l, q, k] = (start <= l < start + window) and q = last and k in sources

The cut is a mask on the attention pattern (the query renormalises over the keys it still
sees), threaded through the one forward as ``attention_block`` (:func:`jaxinterp.models.forward`);
a scanned model gets it as one more per-layer input of the scan. Every (window start,
source set) pair runs in one compiled call: ``vmap`` over both.

Source sets for a prompt with a subject (:func:`source_sets`): ``subject`` (its tokens),
``non-subject`` (every other position before the last, BOS excluded as an attention sink
the paper leaves alone), ``subject-last`` (the subject's last token). The last position
is never a source: a query must keep at least one key.
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
from .models import forward

Array = jax.Array


def blocked_mask(n_layers: int, n_pos: int, last: Array, sources: Array, start, window: int) -> Array:
    """``[layer, batch, pos_q, pos_k]`` bool: the knocked-out attention edges.

    last: ``[batch]`` each prompt's last real position; sources: ``[batch, pos]`` or
    ``[pos]`` 0/1, the positions whose edges to ``last`` are cut; start: the first layer
    of the window (a traced int is fine), window: its length (clipped to the model)."""
    layers = jnp.arange(n_layers)
    in_window = (layers >= start) & (layers < start + window)  # [layer]
    is_last = jnp.arange(n_pos)[None, :] == last[:, None]  # [batch, pos_q]
    src = jnp.broadcast_to(jnp.asarray(sources) > 0, (last.shape[0], n_pos))  # [batch, pos_k]
    return in_window[:, None, None, None] & is_last[None, :, :, None] & src[None, :, None, :]


@functools.partial(jit, static_argnames=("cfg", "window"))
def _knockout_probs(params, cfg: ModelConfig, tokens, attention_mask, last, targets, sources, starts, *, window):
    """``[start, set, batch]`` p(target) at ``last`` with the edges cut (see :func:`knockout_probs`)."""
    n_pos = tokens.shape[1]

    def one(start, src):
        blocked = blocked_mask(cfg.n_layers, n_pos, last, src, start, window)
        logits = forward(params, cfg, tokens, attention_mask, logit_positions=last, attention_block=blocked)
        probs = jax.nn.softmax(logits[:, 0].astype(jnp.float32), -1)
        return jnp.take_along_axis(probs, targets[:, None], 1)[:, 0]

    return jax.vmap(lambda s: jax.vmap(lambda src: one(s, src))(sources))(starts)


def knockout_probs(params, cfg: ModelConfig, tokens, targets, sources, starts, window: int,
                   attention_mask=None) -> np.ndarray:
    """Target probabilities with attention knocked out, every (start, source set) at once.

    tokens: ``[batch, pos]`` right-padded prompts; targets: ``[batch]`` token ids;
    sources: ``[set, batch, pos]`` (or ``[set, pos]``, the same for every prompt) 0/1;
    starts: ``[start]`` first layers of the windows; window: layers per window;
    attention_mask: ``[batch, pos]`` (default all real). Returns ``[start, set, batch]``.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, pos] with pos >= 2, got shape {tokens.shape}")
    B, P = tokens.shape
    mask = np.ones((B, P), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    last = mask.sum(1) - 1
    sources = np.asarray(sources)
    if sources.ndim == 2:
        sources = np.broadcast_to(sources[:, None], (sources.shape[0], B, P))
    if sources.ndim != 3 or sources.shape[1:] != (B, P):
        raise ValueError(f"sources must be [set, batch={B}, pos={P}] or [set, pos={P}], got {sources.shape}")
    if (sources[:, np.arange(B), last] > 0).any():
        raise ValueError("a source set holds the last position itself; the last position must keep a key to "
                         "attend to (knock out the edges from other positions)")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    starts = np.asarray(starts, np.int32).reshape(-1)
    if ((starts < 0) | (starts >= cfg.n_layers)).any():
        raise ValueError(f"window starts {starts.tolist()} must lie in 0..{cfg.n_layers - 1}")
    targets = np.asarray(targets, np.int32).reshape(-1)
    if targets.shape != (B,) or ((targets < 0) | (targets >= cfg.vocab_size)).any():
        raise ValueError(f"targets must be {B} token ids in 0..{cfg.vocab_size - 1}, got {targets.tolist()}")
    out = _knockout_probs(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(last),
                          jnp.asarray(targets), jnp.asarray(sources.astype(np.float32)), jnp.asarray(starts),
                          window=int(window))
    return np.asarray(out)


def source_sets(n_pos: int, subject: Sequence[int]) -> dict[str, np.ndarray]:
    """Geva et al.'s source sets for one prompt of ``n_pos`` tokens (BOS at 0) whose
    subject covers token positions ``subject``: name -> ``[pos]`` 0/1."""
    last = n_pos - 1
    subject = [p for p in subject if p != last]
    sets = {"subject": np.zeros(n_pos, np.float32), "subject-last": np.zeros(n_pos, np.float32),
            "non-subject": np.zeros(n_pos, np.float32)}
    sets["subject"][subject] = 1
    if subject:
        sets["subject-last"][max(subject)] = 1
    sets["non-subject"][1:last] = 1
    sets["non-subject"][subject] = 0
    return {k: v for k, v in sets.items() if v.any()}


@dataclasses.dataclass
class Knockout:
    """Attention knockout of one prompt.

    probs ``[start, set]``: p(target) with the edges from ``set_names[j]`` to the last
    position cut in layers ``starts[i] .. starts[i] + window - 1``; ``p_clean``: without.
    """

    probs: np.ndarray
    p_clean: float
    starts: list
    set_names: list
    sets: list
    window: int
    tokens: list
    target: int
    target_text: str

    @property
    def relative_change(self) -> np.ndarray:
        """``[start, set]``: ``(p - p_clean) / p_clean`` (the paper's % change / 100)."""
        return (self.probs - self.p_clean) / self.p_clean

    def to_dict(self) -> dict:
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}
        d["relative_change"] = self.relative_change.tolist()
        return d


def knockout(model, prompt: str, subject: Optional[str] = None,
             sources: Optional[dict[str, Sequence[int]]] = None, target: Union[int, str, None] = None,
             window: int = 1, starts: Optional[Sequence[int]] = None) -> Knockout:
    """Attention knockout on a :class:`jaxinterp.Model`: p(target) at the prompt's last
    token when the attention edges from each source set to it are cut in each window.

    subject: words in the prompt (:func:`jaxinterp.tracing.find_subject`) giving the
        sets of :func:`source_sets`; sources: instead (or as well), name -> token
        positions (BOS is position 0).
    target: token id or word; default the model's top prediction.
    window: layers per window (Geva et al. use 9 of 48 in GPT-2 XL); starts: the
        windows' first layers, default every layer.
    """
    from .data import tokenize
    from .tracing import target_id, find_subject

    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model directory has no tokenizer to read the prompt with")
    ids = np.asarray(tokenize(model.tokenizer, [prompt])[0], np.int32)
    n_pos = len(ids)
    sets: dict[str, np.ndarray] = {}
    if subject is not None:
        sets.update(source_sets(n_pos, find_subject(model.tokenizer, ids, subject)))
    for name, positions in (sources or {}).items():
        bad = [p for p in positions if not 0 <= int(p) < n_pos - 1]
        if bad or not positions:
            raise ValueError(f"source set {name!r}: positions {list(positions)} must be non-empty and in "
                             f"0..{n_pos - 2} (the last position {n_pos - 1} is the query)")
        sets[name] = np.zeros(n_pos, np.float32)
        sets[name][[int(p) for p in positions]] = 1
    if not sets:
        raise ValueError("give a subject (words in the prompt) or source sets of token positions")
    starts = list(range(model.cfg.n_layers)) if starts is None else [int(s) for s in starts]
    clean = jax.nn.softmax(model(ids[None])[0, -1])
    tid = target_id(model, target, clean)
    probs = knockout_probs(model.params, model.cfg, ids[None], [tid], np.stack(list(sets.values())), starts,
                           window)[:, :, 0]
    return Knockout(probs, float(clean[tid]), starts, list(sets), [np.flatnonzero(v).tolist() for v in sets.values()],
                    int(window), [model.tokenizer.decode([t]) for t in ids], tid, model.tokenizer.decode([tid]))


def plot_knockout(result: Knockout, path: str, title: Optional[str] = None) -> str:
    """Geva et al.'s figure: % change of p(target) against the window's first layer, one
    line per source set, written to ``path`` (:func:`jaxinterp.io.write_figure`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import write_figure

    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=140)
    change = 100 * result.relative_change
    for j, name in enumerate(result.set_names):
        ax.plot(result.starts, change[:, j], marker="o", ms=3, label=name)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel(f"first of {result.window} knocked-out layer{'s' if result.window > 1 else ''}", fontsize=8)
    ax.set_ylabel(f"% change of p({result.target_text.strip()})", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(title or f"attention knockout to the last token (p clean {result.p_clean:.2f})", fontsize=9)
    fig.tight_layout()
    return write_figure(fig, path)
