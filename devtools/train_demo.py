"""Train the shipped demo model: a small GPT-2 that solves IOI, greater-than and induction.

Command (seed 0 is the default; this is how ``jaxinterp/demo/model`` was made)::

    python -m devtools.train_demo --out jaxinterp/demo/model --seed 0

(from the repository root; ``devtools`` is development code, not installed with jaxinterp;
the shipped model's ``training.json`` records the command under its former name,
``jaxinterp.train_demo``).

Model: GPT-2 architecture (learned positions, LayerNorm, GELU-new MLP, tied embeddings),
3 layers, 4 heads, d_model 64, d_mlp 256, n_ctx 32, vocabulary = the word-level tokenizer
over :func:`jaxinterp.tasks.task_vocabulary` (249 tokens). Forward: :func:`jaxinterp.models.forward`.

Data: the clean prompts of :mod:`jaxinterp.tasks` (BOS + prompt + the ``target`` word),
a fixed pool of ``N_TRAIN`` examples per task drawn with ``seed``; batches mix the tasks
evenly. Loss: next-token cross-entropy at the answer position only (IOI, greater-than:
the target after the prompt; induction: every position of the repeated half, each of
which induction predicts). AdamW, warm-up then cosine decay, batch 128.

Held-out evaluation (512 prompts per task from seed ``seed + 1000``, never used in
training; the same definitions are in :func:`evaluate`):

* IOI accuracy: logit(IO name) > logit(subject name) at the last prompt position.
* greater-than accuracy: the argmax over the 100 year tokens ``"00" .. "99"`` is a year
  strictly later than the start year. Since a model that always said "99" would pass
  that, two more are reported: the "near" accuracy (the argmax is 1 .. 10 years after the
  start year, the span of the training continuations, so the prediction must depend on
  the start year) and the mean probability difference p(later year) - p(not later year)
  over year tokens (the reference's ``prob_diff``).
* induction accuracy: logit(correct next word) > logit(distractor).

Measured for the shipped checkpoint (seed 0, 2-core CPU, jax CPU; ``training.json`` next
to it): 2000 steps in 241 s, final loss 0.417; held out: IOI accuracy 1.000 (mean logit
difference 12.18), greater-than accuracy 1.000 (near 1.000, prob_diff 0.893), induction
accuracy 0.994 (logit difference 11.34). After 500 steps: IOI 0.934, greater-than 0.971.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from jaxinterp import layout, tasks
from jaxinterp.config import ModelConfig

N_TRAIN = 20000  # examples per task in the training pool
N_EVAL = 512  # held-out examples per task
DEFAULTS = dict(n_layers=3, n_heads=4, d_model=64, d_mlp=256, n_ctx=32)


def demo_tokenizer():
    from jaxinterp.tokenizer import build_word_tokenizer

    return build_word_tokenizer(tasks.task_vocabulary())


def demo_config(tokenizer, n_layers=3, n_heads=4, d_model=64, d_mlp=256, n_ctx=32) -> ModelConfig:
    """The demo model's architecture (its embeddings are tied: :func:`init_params`, :func:`export_gpt2`)."""
    return ModelConfig(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_model // n_heads,
                       d_mlp=d_mlp, vocab_size=len(tokenizer), n_ctx=n_ctx, norm="layernorm", norm_eps=1e-5,
                       positional="learned", act_fn="gelu_new")


def init_params(cfg: ModelConfig, seed: int, tied: bool = True):
    """GPT-2 initialisation of every leaf of ``cfg``'s layout (:data:`jaxinterp.layout.LEAVES`):
    N(0, 0.02) weights, learned positions N(0, 0.01), residual output projections
    (``w_o``, ``w_out``) scaled by 1/sqrt(2 n_layers), zero biases, unit norm gains.
    ``unembed.w_u`` is absent when ``tied`` (it is ``embed.w_e.T``, see :func:`full_params`)."""
    import jax
    import jax.numpy as jnp

    # 16 keys, drawn in the table's order: the demo model's weights do not depend on
    # how many leaves a config has
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    std, out_std = 0.02, 0.02 / np.sqrt(2 * cfg.n_layers)

    def init(path, shape):
        name = path[-1]
        if name == "b" or name.startswith("b_"):
            return jnp.zeros(shape, jnp.float32)
        if name == "w" and path[-2].startswith("ln"):  # a norm's gain
            return jnp.ones(shape, jnp.float32)
        scale = {"w_pos": 0.01, "w_o": out_std, "w_out": out_std}.get(name, std)
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    return layout.unflatten({path: init(path, shape) for path, shape in layout.shapes(cfg).items()
                             if not (path == ("unembed", "w_u") and tied)})


