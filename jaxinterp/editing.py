"""Model editing: ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023) on the functional model.

An edit is a new parameter pytree that differs from the old one in the MLP output matrix
``w_out [layer, d_mlp, d_model]`` (GPT-2's ``c_proj``, NeoX's ``dense_4h_to_h``,
Llama/Mistral/Qwen2/Gemma's ``down_proj``) of one layer (ROME) or a few (MEMIT); every
other leaf is shared with the original.

ROME, as ``kmeng01/rome`` computes it:

* **key** ``k*`` ``[d_mlp]``: the MLP's hidden activation (the input of ``w_out``) at the
  subject's last token in layer ``l``, averaged over the prompt behind a few prefixes the
  model itself generates (:func:`context_templates`);
* **value** ``v*`` ``[d_model]``: the MLP output there plus a ``delta`` optimised with Adam
  (optax) so that the target becomes likely after every prefixed prompt, plus ROME's KL
  term that keeps the model's next-token distribution at the subject's last token of an
  "essence" prompt (``"{} is a"``), plus its weight decay ``|delta| / |v|^2``; after each
  step ``delta`` is projected into the ball ``|delta| <= clamp_norm_factor * |v|``;
* **second moment** ``C = E[k k^T]`` ``[d_mlp, d_mlp]`` of the hidden activations of
  layer ``l`` over a text sample (a file, or text the model generates), cached on disk per
  model, layer and sample (:func:`second_moment`);
* **closed form** (:func:`rank_one_update`): with ``u = C^-1 k*``,
  ``w_out' = w_out + u (v* - w_out^T k - b_out)^T / (k^T u)`` where ``k`` is the key of the
  prompt itself (ROME's code; its paper uses ``k = k*``), so that the prompt's own MLP
  output becomes exactly ``v*``.

The default layer is the one whose MLP output, restored at the subject's last token, brings
back most of the prediction in a causal trace (:mod:`jaxinterp.tracing`).

A value delta is injected with the forward's node shift (``EdgeIntervention(coef=None,
shift, mode="add")`` on node ``m{l}``), so the optimisation runs the one forward. Gemma 2
(sandwich norms) is refused: its ``m{l}`` node is the *normalised* MLP output, which a
rank-one change of ``w_out`` does not move linearly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import JaxinterpError
from .graph import GraphSpec
from .models import EdgeIntervention, activations, forward

Array = jax.Array


class EditError(JaxinterpError, ValueError):
    """An edit request that cannot be carried out (the message says why)."""


def check_editable(cfg: ModelConfig) -> None:
    if cfg.sandwich_norms:
        raise EditError("ROME/MEMIT edit w_out, whose output Gemma 2 normalises again (sandwich norms): the "
                        "rank-one update would not set the MLP output the value optimisation asked for; "
                        "edit a GPT-2, NeoX, Llama, Mistral, Qwen2 or Gemma model")


# --- tokens ------------------------------------------------------------------------------

def _ids(tokenizer, text: str, what: str) -> list[int]:
    """``[bos] + ids`` of ``text``; words outside a word-level vocabulary are an EditError."""
    from .data import DataError, tokenize

    try:
        return tokenize(tokenizer, [text])[0]
    except DataError as e:
        raise EditError(f"{what}: {e}") from None


def _known(tokenizer, text: str) -> bool:
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bool(ids) and (unk is None or unk not in ids)


def target_token_ids(tokenizer, target: str) -> list[int]:
    """The continuation ``" " + target`` as token ids (ROME prepends the space)."""
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or not _known(tokenizer, text):
        raise EditError(f"target {target!r} has words outside the tokenizer's vocabulary")
    return list(ids)


def subject_template(prompt: str, subject: str) -> str:
    """``prompt`` with the subject's first occurrence replaced by ``{}`` (a prompt that
    already holds ``{}`` is a template, as in CounterFact)."""
    if not subject or not subject.strip():
        raise EditError("the subject is empty")
    if "{}" in prompt:
        return prompt
    at = prompt.find(subject)
    if at < 0:
        raise EditError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    return prompt[:at].replace("{", "(").replace("}", ")") + "{}" + prompt[at + len(subject):]


def subject_last_index(tokenizer, template: str, subject: str) -> tuple[list[int], int]:
    """``(ids of template.format(subject) with BOS, index of the subject's last token)``,
    found as ROME does: from the length of the tokenised text up to the subject's end."""
    text = template.format(subject)
    ids = _ids(tokenizer, text, "prompt")
    head = template[:template.index("{}")] + subject
    n = len(_ids(tokenizer, head, "prompt"))
    if ids[:n] != _ids(tokenizer, head, "prompt"):  # the subject's tokens depend on what follows
        raise EditError(f"{text!r}: the subject {subject!r} does not tokenise the same on its own")
    return ids, n - 1


def _pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``tokens [batch, pos]`` and ``mask [batch, pos]``."""
    n = max(map(len, seqs))
    tokens = np.full((len(seqs), n), pad, np.int32)
    mask = np.zeros((len(seqs), n), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], mask[i, :len(s)] = s, 1
    return tokens, mask


def _pad_id(tokenizer) -> int:
    from .data import bos_id

    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos_id(tokenizer)


# --- generation (ROME's context prefixes; generated text for statistics) ----------------

@functools.partial(jax.jit, static_argnames=("cfg", "length", "top_k"))
def _sample(params, cfg: ModelConfig, start: Array, banned: Array, key, *, length: int, top_k: int) -> Array:
    """``start [n, p0]`` continued by ``length`` tokens sampled from the top ``top_k``
    (``banned [vocab]`` 0/1 never drawn): ``[n, p0 + length]``. One forward of the whole
    buffer per token (causal, so the not-yet-written tail is never read)."""
    n, p0 = start.shape
    buf = jnp.concatenate([start, jnp.zeros((n, length), start.dtype)], 1)

    def step(i, carry):
        buf, key = carry
        key, sub = jax.random.split(key)
        logits = forward(params, cfg, buf, logit_positions=jnp.full((n,), i - 1))[:, 0]
        logits = jnp.where(banned > 0, -jnp.inf, logits)
        top, idx = jax.lax.top_k(logits, top_k)
        pick = jax.random.categorical(sub, top, axis=-1)
        return buf.at[:, i].set(jnp.take_along_axis(idx, pick[:, None], 1)[:, 0].astype(buf.dtype)), key

    return jax.lax.fori_loop(p0, p0 + length, step, (buf, key))[0]


def generate_ids(model, n: int, length: int, seed: int = 0, top_k: int = 5) -> np.ndarray:
    """``n`` token sequences ``[n, 1 + length]`` sampled from the model after BOS (top-k)."""
    from .data import bos_id

    if cfg_ctx(model.cfg) is not None and 1 + length > cfg_ctx(model.cfg):
        raise EditError(f"{length} generated tokens exceed the model's context of {cfg_ctx(model.cfg)}")
    banned = np.zeros(model.cfg.vocab_size, np.float32)
    tok = model.tokenizer
    for t in getattr(tok, "all_special_ids", []):
        if 0 <= t < len(banned):
            banned[t] = 1
    top_k = min(top_k, int((banned == 0).sum()))
    start = np.full((n, 1), bos_id(tok), np.int32)
    return np.asarray(_sample(model.params, model.cfg, jnp.asarray(start), jnp.asarray(banned),
                              jax.random.PRNGKey(seed), length=int(length), top_k=int(top_k)))


def cfg_ctx(cfg: ModelConfig) -> Optional[int]:
    """The model's context when positions are learned (a hard limit), else None."""
    return cfg.n_ctx if cfg.positional == "learned" else None


def _text(tokenizer, ids: Sequence[int]) -> Optional[str]:
    """Text that tokenises back to ``ids`` (word-level tokenizers decode ``"store."``, which
    they cannot read back, so tokens are then joined by spaces), or None."""
    ids = [int(t) for t in ids if int(t) not in set(getattr(tokenizer, "all_special_ids", []))]
    for text in (tokenizer.decode(ids), " ".join(tokenizer.decode([t]).strip() for t in ids)):
        if tokenizer(text, add_special_tokens=False)["input_ids"] == ids:
            return text
    return None


def context_templates(model, lengths: Sequence[tuple[int, int]] = ((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """ROME's prompt prefixes: ``"{}"`` and, per ``(length, n)``, ``n`` texts of ``length``
    tokens the model generates, each followed by ``". {}"``."""
    out = ["{}"]
    for i, (length, n) in enumerate(lengths):
        for ids in generate_ids(model, int(n), int(length), seed=seed + i):
            text = _text(model.tokenizer, ids[1:])
            if text is None:
                continue
            for sep in (". {}", " . {}"):  # " ." for word-level vocabularies
                if _known(model.tokenizer, text + sep.format("")):
                    out.append(text.replace("{", "(").replace("}", ")") + sep)
                    break
    return out


# --- second-moment statistics ----------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _moment_sum(params, cfg: ModelConfig, tokens, mask, layer: int):
    """``(sum over real tokens of h h^T [d_mlp, d_mlp], count)`` of layer ``layer``'s hidden."""
    h = activations(params, cfg, tokens, mask)["mlp_hidden"][layer].astype(jnp.float32)
    w = mask.astype(jnp.float32)
    return jnp.einsum("bpm,bpn,bp->mn", h, h, w), w.sum()


def _stats_key(model, layer: int, tokens: np.ndarray) -> str:
    """Hash of what ``C`` of ``layer`` depends on: the parameters up to that layer's MLP
    input (its ``w_out``/``b_out`` and everything after are left out, so an edit of this
    layer keeps its statistics) and the text sample."""
    h = hashlib.sha256()
    h.update(model.cfg.to_json().encode())
    h.update(f"layer={layer}".encode())
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    for path, leaf in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.startswith("blocks/"):
            if name.endswith(("mlp/w_out", "mlp/b_out")):
                leaf = leaf[:layer]
            else:
                leaf = leaf[:layer + 1]
        elif not name.startswith("embed/"):
            continue
        h.update(name.encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    h.update(np.ascontiguousarray(tokens).tobytes())
    return h.hexdigest()[:32]


def stats_dir() -> str:
    """Where statistics are cached: ``$JAXINTERP_STATS_DIR``, else
    ``$XDG_CACHE_HOME/jaxinterp/stats`` (default ``~/.cache/jaxinterp/stats``)."""
    if os.environ.get("JAXINTERP_STATS_DIR"):
        return os.environ["JAXINTERP_STATS_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxinterp", "stats")


def sample_tokens(model, text_file: Optional[str] = None, n_samples: int = 64, length: Optional[int] = None,
                  seed: int = 0) -> np.ndarray:
    """The text sample for statistics as right-padded tokens ``[n, pos]`` (pad id after the
    end): the non-empty lines of ``text_file`` (each cut to ``length`` tokens), or
    ``n_samples`` texts of ``length`` tokens the model generates (default: up to 32)."""
    ctx = cfg_ctx(model.cfg)
    length = length or min(32, ctx or 32) - 1
    if ctx is not None:
        length = min(length, ctx - 1)
    if text_file is None:
        return generate_ids(model, n_samples, length, seed=seed)
    from .io import read_text

    lines = [ln.strip() for ln in read_text(text_file).splitlines() if ln.strip()]
    if not lines:
        raise EditError(f"{text_file}: no text to collect statistics from")
    seqs = []
    for i, line in enumerate(lines[:n_samples] if n_samples else lines):
        ids = _ids(model.tokenizer, line, f"{text_file}: line {i + 1}")
        seqs.append(ids[:length + 1])
    tokens, _ = _pad(seqs, -1)
    return tokens


def second_moment(model, layer: int, tokens: Optional[np.ndarray] = None, batch_size: int = 32,
                  cache: bool = True) -> np.ndarray:
    """``C = E[k k^T]`` ``[d_mlp, d_mlp]`` (float64) of layer ``layer``'s MLP hidden
    activations over the real tokens of ``tokens [n, pos]`` (right-padded with -1; default
    :func:`sample_tokens`), cached in :func:`stats_dir` under a hash of the model's
    parameters up to that layer and of the tokens."""
    from tqdm.auto import tqdm

    _check_layer(model.cfg, layer)
    tokens = sample_tokens(model) if tokens is None else np.asarray(tokens)
    key = _stats_key(model, layer, tokens)
    path = os.path.join(stats_dir(), f"mom2-{key}.npz")
    if cache and os.path.exists(path):
        with np.load(path) as f:
            return f["mom2"]
    mask = (tokens >= 0).astype(np.int32)
    clean = np.where(tokens >= 0, tokens, _pad_id(model.tokenizer)).astype(np.int32)
    total, count = np.zeros((model.cfg.d_mlp,) * 2), 0.0
    for i in tqdm(range(0, len(clean), batch_size), desc=f"second moment, layer {layer}", leave=False):
        s, c = _moment_sum(model.params, model.cfg, jnp.asarray(clean[i:i + batch_size]),
                           jnp.asarray(mask[i:i + batch_size]), layer)
        total += np.asarray(s, np.float64)
        count += float(c)
    mom2 = total / count
    if cache:
        import io as _io

        from .io import atomic_write_bytes

        os.makedirs(stats_dir(), exist_ok=True)
        buf = _io.BytesIO()
        np.savez(buf, mom2=mom2, n_tokens=count)
        atomic_write_bytes(path, buf.getvalue())
    return mom2


def _check_layer(cfg: ModelConfig, layer: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < cfg.n_layers:
        raise EditError(f"layer {layer!r} is outside 0..{cfg.n_layers - 1}")


# --- the closed form ----------------------------------------------------------------------

def rank_one_update(mom2, k_star, v_star, k_cur, cur_out) -> np.ndarray:
    """ROME's update ``[d_mlp, d_model]`` of ``w_out [d_mlp, d_model]``:
    ``u (v* - cur_out)^T / (k_cur . u)`` with ``u = C^-1 k*`` (float64 solve).

    mom2: ``C [d_mlp, d_mlp]``; k_star: ``[d_mlp]`` the averaged key; v_star: ``[d_model]``
    the value; k_cur, cur_out: the prompt's own key ``[d_mlp]`` and MLP output
    ``[d_model]`` (``w_out^T k_cur + b_out``), which the update maps to ``v*`` exactly."""
    c = np.asarray(mom2, np.float64)
    u = np.linalg.solve(c, np.asarray(k_star, np.float64))
    denom = float(np.asarray(k_cur, np.float64) @ u)
    if not np.isfinite(u).all() or denom == 0 or not np.isfinite(denom):
        raise EditError("the second-moment matrix is singular for this key (too little text for the statistics)")
    return np.outer(u, np.asarray(v_star, np.float64) - np.asarray(cur_out, np.float64)) / denom


def with_w_out(params, layer: int, delta: np.ndarray):
    """``params`` with ``delta [d_mlp, d_model]`` added to ``w_out[layer]`` (a new pytree;
    every other leaf is shared)."""
    mlp = dict(params["blocks"]["mlp"])
    w = mlp["w_out"]
    mlp["w_out"] = w.at[layer].add(jnp.asarray(delta, w.dtype)) if isinstance(w, jax.Array) else \
        _np_add(w, layer, delta)
    return {**params, "blocks": {**params["blocks"], "mlp": mlp}}


def _np_add(w, layer, delta):
    w = np.array(w)
    w[layer] = w[layer] + delta.astype(w.dtype)
    return w


# --- ROME -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RomeHParams:
    """ROME's hyperparameters (defaults: its GPT-2 XL file). ``context_lengths``: ``(tokens,
    count)`` of the generated prefixes; ``essence``: the KL prompt (a template)."""

    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    context_lengths: tuple = ((5, 10), (10, 10))
    essence: str = "{} is a"
    seed: int = 0


@dataclasses.dataclass
class Request:
    """One edit: ``template.format(subject)`` should continue with ``target``."""

    template: str
    subject: str
    target: str

    @classmethod
    def make(cls, prompt: str, subject: str, target: str) -> "Request":
        if not isinstance(target, str) or not target.strip():
            raise EditError(f"the target must be a non-empty string, got {target!r}")
        return cls(subject_template(prompt, subject), subject, target.strip())

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)


def _v_batch(tokenizer, request: Request, contexts: Sequence[str], essence: str):
    """Token batch for the value optimisation: every context + prompt + target[:-1], then
    the essence prompt. Returns ``(tokens, mask [batch, pos], lookup [batch] subject's last
    token, target_pos [n_rewrite, T], target [T], n_rewrite)``."""
    target = target_token_ids(tokenizer, request.target)
    seqs, lookup, tpos = [], [], []
    for c in contexts:
        ids, last = subject_last_index(tokenizer, c.format(request.template), request.subject)
        n = len(ids)
        seqs.append(ids + target[:-1])
        lookup.append(last)
        tpos.append(list(range(n - 1, n - 1 + len(target))))
    if not _known(tokenizer, essence.format("").strip() or "x") and essence.strip() != "{}":
        essence = "{}"  # a word-level vocabulary without "is a": the subject on its own
    ids, last = subject_last_index(tokenizer, essence, request.subject)
    seqs.append(ids)
    lookup.append(last)
    tokens, mask = _pad(seqs, _pad_id(tokenizer))
    return tokens, mask, np.asarray(lookup, np.int32), np.asarray(tpos, np.int32), np.asarray(target, np.int32), \
        len(contexts)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _keys_values(params, cfg: ModelConfig, tokens, mask, positions, layer: int):
    """``(hidden [batch, d_mlp], mlp output [batch, d_model])`` of layer ``layer`` at
    ``positions [batch]``."""
    acts = activations(params, cfg, tokens, mask)
    b = jnp.arange(tokens.shape[0])
    return acts["mlp_hidden"][layer, b, positions], acts["mlp_out"][layer, b, positions]


def _shifted_logits(params, cfg: ModelConfig, tokens, mask, lookup, logit_pos, delta, node: int):
    """Logits ``[batch, k, vocab]`` at ``logit_pos [batch, k]`` with ``delta`` (``[d_model]``,
    or ``[batch, d_model]``) added to node ``node``'s output at each row's ``lookup``."""
    B, P = tokens.shape
    n_src = GraphSpec.from_config(cfg).n_forward
    delta = jnp.broadcast_to(delta, (B, delta.shape[-1]))
    place = jax.nn.one_hot(lookup, P, dtype=delta.dtype)[:, :, None] * delta[:, None, :]  # [batch, pos, d_model]
    source = jnp.zeros((n_src, B, P, delta.shape[-1]), delta.dtype).at[node].set(place)
    shift = jnp.zeros((n_src,), delta.dtype).at[node].set(1.0)
    return forward(params, cfg, tokens, mask, intervention=EdgeIntervention(None, source, shift, mode="add"),
                   logit_positions=logit_pos)


def _safe_norm(x: Array) -> Array:
    """``|x|`` with gradient 0 at ``x = 0`` (as torch's), not NaN: the value optimisation starts there."""
    sq = jnp.sum(x * x)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _v_loss(delta, params, cfg, tokens, mask, lookup, logit_pos, target, kl_init, target_norm, node,
            n_rewrite: int, kl_factor: float, weight_decay: float):
    logp = jax.nn.log_softmax(_shifted_logits(params, cfg, tokens, mask, lookup, logit_pos, delta, node), -1)
    T = target.shape[0]
    nll_each = -jnp.take_along_axis(logp[:n_rewrite], jnp.broadcast_to(target, (n_rewrite, T))[..., None],
                                    -1)[..., 0].sum(1) / T
    kl_logp = logp[n_rewrite:, 0]
    # torch's kl_div(init, new, log_target=True, "batchmean") as ROME calls it: KL(new || init)
    kl = (jnp.exp(kl_logp) * (kl_logp - kl_init)).sum(-1).mean()
    wd = weight_decay * _safe_norm(delta) / target_norm ** 2
    return nll_each.mean() + kl_factor * kl + wd, (nll_each, kl, wd, kl_logp)


def optimise_value(model, request: Request, layer: int, contexts: Sequence[str], hp: RomeHParams,
                   progress: bool = True) -> tuple[np.ndarray, dict]:
    """ROME's ``compute_v``: ``(v* [d_model], info)`` for ``request`` at ``layer``."""
    import optax
    from tqdm.auto import tqdm

    cfg, params = model.cfg, model.params
    tokens, mask, lookup, tpos, target, n_rw = _v_batch(model.tokenizer, request, contexts, hp.essence)
    if cfg_ctx(cfg) is not None and tokens.shape[1] > cfg_ctx(cfg):
        raise EditError(f"the prefixed prompts have {tokens.shape[1]} tokens, more than the model's context of "
                        f"{cfg_ctx(cfg)}; use shorter context prefixes")
    T = len(target)
    logit_pos = np.concatenate([tpos, np.repeat(lookup[n_rw:, None], T, 1)]).astype(np.int32)
    node = GraphSpec.from_config(cfg).mlp_index(layer)
    _, outs = _keys_values(params, cfg, jnp.asarray(tokens[:1]), jnp.asarray(mask[:1]), jnp.asarray(lookup[:1]),
                           layer)
    target_init = outs[0].astype(jnp.float32)
    args = (params, cfg, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lookup), jnp.asarray(logit_pos),
            jnp.asarray(target))
    zero = jnp.zeros((cfg.d_model,), jnp.float32)
    loss_fn = functools.partial(_v_loss, n_rewrite=n_rw, kl_factor=hp.kl_factor, weight_decay=hp.v_weight_decay)
    kl_init = jax.jit(lambda d: loss_fn(d, *args, jnp.zeros((1, cfg.vocab_size)), jnp.linalg.norm(target_init),
                                        node)[1][3], static_argnums=())(zero)
    opt = optax.adam(hp.v_lr)
    tnorm = jnp.linalg.norm(target_init)
    max_norm = hp.clamp_norm_factor * tnorm

    @jax.jit
    def step(delta, state):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(delta, *args, kl_init, tnorm, node)
        upd, state = opt.update(g, state, delta)
        new = optax.apply_updates(delta, upd)
        n = jnp.linalg.norm(new)
        new = jnp.where(n > max_norm, new * max_norm / n, new)  # ROME's projection into the L2 ball
        return loss, aux, new, state

    delta, state = zero, opt.init(zero)
    history = []
    bar = tqdm(range(hp.v_steps), desc=f"ROME value, layer {layer}", leave=False, disable=not progress)
    for it in bar:
        loss, aux, new, new_state = step(delta, state)
        loss = float(loss)
        history.append({"loss": loss, "p_target": float(jnp.exp(-aux[0]).mean()), "kl": float(aux[1])})
        bar.set_postfix(loss=f"{loss:.3f}", p=f"{history[-1]['p_target']:.3f}")
        if loss < 5e-2 or it == hp.v_steps - 1:  # ROME stops before stepping on its last iteration
            break
        delta, state = new, new_state
    if not np.isfinite(history[-1]["loss"]):
        raise EditError("the value optimisation diverged (the loss is not finite)")
    v_star = np.asarray(target_init + delta, np.float64)
    return v_star, {"history": history, "delta_norm": float(jnp.linalg.norm(delta)),
                    "target_init_norm": float(tnorm), "n_contexts": n_rw}


def compute_key(model, request: Request, layer: int, contexts: Sequence[str]) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
    """ROME's ``compute_u`` key before the ``C^-1``: ``(k* [d_mlp] averaged over the
    contexts, the plain prompt's key [d_mlp], its MLP output [d_model])``."""
    seqs, lookup = [], []
    for c in contexts:
        ids, last = subject_last_index(model.tokenizer, c.format(request.template), request.subject)
        seqs.append(ids)
        lookup.append(last)
    plain, plain_last = subject_last_index(model.tokenizer, request.template, request.subject)
    seqs.append(plain)
    lookup.append(plain_last)
    tokens, mask = _pad(seqs, _pad_id(model.tokenizer))
    keys, outs = _keys_values(model.params, model.cfg, jnp.asarray(tokens), jnp.asarray(mask),
                              jnp.asarray(lookup, jnp.int32), layer)
    keys = np.asarray(keys, np.float64)
    return keys[:-1].mean(0), keys[-1], np.asarray(outs[-1], np.float64)


def default_layer(model, request: Request) -> int:
    """The layer whose MLP output, restored at the subject's last token in a causal trace
    (ROME's noise on the subject), recovers most of the model's own prediction."""
    from .tracing import causal_trace

    trace = causal_trace(model, request.prompt, subject=request.subject, kind="mlp", window=1)
    return int(np.argmax(trace.scores[:, max(trace.subject)]))


def rome(model, prompt: str, subject: str, target: str, layer: Optional[int] = None,
         hparams: Optional[RomeHParams] = None, mom2: Optional[np.ndarray] = None,
         text_file: Optional[str] = None, contexts: Optional[Sequence[str]] = None, return_info: bool = False,
         progress: bool = True):
    """Edit ``model`` so that ``prompt`` (which contains ``subject``, or is a ``{}``
    template) continues with ``target``: a new :class:`jaxinterp.Model` whose
    ``w_out[layer]`` carries ROME's rank-one update; the original is unchanged.

    layer: default :func:`default_layer`; mom2: ``C [d_mlp, d_mlp]`` (default
    :func:`second_moment` over ``text_file``'s lines or generated text); contexts: the
    prompt prefixes (default :func:`context_templates`). With ``return_info`` also a dict
    of the keys, value, update and the optimisation's history.
    """
    check_editable(model.cfg)
    if model.tokenizer is None:
        raise EditError(f"{model.path}: the model has no tokenizer to read the prompt with")
    hp = hparams or RomeHParams()
    request = Request.make(prompt, subject, target)
    layer = default_layer(model, request) if layer is None else layer
    _check_layer(model.cfg, layer)
    contexts = list(contexts) if contexts is not None else context_templates(model, hp.context_lengths, hp.seed)
    if mom2 is None:
        mom2 = second_moment(model, layer, sample_tokens(model, text_file))
    k_star, k_cur, cur_out = compute_key(model, request, layer, contexts)
    v_star, info = optimise_value(model, request, layer, contexts, hp, progress)
    upd = rank_one_update(mom2, k_star, v_star, k_cur, cur_out)
    edited = dataclasses.replace(model, params=with_w_out(model.params, layer, upd), path=None)
    if not return_info:
        return edited
    return edited, {**info, "layer": layer, "k_star": k_star, "k_cur": k_cur, "cur_out": cur_out, "v_star": v_star,
                    "update": upd, "contexts": contexts}
