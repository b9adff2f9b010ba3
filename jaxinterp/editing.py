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

A value delta is injected with the forward's ``mlp_delta`` (added to node ``m{l}``'s output
at the subject's last token), so the optimisation runs the one forward. Gemma 2
(sandwich norms) is refused: its ``m{l}`` node is the *normalised* MLP output, which a
rank-one change of ``w_out`` does not move linearly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .compiler import jit
from .config import ModelConfig
from .errors import JaxinterpError
from .models import activations, forward

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


def _bucket(n: int, cfg: ModelConfig) -> int:
    """``n`` tokens rounded up to a multiple of 8 (fewer compiled shapes), but never past
    a learned-position model's context."""
    ctx = cfg_ctx(cfg)
    return max(n, min(-(-n // 8) * 8, ctx)) if ctx is not None else -(-n // 8) * 8


def _pad_id(tokenizer) -> int:
    from .data import bos_id

    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos_id(tokenizer)


# --- generation (ROME's context prefixes; generated text for statistics) ----------------

@functools.partial(jit, static_argnames=("cfg", "length", "top_k"))
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

@functools.partial(jit, static_argnames=("cfg", "layer"))
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


def sample_tokens(model, text_file: Optional[str] = None, n_samples: Optional[int] = None,
                  length: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """The text sample for statistics as tokens ``[n, pos]`` right-padded with -1: the
    first ``n_samples`` (default all) non-empty lines of ``text_file``, each cut to
    ``length`` tokens after BOS (default 127), or ``n_samples`` (default 64) texts of
    ``length`` tokens the model generates (default 31); never past a learned-position
    model's context."""
    ctx = cfg_ctx(model.cfg)
    length = length or (31 if text_file is None else 127)
    if ctx is not None:
        length = min(length, ctx - 1)
    if text_file is None:
        return generate_ids(model, n_samples or 64, length, seed=seed)
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
                  cache: bool = True, progress: bool = True) -> np.ndarray:
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
    batch_size = min(batch_size, len(clean))
    extra = (-len(clean)) % batch_size  # whole batches (masked rows): one compiled program
    clean = np.pad(clean, ((0, extra), (0, 0)), constant_values=_pad_id(model.tokenizer))
    mask = np.pad(mask, ((0, extra), (0, 0)))
    for i in tqdm(range(0, len(clean), batch_size), desc=f"second moment, layer {layer}", leave=False,
                  disable=not progress):
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


def read_requests(path_or_records) -> list[dict]:
    """Edit requests from a JSON file (a list of records, or one record) or a list of
    dicts, in CounterFact's form (``{"requested_rewrite": {"prompt": "{} is in", "subject":
    ..., "target_new": {"str": ...}, "target_true": {"str": ...}}, "paraphrase_prompts":
    [...], "neighborhood_prompts": [...]}``) or flat (``prompt``, ``subject``, ``target_new``
    as strings; ``prompt`` may hold the subject instead of ``{}``). Returns flat records
    with ``template``, ``subject``, ``target_new``, ``target_true`` (or None),
    ``paraphrase_prompts`` and ``neighborhood_prompts`` (lists); a malformed record is an
    EditError naming it."""
    where = "requests"
    if isinstance(path_or_records, str):
        from .io import read_json

        where = path_or_records
        records = read_json(path_or_records)
    else:
        records = path_or_records
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise EditError(f"{where}: expected a non-empty JSON list of edit requests")

    def text(x, name, i, required=True):
        if isinstance(x, dict):
            x = x.get("str")
        if x is None and not required:
            return None
        if not isinstance(x, str) or not x.strip():
            raise EditError(f"{where}: request {i}: {name} must be a non-empty string, got {x!r}")
        return x

    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise EditError(f"{where}: request {i} is not a JSON object")
        rw = r.get("requested_rewrite", r)
        if not isinstance(rw, dict):
            raise EditError(f"{where}: request {i}: requested_rewrite is not a JSON object")
        prompt, subject = text(rw.get("prompt"), "prompt", i), text(rw.get("subject"), "subject", i)
        lists = {}
        for key in ("paraphrase_prompts", "neighborhood_prompts"):
            v = r.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
                raise EditError(f"{where}: request {i}: {key} must be a list of non-empty strings")
            lists[key] = v
        try:
            template = subject_template(prompt, subject)
        except EditError as e:
            raise EditError(f"{where}: request {i}: {e}") from None
        out.append({"template": template, "subject": subject,
                    "target_new": text(rw.get("target_new"), "target_new", i).strip(),
                    "target_true": (text(rw.get("target_true"), "target_true", i, required=False) or "").strip()
                    or None,
                    **lists})
    return out


def _v_rows(tokenizer, request: Request, contexts: Sequence[str], essence: str):
    """One request's rows for the value optimisation: every context + prompt + target[:-1],
    then the essence prompt. Returns ``(seqs, lookup (subject's last token per row),
    target positions per rewrite row [T], target ids [T])``."""
    target = target_token_ids(tokenizer, request.target)
    seqs, lookup, tpos = [], [], []
    for c in contexts:
        ids, last = subject_last_index(tokenizer, c.format(request.template), request.subject)
        n = len(ids)
        seqs.append(ids + target[:-1])
        lookup.append(last)
        tpos.append(list(range(n - 1, n - 1 + len(target))))
    if essence.strip() != "{}" and not _known(tokenizer, essence.replace("{}", "").strip() or "x"):
        essence = "{}"  # a word-level vocabulary without "is a": the subject on its own
    ids, last = subject_last_index(tokenizer, essence, request.subject)
    return seqs + [ids], lookup + [last], tpos, target


def _v_batch(tokenizer, reqs: Sequence[Request], contexts: Sequence[str], essence: str, cfg: ModelConfig) -> dict:
    """Every request's rows in one batch (``n_ctx`` rewrite rows, then one essence row, per
    request), right-padded to a multiple of 8 tokens (fewer compiled shapes). Targets are
    padded to the longest with weight 0."""
    rows = [_v_rows(tokenizer, r, contexts, essence) for r in reqs]
    T = max(len(r[3]) for r in rows)
    seqs, lookup, pos, tgt, w, owner = [], [], [], [], [], []
    for j, (sq, lk, tp, target) in enumerate(rows):
        seqs += sq
        lookup += lk
        owner += [j] * len(sq)
        for t in tp + [[lk[-1]] * len(target)]:  # the essence row reads its subject's last token
            pos.append(t + [t[-1]] * (T - len(t)))
        tgt.append(target + [target[-1]] * (T - len(target)))
        w.append([1.0] * len(target) + [0.0] * (T - len(target)))
    tokens, mask = _pad(seqs, _pad_id(tokenizer))
    extra = _bucket(tokens.shape[1], cfg) - tokens.shape[1]
    tokens = np.pad(tokens, ((0, 0), (0, extra)), constant_values=_pad_id(tokenizer))
    mask = np.pad(mask, ((0, 0), (0, extra)))
    return dict(tokens=tokens, mask=mask, lookup=np.asarray(lookup, np.int32), logit_pos=np.asarray(pos, np.int32),
                target=np.asarray(tgt, np.int32), target_w=np.asarray(w, np.float32),
                owner=np.asarray(owner, np.int32), n_ctx=len(contexts), n_req=len(reqs))


@functools.partial(jit, static_argnames=("cfg", "layer"))
def _capture(params, cfg: ModelConfig, tokens, mask, positions, layer: int) -> dict:
    """Layer ``layer``'s MLP hidden ``[batch, d_mlp]``, MLP output and residual after its
    block ``[batch, d_model]`` at ``positions [batch]``."""
    acts = activations(params, cfg, tokens, mask)
    b = jnp.arange(tokens.shape[0])
    return {"hidden": acts["mlp_hidden"][layer, b, positions], "mlp_out": acts["mlp_out"][layer, b, positions],
            "resid": acts["resid"][layer + 1, b, positions]}


def capture_at(model, seqs: Sequence[Sequence[int]], lookup: Sequence[int], layer: int, batch_size: int = 64) -> dict:
    """:func:`_capture` of token lists ``seqs`` at ``lookup`` (one position per sequence),
    in batches padded to multiples of 8 rows and 8 tokens (few compiled shapes): numpy
    float64 ``hidden [n, d_mlp]``, ``mlp_out [n, d_model]``, ``resid [n, d_model]``."""
    pad_id = _pad_id(model.tokenizer)
    n_pos = _bucket(max(map(len, seqs)), model.cfg)
    out = {"hidden": [], "mlp_out": [], "resid": []}
    for i in range(0, len(seqs), batch_size):
        chunk, look = list(seqs[i:i + batch_size]), list(lookup[i:i + batch_size])
        rows = min(batch_size, -(-len(chunk) // 8) * 8)
        tokens, mask = _pad(chunk + [chunk[-1]] * (rows - len(chunk)), pad_id)
        tokens = np.pad(tokens, ((0, 0), (0, n_pos - tokens.shape[1])), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (0, n_pos - mask.shape[1])))
        got = _capture(model.params, model.cfg, jnp.asarray(tokens), jnp.asarray(mask),
                       jnp.asarray(look + [look[-1]] * (rows - len(chunk)), jnp.int32), layer)
        for k in out:
            out[k].append(np.asarray(got[k], np.float64)[:len(chunk)])
    return {k: np.concatenate(v) for k, v in out.items()}


def _shifted_logits(params, cfg: ModelConfig, tokens, mask, lookup, logit_pos, delta, layer: int):
    """Logits ``[batch, k, vocab]`` at ``logit_pos [batch, k]`` with ``delta [batch, d_model]``
    added to layer ``layer``'s MLP node output at each row's ``lookup`` (which also moves the
    residual after the block: MEMIT's z)."""
    place = jax.nn.one_hot(lookup, tokens.shape[1], dtype=delta.dtype)[:, :, None] * delta[:, None, :]
    return forward(params, cfg, tokens, mask, logit_positions=logit_pos, mlp_delta=(layer, place))


def _safe_norm(x: Array, axis=-1) -> Array:
    """``|x|`` along ``axis`` with gradient 0 at ``x = 0`` (as torch's), not NaN: the value
    optimisation starts there."""
    sq = jnp.sum(x * x, axis)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _v_losses(deltas, params, cfg, batch, kl_init, target_norm, *, layer, n_ctx, kl_factor, weight_decay):
    """Per-request ROME loss ``[request]`` (and its parts) for ``deltas [request, d_model]``."""
    n_req = deltas.shape[0]
    logits = _shifted_logits(params, cfg, batch["tokens"], batch["mask"], batch["lookup"], batch["logit_pos"],
                             deltas[batch["owner"]], layer)
    logp = jax.nn.log_softmax(logits, -1).reshape((n_req, n_ctx + 1) + logits.shape[1:])  # [req, row, T, vocab]
    picked = jnp.take_along_axis(logp[:, :n_ctx], jnp.broadcast_to(batch["target"][:, None, :, None],
                                                                   (n_req, n_ctx) + batch["target"].shape[1:] + (1,)),
                                 -1)[..., 0]  # [req, ctx, T]
    w = batch["target_w"][:, None, :]
    nll_each = -(picked * w).sum(-1) / w.sum(-1)  # [req, ctx]
    kl_logp = logp[:, n_ctx, 0]  # [req, vocab]
    # torch's kl_div(init, new, log_target=True, "batchmean") as ROME calls it: KL(new || init)
    kl = (jnp.exp(kl_logp) * (kl_logp - kl_init)).sum(-1)
    wd = weight_decay * _safe_norm(deltas) / target_norm ** 2
    return nll_each.mean(1) + kl_factor * kl + wd, (nll_each, kl, kl_logp)


@functools.partial(jit, static_argnames=("cfg", "layer", "n_ctx", "kl_factor", "weight_decay", "lr"))
def _v_step(deltas, state, active, params, cfg, batch, kl_init, target_norm, max_norm, *, layer, n_ctx, kl_factor,
            weight_decay, lr):
    """One Adam step of every active request's delta (Adam is elementwise, so one optimiser
    over the stacked deltas is one optimiser per request), then ROME's projection."""
    import optax

    def total(d):
        losses, aux = _v_losses(d, params, cfg, batch, kl_init, target_norm, layer=layer, n_ctx=n_ctx,
                                kl_factor=kl_factor, weight_decay=weight_decay)
        return losses.sum(), (losses, aux)

    (_, (losses, aux)), g = jax.value_and_grad(total, has_aux=True)(deltas)
    upd, state = optax.adam(lr).update(g, state, deltas)
    new = optax.apply_updates(deltas, upd)
    n = jnp.linalg.norm(new, axis=-1, keepdims=True)
    new = jnp.where(n > max_norm[:, None], new * max_norm[:, None] / jnp.maximum(n, 1e-30), new)
    return losses, aux, jnp.where(active[:, None], new, deltas), state


def optimise_values(model, reqs: Sequence[Request], layer: int, contexts: Sequence[str], hp,
                    progress: bool = True, residual: bool = False) -> tuple[np.ndarray, dict]:
    """ROME's ``compute_v`` for every request at once: ``(v* [request, d_model], info)``.
    ``residual``: the initial value is the residual after block ``layer`` instead of the
    MLP output (MEMIT's ``compute_z``; the delta is added at the same node, which
    moves exactly that residual). A request stops when its loss falls below 0.05, as ROME's."""
    import optax
    from tqdm.auto import tqdm

    cfg, params = model.cfg, model.params
    batch = _v_batch(model.tokenizer, reqs, contexts, hp.essence, cfg)
    if cfg_ctx(cfg) is not None and int(batch["mask"].sum(1).max()) > cfg_ctx(cfg):
        raise EditError(f"the prefixed prompts have {int(batch['mask'].sum(1).max())} tokens, more than the model's "
                        f"context of {cfg_ctx(cfg)}; use shorter context prefixes")
    n_ctx, n_req = batch.pop("n_ctx"), batch.pop("n_req")
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    first = np.arange(n_req) * (n_ctx + 1)  # each request's plain prompt (context "{}")
    seqs = [list(np.asarray(batch["tokens"][i][:int(batch["mask"][i].sum())])) for i in first]
    got = capture_at(model, seqs, [int(batch["lookup"][i]) for i in first], layer)
    target_init = jnp.asarray(got["resid" if residual else "mlp_out"], jnp.float32)
    tnorm = jnp.linalg.norm(target_init, axis=-1)
    kw = dict(layer=layer, n_ctx=n_ctx, kl_factor=hp.kl_factor, weight_decay=hp.v_weight_decay)
    deltas = jnp.zeros((n_req, cfg.d_model), jnp.float32)
    state = optax.adam(hp.v_lr).init(deltas)
    # the initial distributions: one call of the step itself with every request inactive (nothing moves)
    kl_init = _v_step(deltas, state, jnp.zeros(n_req, bool), params, cfg, batch, jnp.zeros((n_req, cfg.vocab_size)),
                      tnorm, hp.clamp_norm_factor * tnorm, lr=hp.v_lr, **kw)[1][2]
    active = np.ones(n_req, bool)
    history = []
    bar = tqdm(range(hp.v_steps), desc=f"{'MEMIT z' if residual else 'ROME value'}, layer {layer}", leave=False,
               disable=not progress)
    for it in bar:
        losses, aux, new, new_state = _v_step(deltas, state, jnp.asarray(active), params, cfg, batch, kl_init, tnorm,
                                              hp.clamp_norm_factor * tnorm, lr=hp.v_lr, **kw)
        losses = np.asarray(losses)
        history.append({"loss": float(losses.mean()), "p_target": float(jnp.exp(-aux[0]).mean()),
                        "kl": float(aux[1].mean())})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", p=f"{history[-1]['p_target']:.3f}")
        if not np.isfinite(losses).all():
            raise EditError("the value optimisation diverged (the loss is not finite)")
        active &= losses >= 5e-2  # ROME stops a request here, before stepping
        if not active.any() or it == hp.v_steps - 1:  # and never steps on its last iteration
            break
        deltas, state = new, new_state
    v_star = np.asarray(target_init + deltas, np.float64)
    return v_star, {"history": history, "delta_norm": np.asarray(jnp.linalg.norm(deltas, axis=-1)).tolist(),
                    "target_init_norm": np.asarray(tnorm).tolist(), "n_contexts": n_ctx,
                    "final_loss": losses.tolist()}


def optimise_value(model, request: Request, layer: int, contexts: Sequence[str], hp, progress: bool = True,
                   residual: bool = False) -> tuple[np.ndarray, dict]:
    """:func:`optimise_values` of one request: ``(v* [d_model], info)``."""
    v, info = optimise_values(model, [request], layer, contexts, hp, progress, residual)
    return v[0], info


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
    got = capture_at(model, seqs, lookup, layer)
    keys = got["hidden"]
    return keys[:-1].mean(0), keys[-1], got["mlp_out"][-1]


def subject_positions(tokenizer, template: str, subject: str) -> tuple[list[int], list[int]]:
    """``(ids of template.format(subject) with BOS, positions of the subject's tokens)``:
    the occurrence the template places (not the first one in the text: a prompt such as
    ``"When Mary and John went to the store , {} gave a drink to"`` has the subject twice).
    When the text before the subject does not tokenise the same on its own, only the
    subject's last token is returned."""
    ids, last = subject_last_index(tokenizer, template, subject)
    head = template[:template.index("{}")].rstrip()
    start = len(_ids(tokenizer, head, "prompt")) if head else 1
    if not head or ids[:start] == _ids(tokenizer, head, "prompt"):
        return ids, list(range(min(start, last), last + 1))
    return ids, [last]


def default_layer(model, request: Request) -> int:
    """The layer whose MLP output, restored at the subject's last token in a causal trace
    (ROME's noise on the subject's tokens, the occurrence the template places),
    recovers most of the model's own prediction."""
    from .tracing import causal_trace

    ids, subject = subject_positions(model.tokenizer, request.template, request.subject)
    trace = causal_trace(model, request.prompt, subject=subject, kind="mlp", window=1)
    return int(np.argmax(trace.scores[:, subject[-1]]))


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


# --- MEMIT ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemitHParams:
    """MEMIT's hyperparameters (defaults: its GPT-2 XL file). ``mom2_update_weight``: the
    weight ``lambda`` of the prior keys' second moment against the new keys
    (``lambda C + K K^T``); it counts in tokens of prior text."""

    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_update_weight: float = 20000.0
    context_lengths: tuple = ((10, 5),)
    essence: str = "{} is a"
    seed: int = 0


def _keys_at(model, reqs: Sequence[Request], layer: int, contexts: Sequence[str]) -> np.ndarray:
    """``[request, d_mlp]``: each request's key at ``layer``, MEMIT's average over its
    context types (the plain prompt, and the mean over the generated prefixes)."""
    seqs, lookup = [], []
    for r in reqs:
        for c in contexts:
            ids, last = subject_last_index(model.tokenizer, c.format(r.template), r.subject)
            seqs.append(ids)
            lookup.append(last)
    keys = capture_at(model, seqs, lookup, layer)["hidden"].reshape(len(reqs), len(contexts), -1)
    plain, rest = keys[:, 0], keys[:, 1:]
    return plain if rest.shape[1] == 0 else (plain + rest.mean(1)) / 2


def memit(model, requests, layers: Optional[Sequence[int]] = None, hparams: Optional[MemitHParams] = None,
          mom2s: Optional[dict] = None, text_file: Optional[str] = None, contexts: Optional[Sequence[str]] = None,
          return_info: bool = False, progress: bool = True):
    """MEMIT: many edits at once over ``layers`` (default: the 4 layers up to the first
    request's :func:`default_layer`). ``requests``: records of :func:`read_requests` or
    ``(prompt, subject, target)`` tuples. The residual each edit needs at the last layer
    is spread over the layers (``1 / (layers left)`` of what remains at each), and each
    layer's update solves ``(lambda C + K K^T) A = K`` for the keys ``K [d_mlp, n]``:
    ``w_out += A R^T``. Returns a new :class:`jaxinterp.Model` (and info)."""
    from tqdm.auto import tqdm

    check_editable(model.cfg)
    hp = hparams or MemitHParams()
    reqs = [Request.make(*r) if isinstance(r, (tuple, list)) else Request(r["template"], r["subject"], r["target_new"])
            for r in (requests if not isinstance(requests, str) else read_requests(requests))]
    if not reqs:
        raise EditError("no edit requests")
    if layers is None:
        top = default_layer(model, reqs[0])
        layers = list(range(max(0, top - 3), top + 1))
    layers = sorted(int(l) for l in layers)
    for l in layers:
        _check_layer(model.cfg, l)
    contexts = list(contexts) if contexts is not None else context_templates(model, hp.context_lengths, hp.seed)
    z_layer = layers[-1]
    zs, z_info = optimise_values(model, reqs, z_layer, contexts, hp, progress, residual=True)  # [request, d_model]
    plain = [subject_last_index(model.tokenizer, r.template, r.subject) for r in reqs]
    params = model.params
    info = {"layers": layers, "zs": zs, "updates": {}, "z_history": z_info["history"]}
    for i, layer in enumerate(tqdm(layers, desc="MEMIT layers", leave=False, disable=not progress)):
        current = dataclasses.replace(model, params=params)
        keys = _keys_at(current, reqs, layer, contexts)  # [request, d_mlp]
        cur_z = capture_at(current, [p[0] for p in plain], [p[1] for p in plain], z_layer)["resid"]
        resid = (zs - cur_z) / (len(layers) - i)  # [request, d_model]
        c = mom2s[layer] if mom2s is not None and layer in mom2s else \
            second_moment(model, layer, sample_tokens(model, text_file))
        upd = memit_update(c, keys, resid, hp.mom2_update_weight)
        params = with_w_out(params, layer, upd)
        info["updates"][layer] = upd
    edited = dataclasses.replace(model, params=params, path=None)
    return (edited, info) if return_info else edited


def memit_update(mom2, keys, resid, weight: float) -> np.ndarray:
    """MEMIT's layer update ``[d_mlp, d_model]``: ``A R^T`` with ``(weight C + K^T K) A = K^T``
    (float64). mom2: ``C [d_mlp, d_mlp]``; keys: ``K [request, d_mlp]``; resid: ``R
    [request, d_model]`` (this layer's share of each edit's residual)."""
    k = np.asarray(keys, np.float64).T  # [d_mlp, n]
    adj = np.linalg.solve(weight * np.asarray(mom2, np.float64) + k @ k.T, k)
    return adj @ np.asarray(resid, np.float64)


# --- evaluation as the papers do (CounterFact) ---------------------------------------------------

def target_logprobs(model, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """``[n]``: ``log p(" " + target | prompt)`` summed over the target's tokens (teacher
    forcing), one prompt-target pair per entry."""
    seqs, spans = [], []
    for prompt, target in zip(prompts, targets):
        ids, t = _ids(model.tokenizer, prompt, "prompt"), target_token_ids(model.tokenizer, target)
        seqs.append(ids + t[:-1])
        spans.append((len(ids) - 1, t))
    n_pos = _bucket(max(map(len, seqs)), model.cfg)
    out = np.zeros(len(seqs))
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        rows = min(batch_size, -(-len(chunk) // 8) * 8)
        tokens, mask = _pad(chunk + [chunk[-1]] * (rows - len(chunk)), _pad_id(model.tokenizer))
        tokens = np.pad(tokens, ((0, 0), (0, n_pos - tokens.shape[1])), constant_values=_pad_id(model.tokenizer))
        mask = np.pad(mask, ((0, 0), (0, n_pos - mask.shape[1])))
        logp = np.asarray(jax.nn.log_softmax(model(tokens, mask), -1))
        for j, (start, t) in enumerate(spans[i:i + batch_size]):
            out[i + j] = sum(logp[j, start + k, tok] for k, tok in enumerate(t))
    return out


def n_gram_entropy(texts: Sequence[str], ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency: per text, the entropy (bits) of its word bigram and trigram
    frequencies, weighted 2/3 and 4/3 and averaged; then the mean over texts (words are
    whitespace-separated here; ROME uses nltk's tokenizer). Repetitive text scores low."""
    scores = []
    for text in texts:
        words = text.split()
        ents = []
        for n in ns:
            grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
            if not grams:
                ents.append(0.0)
                continue
            _, counts = np.unique(np.array([" ".join(g) for g in grams]), return_counts=True)
            p = counts / counts.sum()
            ents.append(float(-(p * np.log2(p)).sum()))
        scores.append(float(np.mean(np.array(ents) * np.array(weights))))
    return float(np.mean(scores)) if scores else float("nan")


def generate_text(model, prompts: Sequence[str], length: int, seed: int = 0, top_k: int = 5) -> list[str]:
    """Each prompt continued by up to ``length`` sampled tokens (top-k, as ROME's
    ``generate_fast``), prompt included, as text; prompts of one length run together."""
    ids = [_ids(model.tokenizer, p, "prompt") for p in prompts]
    banned = np.zeros(model.cfg.vocab_size, np.float32)
    for t in getattr(model.tokenizer, "all_special_ids", []):
        if 0 <= t < len(banned):
            banned[t] = 1
    out = [""] * len(prompts)
    for n in sorted(set(map(len, ids))):
        which = [i for i, x in enumerate(ids) if len(x) == n]
        steps = length if cfg_ctx(model.cfg) is None else max(0, min(length, cfg_ctx(model.cfg) - n))
        start = np.asarray([ids[i] for i in which], np.int32)
        gen = start if steps == 0 else np.asarray(_sample(
            model.params, model.cfg, jnp.asarray(start), jnp.asarray(banned), jax.random.PRNGKey(seed + n),
            length=int(steps), top_k=int(min(top_k, (banned == 0).sum()))))
        for row, i in zip(gen, which):
            out[i] = _text(model.tokenizer, row[1:]) or " ".join(model.tokenizer.decode([int(t)]) for t in row[1:])
    return out


def evaluate_edits(model, records, gen_length: int = 20, seed: int = 0) -> dict:
    """CounterFact's scores of ``model`` on ``records`` (:func:`read_requests`; those
    without ``target_true`` count in the top-1 scores only):

    * ``efficacy``: fraction of rewrite prompts with ``p(target_new) > p(target_true)``;
      ``paraphrase``: the same over the paraphrase prompts; ``neighborhood``: fraction of
      neighbourhood prompts with ``p(target_true) > p(target_new)`` (ROME's ES, PS, NS);
    * ``*_top1``: fraction of prompts whose top-1 token is ``target_new``'s first token
      (for neighbourhood prompts: is *not*);
    * ``fluency``: :func:`n_gram_entropy` of text generated from the rewrite prompts.
    """
    records = read_requests(records) if isinstance(records, str) or isinstance(records, dict) else \
        [r if "template" in r else read_requests([r])[0] for r in records]
    groups = {"efficacy": [], "paraphrase": [], "neighborhood": []}
    for r in records:
        groups["efficacy"].append((r["template"].format(r["subject"]), r))
        groups["paraphrase"] += [(p, r) for p in r["paraphrase_prompts"]]
        groups["neighborhood"] += [(p, r) for p in r["neighborhood_prompts"]]
    out = {}
    for name, items in groups.items():
        if not items:
            continue
        prompts = [p for p, _ in items]
        new = target_logprobs(model, prompts, [r["target_new"] for _, r in items])
        with_true = [i for i, (_, r) in enumerate(items) if r["target_true"]]
        if with_true:
            true = target_logprobs(model, [prompts[i] for i in with_true],
                                   [items[i][1]["target_true"] for i in with_true])
            wins = new[with_true] > true if name != "neighborhood" else true > new[with_true]
            out[name] = float(np.mean(wins))
        first = np.array([target_token_ids(model.tokenizer, r["target_new"])[0] for _, r in items])
        top = top1_ids(model, prompts)
        hit = top == first
        out[f"{name}_top1"] = float(np.mean(~hit if name == "neighborhood" else hit))
        out[f"n_{name}"] = len(items)
    if gen_length > 0:
        texts = generate_text(model, [p for p, _ in groups["efficacy"]], gen_length, seed)
        out["fluency"] = n_gram_entropy(texts)
    return out


def top1_ids(model, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """``[n]`` the top-1 next token of each prompt (padded batches)."""
    seqs = [_ids(model.tokenizer, p, "prompt") for p in prompts]
    n_pos = _bucket(max(map(len, seqs)), model.cfg)
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        rows = min(batch_size, -(-len(chunk) // 8) * 8)
        tokens, mask = _pad(chunk + [chunk[-1]] * (rows - len(chunk)), _pad_id(model.tokenizer))
        tokens = np.pad(tokens, ((0, 0), (0, n_pos - tokens.shape[1])), constant_values=_pad_id(model.tokenizer))
        mask = np.pad(mask, ((0, 0), (0, n_pos - mask.shape[1])))
        logits = np.asarray(model(tokens, mask))
        out.append(logits[np.arange(len(chunk)), mask.sum(1)[:len(chunk)] - 1].argmax(-1))
    return np.concatenate(out)