def full_params(params):
    """The parameter tree :func:`jaxinterp.models.forward` reads (tied unembedding added)."""
    return {**params, "unembed": {"w_u": params["embed"]["w_e"].T}}


# ----------------------------------------------------------------------------- data


def build_examples(rows: Sequence[dict], tokenizer, length: int):
    """Training arrays for generated rows: ``inputs, targets, loss_mask, attention_mask``,
    each ``[example, length]``; the sequence is BOS + clean prompt + target word."""
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    ids = tokenizer([r["clean"] for r in rows], add_special_tokens=False)["input_ids"]
    n = len(rows)
    inputs = np.full((n, length), pad, np.int32)
    targets = np.full((n, length), pad, np.int32)
    loss_mask = np.zeros((n, length), np.float32)
    attn = np.zeros((n, length), np.int32)
    for i, (r, prompt) in enumerate(zip(rows, ids)):
        seq = [bos] + list(prompt) + [tasks.word_token_id(tokenizer, r["target"])]
        if len(seq) - 1 > length:
            raise ValueError(f"example of {len(seq) - 1} tokens exceeds the length {length}")
        inputs[i, :len(seq) - 1] = seq[:-1]
        targets[i, :len(seq) - 1] = seq[1:]
        attn[i, :len(seq) - 1] = 1
        last = len(seq) - 2  # the position that predicts the target
        if r["task"] == "induction":  # the repeated half: positions 1 + n .. 1 + n + k - 1
            loss_mask[i, 1 + r["length"]:last + 1] = 1.0
        else:
            loss_mask[i, last] = 1.0
    return inputs, targets, loss_mask, attn


def eval_batch(rows: Sequence[dict], tokenizer):
    """Clean prompts right-padded, with ``lengths`` and per-task label arrays."""
    ids = [[tokenizer.bos_token_id] + list(p)
           for p in tokenizer([r["clean"] for r in rows], add_special_tokens=False)["input_ids"]]
    length = max(map(len, ids))
    tokens = np.full((len(ids), length), tokenizer.pad_token_id, np.int32)
    for i, s in enumerate(ids):
        tokens[i, :len(s)] = s
    lengths = np.array([len(s) for s in ids], np.int32)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return tokens, mask, lengths


# ----------------------------------------------------------------------------- evaluation


def evaluate(params, cfg: ModelConfig, tokenizer, seed: int, n: int = N_EVAL, batch_size: int = 256) -> dict:
    """Held-out accuracies (definitions in the module docstring) on ``n`` prompts per task
    generated with ``seed``. ``params`` may be with or without ``unembed``."""
    import jax.numpy as jnp

    from jaxinterp.data import year_token_ids
    from jaxinterp.model import jit_forward

    if "unembed" not in params:
        params = full_params(params)
    fwd = jit_forward(cfg)
    year_ids = year_token_ids(tokenizer)
    out = {}
    for task in tasks.TASKS:
        rows = tasks.generate(task, n, seed)
        tokens, mask, lengths = eval_batch(rows, tokenizer)
        last = []
        for s in range(0, n, batch_size):
            logits = fwd(params, jnp.asarray(tokens[s:s + batch_size]), jnp.asarray(mask[s:s + batch_size]))
            last.append(np.asarray(logits)[np.arange(len(logits)), lengths[s:s + batch_size] - 1])
        last = np.concatenate(last)
        if task == "greater_than":
            label = np.array([r["label"] for r in rows])
            year_logits = last[:, year_ids]
            pred = year_logits.argmax(-1)
            probs = np.exp(last - last.max(-1, keepdims=True))
            probs = probs / probs.sum(-1, keepdims=True)
            p_year = probs[:, year_ids]
            later = np.arange(100)[None] > label[:, None]
            out["greater_than_accuracy"] = float((pred > label).mean())
            out["greater_than_near_accuracy"] = float(((pred > label) & (pred <= label + tasks.GT_MAX_SPAN)).mean())
            out["greater_than_prob_diff"] = float(np.where(later, p_year, -p_year).sum(-1).mean())
        else:
            correct = np.array([tasks.word_token_id(tokenizer, r["correct"]) for r in rows])
            incorrect = np.array([tasks.word_token_id(tokenizer, r["incorrect"]) for r in rows])
            ld = last[np.arange(n), correct] - last[np.arange(n), incorrect]
            out[f"{task}_accuracy"] = float((ld > 0).mean())
            out[f"{task}_logit_diff"] = float(ld.mean())
    return out


