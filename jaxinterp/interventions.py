"""The circuit-run substrate: what an edge outside a circuit carries, and the machinery
every method uses to run circuits over a data set with it.

A *circuit run* reads prompt pairs (:class:`jaxinterp.data.Pairs`), a task metric bound
to the data (:class:`TaskMetric`) and an ``intervention``: what an edge ``u->v`` outside
the circuit carries in place of ``u``'s own output,

* ``patching``: ``u``'s output on the corrupted prompt (run with the clean prompt's
  attention mask, as the reference does);
* ``zero``: zero;
* ``mean`` / ``mean-positional``: ``u``'s mean output over the clean prompts of
  ``intervention_data`` (default: the data itself), over all real tokens or per position
  (:func:`mean_activations`);
* ``optimal``: ``u``'s optimal-ablation constant, learned by
  :func:`jaxinterp.optimal_ablation.learn_optimal_ablation` and given as
  ``intervention_data`` (its ``.npz`` file, or the values): the ``mean`` data path with
  learned values in place of the means.

Attribution, evaluation, ACDC and edge pruning are peers on top of this module; each
public function of theirs normalises its arguments once with :func:`prepare_run` and
hands the resulting :class:`Run` to its inner functions. The pieces they share:

* :func:`corrupted_outputs`: the clean logits and the clean / ablated node outputs of a batch;
* :func:`metric_values` and :func:`circuit_values`: the kernel "``1 - mask`` -> graph
  forward -> metric" (:func:`weighted_sum` sums it with the examples' weights);
* :func:`batch_circuit_metrics`: that kernel over many circuits at once (``lax.map``);
* :meth:`Run.total` / :meth:`Run.mean`: the one host loop over (sharded) batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import metrics as metrics_lib
from .compiler import jit
from .config import ModelConfig
from .data import Pairs, load_pairs, year_token_ids
from .graph import GraphSpec
from .models import EdgeIntervention, forward
from .names import INTERVENTIONS, METRICS, check_name
from .sharding import batches as shard_batches, replicate, shard_model, to_host

MEAN_INTERVENTIONS = ("mean", "mean-positional")
#: the interventions that patch in per-node values (``means``, :func:`intervention_means`)
CONSTANT_INTERVENTIONS = MEAN_INTERVENTIONS + ("optimal",)


# --- the metric, bound to its data ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskMetric:
    """A task metric with what it reads besides the logits bound in: the greater-than
    year token ids (``year_ids``, 100 ids of ``"00".."99"``) for integer labels, else None.

    Hashable, so jitted functions take it as a static argument (the ids become
    constants of the program instead of an argument every signature has to thread)."""

    name: str
    year_ids: Optional[tuple[int, ...]] = None

    @property
    def sign(self) -> float:
        """``ATTRIBUTION_SIGN``: +1 for a loss (KL), -1 for a task score (differences)."""
        return metrics_lib.ATTRIBUTION_SIGN[self.name]

    def __call__(self, logits: jax.Array, clean_logits: jax.Array, batch: dict) -> jax.Array:
        """``[batch]`` per example, on logits taken at :func:`logit_positions` only
        (``logits, clean_logits [batch, 1, vocab]``, see ``forward(..., logit_positions=)``)."""
        year_ids = None if self.year_ids is None else np.asarray(self.year_ids, np.int32)
        fn = metrics_lib.get_metric(self.name, year_ids)
        return fn(logits, clean_logits, jnp.ones_like(batch["lengths"]), batch["labels"])


def logit_positions(batch: dict) -> jax.Array:
    """``[batch]``: the position each example's metric reads (its last real token)."""
    return batch["lengths"] - 1


def load_data(model, data: Union[str, Pairs]) -> Pairs:
    """``data`` as :class:`Pairs`: a pairs CSV is read with ``model``'s tokenizer."""
    if isinstance(data, Pairs):
        return data
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: the model directory has no tokenizer to read {data} with")
    return load_pairs(data, model.tokenizer, model.cfg.vocab_size, model.cfg.n_ctx)


