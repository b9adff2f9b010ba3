"""ACDC written the straightforward way: a Python loop with one circuit evaluation
(:func:`jaxinterp.evaluation.evaluate_masks`) per edge, as the original
``TLACDCExperiment.step`` does it. The reference the compiled :func:`jaxinterp.acdc.acdc`
is checked (tests) and timed (``benchmarks/bench_acdc.py``) against; it shares no code
with it beyond the circuit evaluation. Each circuit is measured pruned
(:meth:`jaxinterp.graph.Graph.prune`), as evaluation measures it."""

import numpy as np

from jaxinterp.evaluation import evaluate_masks
from jaxinterp.graph import Graph
from jaxinterp.interventions import intervention_means
from jaxinterp.metrics import ATTRIBUTION_SIGN


def loop_order(spec):
    """The logits, then each layer from the last: its MLP input, its heads' q, k, v inputs."""
    order = [spec.logits_index]
    for layer in range(spec.n_layers - 1, -1, -1):
        order.append(spec.mlp_in_index(layer))
        first = spec.qkv_index(layer, "q")  # q, k, v inputs in index order (either grouped-query view)
        order += list(range(first, first + spec.n_attn_inputs))
    return order


def prune(spec, mask):
    g = Graph(spec)
    g.in_graph[:] = mask
    g.nodes_in_graph[:] = True
    return g.prune().in_graph


def loop_acdc(model, pairs, threshold, metric="kl_div", absolute=False, batch_size=32, intervention="patching",
              with_loss=False):
    """``(in_graph [src, dst] bool, scores [src, dst], n_evaluations)`` before pruning,
    and with ``with_loss`` the ``L`` of the circuit accepted last."""
    spec = model.graph_spec
    real = spec.real_edge_mask
    in_graph = real.copy()
    scores = np.zeros(real.shape)
    n_evaluations = 0
    means = intervention_means(model, pairs, intervention, batch_size=batch_size)

    def loss(mask):
        nonlocal n_evaluations
        n_evaluations += 1
        values = evaluate_masks(model, prune(spec, mask)[None], pairs, metric, intervention, batch_size, means=means)
        return ATTRIBUTION_SIGN[metric] * values[0]

    for dst in loop_order(spec):
        owners = np.nonzero(spec.forward_to_backward[:, dst])[0]
        if len(owners) and not in_graph[owners].any():  # a grouped k/v input has several owners
            in_graph[:, dst] = False  # the node reaches nothing: drop its inputs untested
            continue
        current = loss(in_graph)
        for src in range(spec.n_forward - 1, -1, -1):
            if not real[src, dst]:
                continue
            trial = in_graph.copy()
            trial[src, dst] = False
            value = loss(trial)
            result = value - current
            scores[src, dst] = result
            if (abs(result) if absolute else result) < threshold:
                in_graph, current = trial, value
    return (in_graph, scores, n_evaluations, current) if with_loss else (in_graph, scores, n_evaluations)