# ----------------------------------------------------------------------------- training


def train(seed: int = 0, steps: int = 2000, batch_size: int = 128, lr: float = 3e-3, warmup: int = 200,
          weight_decay: float = 0.01, n_train: int = N_TRAIN, eval_every: int = 500, n_eval: int = N_EVAL,
          quiet: bool = False, **model_kwargs):
    """Train the demo model. Returns ``(params, cfg, tokenizer, metrics)``; ``params``
    include the tied ``unembed``, ``metrics`` the held-out accuracies and timings."""
    import jax
    import optax

    from jaxinterp import models

    t0 = time.perf_counter()
    tokenizer = demo_tokenizer()
    cfg = demo_config(tokenizer, **{**DEFAULTS, **model_kwargs})
    rows = [r for task in tasks.TASKS for r in tasks.generate(task, n_train, seed)]
    length = cfg.n_ctx
    inputs, targets, loss_mask, attn = build_examples(rows, tokenizer, length)
    used = int(attn.sum(0).nonzero()[0].max()) + 1  # trim the common padding
    inputs, targets, loss_mask, attn = (a[:, :used] for a in (inputs, targets, loss_mask, attn))

    params = init_params(cfg, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    opt_state = opt.init(params)

    def loss_fn(p, x, y, w, m):
        logits = models.forward(full_params(p), cfg, x, m)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return (nll * w).sum() / w.sum()

    @jax.jit
    def step(p, s, x, y, w, m):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y, w, m)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng([seed, 7])
    per_task = batch_size // len(tasks.TASKS)
    history = []
    t_train = time.perf_counter()
    running = []
    for i in range(1, steps + 1):
        # equal shares of each task (the remainder from the whole pool)
        idx = np.concatenate([rng.integers(0, n_train, per_task) + k * n_train for k in range(len(tasks.TASKS))]
                             + [rng.integers(0, len(rows), batch_size - per_task * len(tasks.TASKS))])
        params, opt_state, loss = step(params, opt_state, inputs[idx], targets[idx], loss_mask[idx], attn[idx])
        running.append(loss)
        if i % eval_every == 0 or i == steps:
            mean_loss = float(np.mean(jax.device_get(running)))
            running = []
            acc = evaluate(params, cfg, tokenizer, seed + 1000, n=n_eval)
            history.append({"step": i, "loss": mean_loss, **acc, "seconds": time.perf_counter() - t_train})
            if not quiet:
                print(f"step {i:5d} loss {mean_loss:.4f} ioi {acc['ioi_accuracy']:.3f} "
                      f"gt {acc['greater_than_accuracy']:.3f} (near {acc['greater_than_near_accuracy']:.3f}, "
                      f"prob_diff {acc['greater_than_prob_diff']:.3f}) "
                      f"induction {acc['induction_accuracy']:.3f}  {history[-1]['seconds']:.0f}s", flush=True)
    metrics = {**history[-1], "train_seconds": time.perf_counter() - t_train,
               "total_seconds": time.perf_counter() - t0, "history": history, "seed": seed, "steps": steps}
    return full_params(params), cfg, tokenizer, metrics


# ----------------------------------------------------------------------------- export