def bind_metric(model, pairs: Pairs, metric: str) -> TaskMetric:
    """The metric ``metric`` for ``pairs``' labels (integer labels: the year tokens of
    ``model``'s tokenizer)."""
    check_name("metric", metric, METRICS)
    if pairs.labels.ndim != 1:
        return TaskMetric(metric)
    if metric == "logit_diff":
        raise ValueError("logit_diff needs correct_idx/incorrect_idx labels; this data has integer "
                         "'label' values (greater-than): use --metric prob_diff")
    if model.tokenizer is None:
        raise ValueError("integer labels need the model's tokenizer to find the year tokens")
    return TaskMetric(metric, tuple(int(i) for i in year_token_ids(model.tokenizer)))


def prepare_data(model, data: Union[str, Pairs], metric: str) -> tuple[Pairs, TaskMetric]:
    """Tokenise ``data`` (a CSV path or :class:`Pairs`) and bind the metric to it."""
    pairs = load_data(model, data)
    return pairs, bind_metric(model, pairs, metric)


# --- ablation values ------------------------------------------------------------------------
def check_intervention(intervention: str, intervention_data=None, have_means: bool = False) -> None:
    """Refuse an unknown ``intervention``, intervention data it would not read, and
    ``optimal`` without its constants (``intervention_data``, or node values already
    given: ``have_means``)."""
    check_name("intervention", intervention, INTERVENTIONS)
    if intervention_data is not None and intervention not in CONSTANT_INTERVENTIONS:
        raise ValueError(f"intervention_data is used by the mean interventions only (and by optimal, as its "
                         f"constants), not {intervention!r}")
    if intervention == "optimal" and intervention_data is None and not have_means:
        from .optimal_ablation import ablation_values

        ablation_values(None, None)  # raises the error that says what to give


def corrupted_outputs(params, cfg: ModelConfig, batch: dict, intervention: str, means=None):
    """``(clean_logits [batch, 1, vocab], clean_outs, corrupted_outs)``; outputs
    ``[src, batch, pos, d_model]``, the corrupted ones what ``intervention`` patches in.
    ``means``: ``[src, pos or 1, d_model]`` node values (:func:`intervention_means`) for the
    ``mean`` and ``optimal`` interventions. Under ``jit`` whatever a caller ignores is not computed."""
    mask, at = batch["attention_mask"], logit_positions(batch)
    clean_logits, clean_outs = forward(params, cfg, batch["clean"], mask, return_node_outputs=True, logit_positions=at)
    check_intervention(intervention, have_means=means is not None)
    if intervention == "patching":
        # the reference runs the corrupted prompt with the clean prompt's attention mask
        _, corr_outs = forward(params, cfg, batch["corrupted"], mask, return_node_outputs=True, logit_positions=at)
    elif intervention == "zero":
        corr_outs = jnp.zeros_like(clean_outs)
    else:
        if means is None:
            raise ValueError(f"intervention {intervention!r} needs node values (see intervention_means)")
        corr_outs = jnp.broadcast_to(means[:, None].astype(clean_outs.dtype), clean_outs.shape)
    return clean_logits, clean_outs, corr_outs


@functools.partial(jit, static_argnames=("cfg",))
def _batch_node_sums(params, batch, *, cfg: ModelConfig):
    """``(sums [src, pos, d_model], counts [pos])`` of the node outputs on the batch's clean
    prompts over its real (weighted) examples and tokens."""
    _, outs = forward(params, cfg, batch["clean"], batch["attention_mask"], return_node_outputs=True,
                      logit_positions=logit_positions(batch))
    real = batch["attention_mask"].astype(jnp.float32) * batch["weight"][:, None]
    return jnp.einsum("sbpd,bp->spd", outs.astype(jnp.float32), real), real.sum(0)


