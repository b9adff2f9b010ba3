"""Differentiable task metrics, per example.

Every metric has the signature ``metric(logits, clean_logits, lengths, labels) -> [batch]``
with ``logits, clean_logits [batch, pos, vocab]``, ``lengths [batch]`` (the prediction is
read at ``lengths - 1``) and ``labels`` either ``[batch, 2]`` (correct, incorrect token
ids) or ``[batch]`` (greater-than: the two-digit start year).

Attribution differentiates ``ATTRIBUTION_SIGN[name] * metric`` - the reference's
``loss=True`` convention (logit and probability differences are negated, KL is not) -
so scores carry the reference's sign.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .names import METRICS, check_name

Metric = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def last_position(logits: jax.Array, lengths: jax.Array) -> jax.Array:
    """``[batch, pos, vocab]`` -> ``[batch, vocab]`` at each example's last real token."""
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def logit_diff(logits, clean_logits, lengths, labels):
    """Logit of the correct minus the incorrect token."""
    last = last_position(logits, lengths)
    pair = jnp.take_along_axis(last, labels, axis=-1)
    return pair[:, 0] - pair[:, 1]


def make_prob_diff(year_ids: Optional[np.ndarray] = None) -> Metric:
    """Probability difference.

    Pair labels: p(correct) - p(incorrect). Integer labels (greater-than, needs
    ``year_ids``, the token ids of "00".."99"): p(year > label) - p(year <= label).
    """

    def prob_diff(logits, clean_logits, lengths, labels):
        probs = jax.nn.softmax(last_position(logits, lengths), axis=-1)
        if labels.ndim == 2:
            pair = jnp.take_along_axis(probs, labels, axis=-1)
            return pair[:, 0] - pair[:, 1]
        if year_ids is None:
            raise ValueError("prob_diff with integer labels needs the year token ids")
        years = probs[:, jnp.asarray(year_ids)]
        later = jnp.arange(100)[None, :] > labels[:, None]
        return jnp.where(later, years, -years).sum(-1)

    return prob_diff


def kl_div(logits, clean_logits, lengths, labels):
    """KL(clean || this run) of the next-token distributions at the last real position.

    (The reference's notebook version averages over the vocabulary instead of summing;
    the two differ by the constant factor ``vocab``.)
    """
    logp = jax.nn.log_softmax(last_position(logits, lengths), axis=-1)
    clean_logp = jax.nn.log_softmax(last_position(clean_logits, lengths), axis=-1)
    return (jnp.exp(clean_logp) * (clean_logp - logp)).sum(-1)


METRIC_NAMES = METRICS
ATTRIBUTION_SIGN = {"logit_diff": -1.0, "prob_diff": -1.0, "kl_div": 1.0}


def get_metric(name: str, year_ids: Optional[np.ndarray] = None) -> Metric:
    if name == "logit_diff":
        return logit_diff
    if name == "prob_diff":
        return make_prob_diff(year_ids)
    if name == "kl_div":
        return kl_div
    check_name("metric", name, METRICS)
    raise AssertionError(f"metric {name!r} is in names.METRICS but has no implementation here")