def gpt2_state_dict(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameters as a Hugging Face ``GPT2LMHeadModel`` state dict (the inverse of
    ``conversion/families/gpt2.py``; the unembedding is tied to ``wte``)."""
    import jax

    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    D, H, E = cfg.d_model, cfg.n_heads, cfg.d_head
    if cfg.n_kv_heads != cfg.n_heads or cfg.norm != "layernorm" or cfg.positional != "learned":
        raise ValueError("export_gpt2 needs a GPT-2-shaped config")
    sd = {"transformer.wte.weight": p["embed"]["w_e"], "transformer.wpe.weight": p["embed"]["w_pos"],
          "transformer.ln_f.weight": p["ln_f"]["w"], "transformer.ln_f.bias": p["ln_f"]["b"]}
    b = p["blocks"]
    for layer in range(cfg.n_layers):
        pre = f"transformer.h.{layer}."
        a = {k: v[layer] for k, v in b["attn"].items()}
        sd[pre + "ln_1.weight"] = b["ln1"]["w"][layer]
        sd[pre + "ln_1.bias"] = b["ln1"]["b"][layer]
        # [head, d_model, d_head] -> Conv1D [d_model, head * d_head], q | k | v along the output axis
        sd[pre + "attn.c_attn.weight"] = np.concatenate(
            [a[f"w_{x}"].transpose(1, 0, 2).reshape(D, H * E) for x in "qkv"], axis=1)
        sd[pre + "attn.c_attn.bias"] = np.concatenate([a[f"b_{x}"].reshape(H * E) for x in "qkv"])
        sd[pre + "attn.c_proj.weight"] = a["w_o"].reshape(H * E, D)
        sd[pre + "attn.c_proj.bias"] = a["b_o"]
        sd[pre + "ln_2.weight"] = b["ln2"]["w"][layer]
        sd[pre + "ln_2.bias"] = b["ln2"]["b"][layer]
        sd[pre + "mlp.c_fc.weight"] = b["mlp"]["w_in"][layer]
        sd[pre + "mlp.c_fc.bias"] = b["mlp"]["b_in"][layer]
        sd[pre + "mlp.c_proj.weight"] = b["mlp"]["w_out"][layer]
        sd[pre + "mlp.c_proj.bias"] = b["mlp"]["b_out"][layer]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def export_gpt2(params, cfg: ModelConfig, path: str, tokenizer=None, bos_token_id=None) -> str:
    """Write ``path/config.json`` (``GPT2Config``), ``model.safetensors`` (GPT-2 key layout,
    tied embeddings: an unembedding that is not the embedding is refused) and, if given,
    the tokenizer files (its special token ids go into the config; without a tokenizer,
    ``bos_token_id``)."""
    from safetensors.numpy import save_file
    from transformers import GPT2Config

    os.makedirs(path, exist_ok=True)
    unembed = params.get("unembed", {})
    if unembed.get("b_u") is not None:
        raise ValueError("GPT-2 has no unembedding bias")
    if "w_u" in unembed and not np.array_equal(np.asarray(unembed["w_u"]), np.asarray(params["embed"]["w_e"]).T):
        raise ValueError("the unembedding is not tied to the embedding")
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    elif bos_token_id is not None:
        special = dict(bos_token_id=bos_token_id)
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function=cfg.act_fn,
                        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, architectures=["GPT2LMHeadModel"], **special)
    config.save_pretrained(path)
    save_file(gpt2_state_dict(params, cfg), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        from jaxinterp.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, path)
    return path


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.train_demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-accuracy", type=float, default=0.95,
                   help="exit with status 1 if held-out IOI or greater-than accuracy is below this")
    a = p.parse_args(argv)
    params, cfg, tok, metrics = train(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr)
    export_gpt2(params, cfg, a.out, tok)
    summary = {k: v for k, v in metrics.items() if k != "history"}
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump({"command": "python -m devtools.train_demo " + " ".join(sys.argv[1:] if argv is None else argv),
                   **summary, "history": metrics["history"]}, f, indent=1)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(json.dumps(summary, indent=1))
    print(f"wrote {a.out} ({size / 1e6:.2f} MB)")
    ok = min(metrics["ioi_accuracy"], metrics["greater_than_accuracy"]) >= a.min_accuracy
    if not ok:
        print(f"held-out accuracy below {a.min_accuracy}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