def mean_activations(model, data: Union[str, Pairs], per_position: bool = False, batch_size: int = 16,
                     mesh=None, quiet: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every node's mean output over the *clean* prompts of ``data`` (a pairs CSV or
    :class:`Pairs`), real tokens only: ``(means, counts)`` with ``means [src, d_model]``
    averaged over all real tokens, or ``[src, pos, d_model]`` averaged per position over
    the prompts that reach it (zero where none does), and ``counts [pos]`` the number of
    prompts that reach each position.

    The reference (hannamw/EAP-IG ``compute_mean_activations``, commit 795f560) differs
    on purpose: its non-positional mean takes only each prompt's *last* token divided by
    the prompt's length and then averages over *all nodes* (one ``[d_model]`` vector for
    every node), and its positional mean includes padding tokens. Those are not means of
    a node's activation; the means here are.
    """
    pairs = load_data(model, data)
    model = shard_model(model, mesh)
    sums, counts = sum_over_batches(lambda b: _batch_node_sums(model.params, b, cfg=model.cfg), pairs, batch_size,
                                    mesh, "means", quiet)
    if per_position:
        return (sums / np.maximum(counts, 1)[None, :, None]).astype(np.float32), counts
    return (sums.sum(1) / counts.sum()).astype(np.float32), counts


def intervention_means(model, pairs: Pairs, intervention: str, intervention_data: Union[str, Pairs, None] = None,
                       batch_size: int = 16, mesh=None) -> Optional[np.ndarray]:
    """What the ``mean`` and ``optimal`` interventions patch in for ``pairs``: ``[src, 1,
    d_model]`` (``mean``) or ``[src, pairs.n_pos, d_model]`` (``mean-positional``), from
    the clean prompts of ``intervention_data`` (default: ``pairs`` itself); for
    ``optimal`` the learned constants ``[src, 1, d_model]`` that ``intervention_data``
    holds (:func:`jaxinterp.optimal_ablation.ablation_values`); None for the others."""
    check_intervention(intervention, intervention_data)
    if intervention == "optimal":
        from .optimal_ablation import ablation_values

        return ablation_values(model, intervention_data)
    if intervention not in MEAN_INTERVENTIONS:
        return None
    source = pairs if intervention_data is None else intervention_data
    if intervention == "mean":
        return mean_activations(model, source, False, batch_size, mesh)[0][:, None]
    means, counts = mean_activations(model, source, True, batch_size, mesh)
    covered = int(np.count_nonzero(counts))
    if pairs.lengths.max() > covered:
        raise ValueError(f"mean-positional: the intervention data's prompts are at most {covered} tokens long "
                         f"(BOS included) but the data has prompts of {int(pairs.lengths.max())}; give "
                         f"intervention data whose prompts reach every position")
    # positions past every prompt's end are padding, which cannot influence real tokens
    # (causal attention): any value does there
    means = means[:, :pairs.n_pos]
    return np.pad(means, ((0, 0), (0, pairs.n_pos - means.shape[1]), (0, 0)))


# --- the circuit-metric kernel --------------------------------------------------------------
def metric_values(params, cfg: ModelConfig, batch: dict, metric: TaskMetric, clean_logits, iv=None, tokens=None,
                  input_embeddings=None, remat: bool = False, resume=None) -> jax.Array:
    """``[batch]``: ``metric`` of the graph forward under the edge intervention ``iv`` on
    ``tokens`` (default: the clean prompts), read at :func:`logit_positions`; ``resume``
    as :func:`jaxinterp.models.forward`'s."""
    tokens = batch["clean"] if tokens is None else tokens
    logits = forward(params, cfg, tokens, batch["attention_mask"], iv, input_embeddings,
                     logit_positions=logit_positions(batch), remat=remat, resume=resume)
    return metric(logits, clean_logits, batch)


def weighted_sum(values: jax.Array, batch: dict) -> jax.Array:
    """Sum of per-example ``values [batch]`` weighted by ``batch["weight"]`` (0 for padding rows)."""
    return (values * batch["weight"]).sum()


