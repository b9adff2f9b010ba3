"""The vocabularies of jaxinterp's options, in one place and without jax.

The library checks its arguments against these tuples, the command line offers them as
``choices=`` and the sweep file's schema validates against them, so a name added here is
added everywhere at once. This module imports nothing (the CLI reads it before it knows
whether it will need jax at all).
"""

from __future__ import annotations

from typing import Sequence

#: attribution methods, with the reference's (hannamw/EAP-IG) ``method=`` names
METHODS = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted", "exact")
#: edge scores without a metric: Ferrando & Voita's information-flow routes (one clean
#: forward pass; :mod:`jaxinterp.routes`), offered by ``attribute`` beside :data:`METHODS`
ROUTE_METHODS = ("information-flow-routes",)
#: every ``attribute(method=...)``
EDGE_METHODS = METHODS + ROUTE_METHODS
#: what a Gemma 2 attention-head node is (``ModelConfig.gemma2_heads``): its share of the
#: layer's normalised output, or (MIB's) its raw output renormalised per receiving input
GEMMA2_HEADS = ("shared", "per-input")
#: why neuron-level circuits on Gemma 2 are offered with per-input heads only
#: (:func:`jaxinterp.node_attribution.evaluate_neuron_masks`)
NEURONS_NEED_PER_INPUT = ("MIB's head definition, raw head outputs; a shared head's output is its share of the "
                          "normalised attention output, whose dimensions cannot be kept or patched one by one")
#: the methods that average over integrated-gradient steps (``ig_steps``)
IG_METHODS = ("EAP-IG-inputs", "EAP-IG-activations")
#: task metrics (:mod:`jaxinterp.metrics`), read at each prompt's last real token
METRICS = ("logit_diff", "prob_diff", "kl_div")
#: what an edge outside a circuit carries (:mod:`jaxinterp.interventions`; ``optimal``:
#: learned constants, :mod:`jaxinterp.optimal_ablation`)
INTERVENTIONS = ("patching", "zero", "mean", "mean-positional", "optimal")
#: faithfulness losses of learned circuits (:mod:`jaxinterp.edge_pruning`): every task
#: metric (KL from the full model, or a metric's squared difference from it)
OBJECTIVES = METRICS


def check_name(kind: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else ValueError ``unknown {kind} ...``
    naming the choices."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose from {tuple(choices)}")
    return value
