"""Optimal ablation (Li & Janson 2024), as the MIB circuit track computes it.

An *optimal ablation* of node ``u`` replaces ``u``'s output, at every position of every
prompt, by the one constant ``c_u [d_model]`` that keeps the model's loss lowest. The
constants ``c [src, d_model]`` (one per forward node of the circuit graph: ``input``,
every head, every MLP) are then the ablation values of the ``optimal`` intervention:
an edge outside a circuit carries its source's constant, exactly the data path of the
``mean`` intervention (:func:`jaxinterp.interventions.intervention_means`) with learned
values in place of the node means, so evaluation, curves, ``mib score``, ACDC, Edge
Pruning and the attribution methods that take ``mean`` take ``optimal`` too.

**Definition, after MIB's ``oa.py``** (hannamw/MIB-circuit-track, ``OptimalAblationFinder``;
its values are read by the reference's ``load_ablations`` at the MIB commit of
hannamw/EAP-IG):

* each node is ablated *alone*, the rest of the model intact (``oa.py`` optimises one
  component at a time); node ``u``'s loss ``L_u(c_u)`` is the mean next-token
  cross-entropy of the model on the clean prompts with ``u`` replaced by ``c_u``.
  The objective here is ``sum_u L_u(c_u)``: ``c_u`` enters ``L_u`` only, so its gradient
  is ``dL_u/dc_u``, and Adam, elementwise, moves every ``c_u`` exactly as one Adam per
  component does (``oa.py``'s ``optimizers[component]``);
* the start is each node's mean output over the data (``oa.py``'s ``compute_means``);
* Adam, learning rate 1e-3, at most 1000 steps, one batch per step; every 10 steps the
  step's loss (mean over nodes) is compared with the best so far, and training stops
  after 3 such checks without improvement (``oa.py``'s ``check_every=10, patience=3``).

**Where this differs from MIB's code**, on purpose:

* the loss counts real tokens only (``t`` and ``t + 1`` both inside the prompt):
  ``oa.py`` runs right-padded batches without their attention mask and scores the
  padding (the end-of-text token) as targets;
* the start is the mean over real tokens: ``compute_means`` divides the *sum* over a
  batch's tokens by the number of batches, not of tokens (a start some ``batch x pos``
  times the mean), and includes padding;
* the ``input`` node is the graph's ``input`` node (the scaled token embedding, what an
  edge from ``input`` carries here); ``oa.py`` optimises ``hook_embed`` while position
  embeddings stay, and ``load_ablations`` then patches that value in for the whole input
  node;
* every head gets its own constant: ``load_ablations`` fills only the first head of each
  layer (its loop skips a layer's later attention nodes) and leaves the others at zero;
* ``oa.py`` also ablates the last layer's ``hook_resid_post``, which is no node of the
  graph and which ``load_ablations`` never reads: not learned here;
* batches are taken in order, cycling (``oa.py`` draws a fresh shuffled batch each
  step); the batch size is an option (``oa.py``'s rule meant 20 for GPT-2 but compares
  the model object with names, so it always gives 5).

The constants are saved as ``.npz`` (:func:`save`, written atomically: ``values [src,
d_model]``, the node names and the graph's shape) and read back, checked against the
model, by :func:`load` (``--intervention optimal --intervention-data FILE.npz``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import zipfile
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .compiler import jit
from .config import ModelConfig
from .data import Pairs
from .graph import GraphSpec
from .interventions import load_data, mean_activations, sum_over_batches
from .models import EdgeIntervention, forward
from .sharding import batches as shard_batches, replicate, shard_model, to_host

FORMAT = "jaxinterp optimal ablation 1"


@dataclasses.dataclass
class OptimalAblation:
    """Learned constants ``values [src, d_model]`` for the nodes ``node_names`` of a graph
    with ``cfg`` (:meth:`GraphSpec.to_cfg`); ``history``: per step the loss (mean over
    nodes of the batch's per-node loss); ``start_losses`` / ``losses`` ``[src]``: each
    node's loss over the whole data at the start (the means) and at the end."""

    values: np.ndarray
    node_names: list
    cfg: dict
    history: dict = dataclasses.field(default_factory=dict)
    start_losses: Optional[np.ndarray] = None
    losses: Optional[np.ndarray] = None


# --- the loss -------------------------------------------------------------------------------
def next_token_nll(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(sum, count)`` of ``-log p(next token)`` over the batch's real predictions
    (position ``t`` predicting ``t + 1``, both real tokens; padding rows weigh 0), from
    ``logits [batch, pos, vocab]``."""
    tokens = batch["clean"]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = batch["attention_mask"][:, 1:].astype(jnp.float32) * batch["weight"][:, None]
    return (nll * w).sum(), w.sum()


def node_ablation_nll(params, cfg: ModelConfig, batch: dict, values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sums [src], count)``: :func:`next_token_nll` of the model with node ``u`` alone
    replaced by ``values[u]`` (``[src, d_model]``) at every position, for every ``u``.

    Node ``u``'s output is shifted by ``values[u] - out_u`` (the graph forward's node
    ``shift``), so that the residual stream and every edge out of ``u`` carry the
    constant, as circuit evaluation's ablated edges carry it. ``out_u`` is ``u``'s output
    in the plain run, which is its output in the ablated run too: ``u``'s inputs come
    from nodes before it. The ``grad`` mode's edge coefficients are zero: no per-edge
    work in the forward pass."""
    real = GraphSpec.from_config(cfg).real_edge_mask
    tokens, mask = batch["clean"], batch["attention_mask"]
    _, outs = forward(params, cfg, tokens, mask, return_node_outputs=True)
    source = values[:, None, None, :].astype(jnp.float32) - jax.lax.stop_gradient(outs).astype(jnp.float32)
    coef = jnp.zeros(real.shape, jnp.float32)

    def one(u):
        shift = (jnp.arange(real.shape[0]) == u).astype(jnp.float32)
        logits = forward(params, cfg, tokens, mask, EdgeIntervention(coef, source, shift=shift, mode="grad"))
        return next_token_nll(logits, batch)

    sums, counts = jax.lax.map(one, jnp.arange(real.shape[0]))
    return sums, counts[0]


@functools.partial(jit, static_argnames=("cfg",))
def _step(state, params, batch, lr, *, cfg: ModelConfig):
    """One Adam step on ``sum_u L_u(c_u)`` over one batch: ``state = (values, adam state)``
    -> ``(new state, nll sums [src], count)`` (:func:`node_ablation_nll` at the old
    values). ``lr`` is traced, so ``lr = 0`` is the same program: the loss passes reuse
    the training step's compilation."""

    def loss_fn(values):
        sums, count = node_ablation_nll(params, cfg, batch, values)
        return (sums / jnp.maximum(count, 1.0)).sum(), (sums, count)

    import optax  # here, not at the top: every jaxinterp command imports this module (its parser), optax 0.06 s

    values, opt_state = state
    (_, (sums, count)), grad = jax.value_and_grad(loss_fn, has_aux=True)(values)
    updates, opt_state = optax.adam(lr).update(grad, opt_state, values)
    return (optax.apply_updates(values, updates), opt_state), sums, count


def _state(values: np.ndarray, mesh=None):
    import optax

    values = replicate(jnp.asarray(values, jnp.float32), mesh)
    return values, optax.adam(0.0).init(values)


def ablation_losses(model, data: Union[str, Pairs], values: np.ndarray, batch_size: int = 16, mesh=None,
                    quiet: bool = True) -> np.ndarray:
    """``[src]``: each node's loss ``L_u`` (mean next-token cross-entropy over all of
    ``data``'s real predictions) with node ``u`` alone replaced by ``values[u]``."""
    pairs = load_data(model, data)
    model = shard_model(model, mesh)
    state, lr = _state(values, mesh), jnp.float32(0.0)
    sums, count = sum_over_batches(lambda b: _step(state, model.params, b, lr, cfg=model.cfg)[1:], pairs,
                                   batch_size, mesh, "ablation loss", quiet)
    if count <= 0:
        raise ValueError("the data's prompts are one token long: there is no next token to predict")
    return sums / count


# --- learning -------------------------------------------------------------------------------
def learn_optimal_ablation(model, data: Union[str, Pairs], steps: int = 1000, lr: float = 1e-3,
                           batch_size: int = 16, check_every: int = 10, patience: Optional[int] = 3,
                           init: Union[str, np.ndarray] = "mean", mesh=None, quiet: bool = False) -> OptimalAblation:
    """Learn every node's optimal-ablation constant on ``data``'s clean prompts (a pairs
    CSV or :class:`Pairs`), as the module docstring defines it.

    steps, lr: Adam's steps (one batch each, cycling) and learning rate.
    check_every, patience: every ``check_every`` steps the step's loss is compared with
        the best so far; after ``patience`` checks without improvement training stops
        (``patience=None``: run every step).
    init: ``"mean"`` (each node's mean output over the data's real tokens), ``"zero"``, or
        an array ``[src, d_model]``.
    """
    if steps < 1 or check_every < 1 or (patience is not None and patience < 1) or not lr > 0:
        raise ValueError(f"need steps, check_every, patience >= 1 and lr > 0, got steps={steps}, "
                         f"check_every={check_every}, patience={patience}, lr={lr}")
    pairs = load_data(model, data)
    spec, cfg = GraphSpec.from_config(model.cfg), model.cfg
    shape = (spec.n_forward, cfg.d_model)
    if isinstance(init, str):
        if init not in ("mean", "zero"):
            raise ValueError(f"init must be 'mean', 'zero' or an array {shape}, got {init!r}")
        start = (mean_activations(model, pairs, batch_size=batch_size, mesh=mesh)[0] if init == "mean"
                 else np.zeros(shape, np.float32))
    else:
        start = check_values(init, spec, cfg.d_model, "init")
    start_losses = ablation_losses(model, pairs, start, batch_size, mesh)
    sharded = shard_model(model, mesh)
    state, rate = _state(start, mesh), jnp.float32(lr)
    batches = list(shard_batches(pairs, batch_size, mesh))
    losses, best, stale = [], np.inf, 0
    for i in tqdm(range(steps), desc="optimal ablation", disable=quiet):
        state, sums, count = _step(state, sharded.params, batches[i % len(batches)], rate, cfg=cfg)
        losses.append((sums / jnp.maximum(count, 1.0)).mean())  # the step's loss, mean over nodes
        if patience is not None and i % check_every == 0:
            now = float(to_host(losses[-1]))
            if now < best:
                best, stale = now, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    history = {"loss": np.array([float(to_host(x)) for x in losses])}
    if not np.isfinite(history["loss"]).all():
        step = int(np.argmin(np.isfinite(history["loss"])))
        raise FloatingPointError(f"optimal ablation: non-finite loss at step {step}; lower lr")
    learned = np.asarray(to_host(state[0]), np.float32)
    return OptimalAblation(learned, list(spec.forward_names), _graph_cfg(spec, cfg), history, start_losses,
                           ablation_losses(model, pairs, learned, batch_size, mesh))


def _graph_cfg(spec: GraphSpec, cfg: ModelConfig) -> dict:
    """What the constants fit: the graph's forward nodes (view-free) and the model width."""
    return {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "parallel_attn_mlp": spec.parallel_attn_mlp,
            "d_model": cfg.d_model}


# --- files ----------------------------------------------------------------------------------
def save(ablation: OptimalAblation, path: str) -> str:
    """Write ``ablation`` as ``.npz`` (``values``, ``node_names``, ``cfg`` as JSON, the
    losses and history), atomically."""
    from .io import atomic_write_bytes

    values = np.asarray(ablation.values, np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"not writing {path}: the constants hold NaN or infinity")
    arrays = {"format": np.array(FORMAT), "values": values, "node_names": np.array(ablation.node_names),
              "cfg": np.array(json.dumps(ablation.cfg))}
    for key in ("start_losses", "losses"):
        if getattr(ablation, key) is not None:
            arrays[key] = np.asarray(getattr(ablation, key), np.float64)
    if "loss" in ablation.history:
        arrays["history_loss"] = np.asarray(ablation.history["loss"], np.float64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load(path: str, model=None) -> OptimalAblation:
    """Read a file written by :func:`save`; with ``model``, ValueError unless its constants
    are ``model``'s nodes ``[src, d_model]`` (every error names ``path`` and the cause)."""
    what = "not an optimal-ablation file (an .npz written by `jaxinterp optimal-ablation`)"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: {what}: {e}") from None
    missing = {"format", "values", "node_names", "cfg"} - set(arrays)
    if missing or str(arrays["format"]) != FORMAT:
        raise ValueError(f"{path}: {what}" + (f" (missing {sorted(missing)})" if missing else ""))
    try:
        cfg = json.loads(str(arrays["cfg"]))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: {what} (its cfg is not JSON)") from None
    result = OptimalAblation(arrays["values"], [str(n) for n in arrays["node_names"]], cfg,
                             {"loss": arrays["history_loss"]} if "history_loss" in arrays else {},
                             arrays.get("start_losses"), arrays.get("losses"))
    if model is not None:
        spec = GraphSpec.from_config(model.cfg)
        if result.node_names != list(spec.forward_names):
            raise ValueError(f"{path}: constants for {len(result.node_names)} nodes of a graph with cfg {cfg}, but the "
                             f"model's graph has {spec.n_forward} nodes ({spec.n_layers} layers x {spec.n_heads} "
                             f"heads)")
        check_values(result.values, spec, model.cfg.d_model, path)
    return result


def check_values(values, spec: GraphSpec, d_model: int, what: str) -> np.ndarray:
    """``values`` as float32 ``[src, d_model]``; ValueError naming ``what`` unless it has
    that shape and is finite."""
    arr = np.asarray(values)
    if arr.shape != (spec.n_forward, d_model) or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: constants of shape {arr.shape} ({arr.dtype}), the model needs float "
                         f"[{spec.n_forward}, {d_model}] (one per node)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: the constants hold NaN or infinity")
    return arr.astype(np.float32)


def ablation_values(model, intervention_data) -> np.ndarray:
    """The ``optimal`` intervention's values ``[src, 1, d_model]`` from ``intervention_data``:
    a file (:func:`save`), an :class:`OptimalAblation` or an array ``[src, d_model]``."""
    if intervention_data is None:
        raise ValueError("intervention 'optimal' needs its learned constants as intervention_data (an .npz from "
                         "`jaxinterp optimal-ablation`, an OptimalAblation or an array [src, d_model]); CLI: "
                         "--intervention-data FILE.npz")
    spec = GraphSpec.from_config(model.cfg)
    if isinstance(intervention_data, OptimalAblation):
        values = check_values(intervention_data.values, spec, model.cfg.d_model, "the optimal ablation")
    elif isinstance(intervention_data, (str, bytes)) or hasattr(intervention_data, "__fspath__"):
        values = load(str(intervention_data), model).values.astype(np.float32)
    else:
        values = check_values(intervention_data, spec, model.cfg.d_model, "intervention_data")
    return values[:, None]


# --- command line ---------------------------------------------------------------------------
def cmd_optimal_ablation(args) -> int:
    """``jaxinterp optimal-ablation``: learn the constants, print the losses, write the .npz."""
    from .loading import load_model

    model = load_model(args.model, dtype=jnp.dtype(args.dtype))
    pairs = load_data(model, args.data)
    if args.limit is not None:
        pairs = pairs.head(args.limit)
    result = learn_optimal_ablation(model, pairs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                    check_every=args.check_every, patience=args.patience or None,
                                    quiet=args.quiet)
    save(result, args.out)
    start, end = float(np.mean(result.start_losses)), float(np.mean(result.losses))
    print(f"optimal ablation of {len(result.node_names)} nodes on {len(pairs)} prompts, "
          f"{len(result.history['loss'])} steps: next-token loss with one node ablated, mean over nodes "
          f"{start:.4f} (node means) -> {end:.4f} (learned) -> {args.out}")
    return 0


def add_parser(sub, positive_int, nonneg_int, positive_float) -> None:
    """The ``optimal-ablation`` command (called by :func:`jaxinterp.cli.build_parser`)."""
    p = sub.add_parser("optimal-ablation", help="learn each node's optimal-ablation constant (MIB's oa.py) for "
                                                "--intervention optimal")
    p.description = ("Learn one constant per graph node (input, heads, MLPs) that keeps the next-token loss lowest "
                     "when that node alone is replaced by it at every position (MIB's oa.py; Adam from the node "
                     "means, early stopping as oa.py). Use the .npz with --intervention optimal "
                     "--intervention-data FILE.npz in evaluate, curve, attribute, acdc, prune and mib score.")
    p.add_argument("--model", required=True, help="model directory, `jaxinterp convert` output, .gguf or smollm2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--data", required=True, help="pairs CSV; its clean prompts are the training text")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N prompts")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per step (default: 16)")
    p.add_argument("--steps", type=positive_int, default=1000, help="at most this many Adam steps (default: 1000)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam's learning rate (default: 1e-3, as oa.py)")
    p.add_argument("--check-every", type=positive_int, default=10,
                   help="compare the step's loss with the best every N steps (default: 10)")
    p.add_argument("--patience", type=nonneg_int, default=3,
                   help="stop after this many checks without improvement; 0: never stop early (default: 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help=".npz of the constants to write")
    p.set_defaults(func=cmd_optimal_ablation)