def circuit_values(params, cfg: ModelConfig, batch: dict, in_circuit, corr_outs, clean_logits,
                   metric: TaskMetric) -> jax.Array:
    """``[batch]``: ``metric`` of the circuit ``in_circuit [(pos,) src, dst]`` (bool, or a
    soft mask in [0, 1]): every edge carries ``1 - in_circuit`` of ``corr_outs``
    (:func:`corrupted_outputs`) in place of its source's own output."""
    real = jnp.asarray(GraphSpec.for_coefficients(cfg, in_circuit.shape[-1]).real_edge_mask, jnp.float32)
    coef = (1.0 - in_circuit.astype(jnp.float32)) * real
    return metric_values(params, cfg, batch, metric, clean_logits, EdgeIntervention(coef, corr_outs))


@functools.partial(jit, persist=True, static_argnames=("cfg", "metric", "intervention", "chunk"))
def batch_circuit_metrics(params, batch, in_circuit, means=None, *, cfg: ModelConfig, metric: TaskMetric,
                          intervention: str, chunk: int = 8) -> jax.Array:
    """Weighted metric sums ``[circuit]`` over the batch for each circuit of ``in_circuit
    [circuit, (pos,) src, dst]``, ``chunk`` circuits per vectorised forward."""
    clean_logits, _, corr_outs = corrupted_outputs(params, cfg, batch, intervention, means)

    def one(mask):
        return weighted_sum(circuit_values(params, cfg, batch, mask, corr_outs, clean_logits, metric), batch)

    return jax.lax.map(one, in_circuit, batch_size=chunk)


# --- the host loop and the preamble ---------------------------------------------------------
def sum_over_batches(fn: Callable[[dict], Any], pairs: Pairs, batch_size: int, mesh=None, desc: Optional[str] = None,
                     quiet: bool = True):
    """``fn(batch)`` (a jitted per-batch sum: an array or a tuple of arrays) summed over
    ``pairs``' batches of ``batch_size`` (sharded over ``mesh``'s ``data`` axis), on the
    host in float64."""
    total = None
    for batch in tqdm(shard_batches(pairs, batch_size, mesh), total=pairs.n_batches(batch_size), desc=desc,
                      disable=quiet):
        value = jax.tree.map(lambda x: to_host(x).astype(np.float64), fn(batch))
        total = value if total is None else jax.tree.map(np.add, total, value)
    if total is None:
        raise ValueError("the data has no examples")
    return total


@dataclasses.dataclass
class Run:
    """Everything a circuit run reads, normalised once (:func:`prepare_run`): ``model``
    (sharded over ``mesh``), ``pairs``, the bound ``metric``, the ``intervention`` and the
    batch size. :attr:`means` are computed on first use, after the caller's own checks."""

    model: Any
    pairs: Pairs
    metric: TaskMetric
    intervention: str
    batch_size: int
    mesh: Any = None
    intervention_data: Union[str, Pairs, None] = None
    given_means: Optional[np.ndarray] = None

    @functools.cached_property
    def means(self):
        """The node values of the ``mean`` and ``optimal`` interventions
        (:func:`intervention_means`), replicated over the mesh; None for the others."""
        means = self.given_means
        if means is None:
            means = intervention_means(self.model, self.pairs, self.intervention, self.intervention_data,
                                       self.batch_size, self.mesh)
        return replicate(means, self.mesh)

    def total(self, fn: Callable[[dict], Any], desc: Optional[str] = None, quiet: bool = True):
        """``fn(batch)`` summed over the run's batches (:func:`sum_over_batches`)."""
        return sum_over_batches(fn, self.pairs, self.batch_size, self.mesh, desc, quiet)

    def mean(self, fn: Callable[[dict], Any], desc: Optional[str] = None, quiet: bool = True):
        """:meth:`total` divided by the number of examples."""
        return jax.tree.map(lambda t: t / len(self.pairs), self.total(fn, desc, quiet))

    @functools.cached_property
    def baselines(self) -> np.ndarray:
        """``[clean, corrupted]``: the unmodified model's mean metric on each prompt set
        (:func:`batch_baselines`)."""
        return self.mean(lambda b: batch_baselines(self.model.params, b, cfg=self.model.cfg, metric=self.metric))

    def circuit_metrics(self, masks: np.ndarray, chunk: int = 8, quiet: bool = True) -> np.ndarray:
        """``[circuit]``: the mean metric over the examples of each circuit ``masks
        [circuit, (pos,) src, dst]`` (bool; entries outside the graph's real edges are
        ignored). Each distinct circuit runs once, and without a patched forward where
        its value is a plain run's: the full graph is the clean run (m(N)) and, under
        ``patching``, the empty circuit is the corrupted run (:attr:`baselines`; MIB's
        ``evaluate_baseline``). The graph forward gives those two up to float rounding
        only, at the cost of a circuit each."""
        means = self.means  # the intervention's values, checked (e.g. a file's shape) even when no circuit runs
        real = self.model.graph_spec.real_edge_mask
        flat = (np.asarray(masks, bool) & real).reshape(len(masks), -1)
        _, first, inverse = np.unique(np.packbits(flat, axis=1), axis=0, return_index=True, return_inverse=True)
        sizes = flat[first].sum(1)  # per distinct circuit
        plain = np.full(len(first), -1)  # the baseline that gives a distinct circuit's value; -1: none
        plain[sizes == flat.shape[1] // real.size * int(real.sum())] = 0  # the full graph: the clean run
        if self.intervention == "patching":
            plain[sizes == 0] = 1  # the empty circuit: the corrupted run
        values = np.empty(len(first))
        todo = np.flatnonzero(plain < 0)
        if len(todo):
            kw = dict(cfg=self.model.cfg, metric=self.metric, intervention=self.intervention, chunk=chunk)
            run = replicate(flat[first[todo]].reshape((len(todo),) + np.shape(masks)[1:]), self.mesh)
            values[todo] = self.mean(lambda b: batch_circuit_metrics(self.model.params, b, run, means, **kw),
                                     "evaluate", quiet)
        known = plain >= 0
        if known.any():
            values[known] = self.baselines[plain[known]]
        return values[inverse.reshape(-1)]


@functools.partial(jit, persist=True, static_argnames=("cfg", "metric"))
def batch_baselines(params, batch, *, cfg: ModelConfig, metric: TaskMetric):
    """Weighted metric sums ``[2]`` of the unmodified model on the clean and on the
    corrupted prompts, both read against the clean run's logits (the corrupted prompts
    with the clean prompts' attention mask, as :func:`corrupted_outputs` runs them)."""
    clean = forward(params, cfg, batch["clean"], batch["attention_mask"], logit_positions=logit_positions(batch))
    corrupted = metric_values(params, cfg, batch, metric, clean, tokens=batch["corrupted"])
    return jnp.stack([weighted_sum(metric(clean, clean, batch), batch), weighted_sum(corrupted, batch)])


def prepare_run(model, data: Union[str, Pairs], metric: str, intervention: str = "patching",
                intervention_data: Union[str, Pairs, None] = None, batch_size: int = 16, mesh=None,
                means: Optional[np.ndarray] = None) -> Run:
    """The preamble of every public method: refuse an unknown ``intervention``, read
    ``data`` and bind ``metric`` to it, place the model on ``mesh``. ``means``: node values
    already computed for these pairs (:func:`intervention_means`), to reuse."""
    check_intervention(intervention, intervention_data, have_means=means is not None)
    if means is not None and intervention not in CONSTANT_INTERVENTIONS:
        raise ValueError(f"node means are used by the mean and optimal interventions only, not {intervention!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs, task = prepare_data(model, data, metric)
    return Run(shard_model(model, mesh), pairs, task, intervention, batch_size, mesh, intervention_data, means)
