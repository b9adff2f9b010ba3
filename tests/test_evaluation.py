"""Circuit evaluation and faithfulness curves."""

import numpy as np
import pytest

from jaxinterp.attribution import attribute, prepare_data
from jaxinterp.evaluation import (evaluate_baseline, evaluate_graph, evaluate_masks, faithfulness_curve,
                                  normalized_faithfulness)
from jaxinterp.graph import Graph


@pytest.fixture(scope="module")
def pairs(model, ioi_csv):
    return prepare_data(model, ioi_csv, "logit_diff")[0]


@pytest.fixture(scope="module")
def scored(model, pairs):
    return attribute(model, pairs, method="EAP", batch_size=8, quiet=True)


def test_full_graph_is_the_model_and_empty_graph_the_corrupted_run(model, pairs, scored):
    clean = evaluate_baseline(model, pairs, batch_size=8)
    corrupted = evaluate_baseline(model, pairs, batch_size=8, run_corrupted=True)
    assert abs(clean - corrupted) > 1e-4  # the task must distinguish them for the check to mean anything
    g = Graph(scored.spec, scored.scores)
    g.reset(empty=False)
    full = evaluate_graph(model, g, pairs, batch_size=8)
    g.reset(empty=True)
    empty = evaluate_graph(model, g, pairs, batch_size=8)
    np.testing.assert_allclose(normalized_faithfulness(full, clean, corrupted), 1.0, atol=1e-3)
    np.testing.assert_allclose(normalized_faithfulness(empty, clean, corrupted), 0.0, atol=1e-3)


def test_curve_agrees_with_evaluating_each_size(model, pairs, scored):
    sizes = [1, 5, 20, 60, scored.spec.n_edges]
    curve = faithfulness_curve(model, scored, pairs, sizes, batch_size=8, chunk=2)
    for n, value, kept in zip(sizes, curve.metric, curve.n_edges):
        g = Graph(scored.spec, scored.scores)
        g.apply_topn(n)
        assert g.count_included_edges() == kept
        np.testing.assert_allclose(value, evaluate_graph(model, g, pairs, batch_size=8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curve.faithfulness[-1], 1.0, atol=1e-3)


def test_circuit_evaluation_equals_exact_single_edge_removal(model, pairs):
    """All edges but one: evaluation must equal exact patching of that edge (reference's 'exact')."""
    exact = attribute(model, pairs, method="exact", batch_size=8, exact_chunk=32, quiet=True)
    clean = evaluate_baseline(model, pairs, batch_size=8)
    spec = exact.spec
    masks = np.repeat(spec.real_edge_mask[None], 4, 0)
    edges = [spec.edge_index(n) for n in ["input->a1.h2<v>", "a0.h0->m0", "m0->a1.h3<q>", "a1.h1->logits"]]
    for i, (s, d) in enumerate(edges):
        masks[i, s, d] = False
    values = evaluate_masks(model, masks, pairs, batch_size=8)
    for (s, d), v in zip(edges, values):
        np.testing.assert_allclose(-(v - clean), exact.scores[s, d], rtol=1e-3, atol=1e-6)


def test_zero_intervention_empty_graph_differs_from_patching(model, pairs):
    spec = model.graph_spec
    empty = np.zeros((1, spec.n_forward, spec.n_backward), bool)
    zero = evaluate_masks(model, empty, pairs, intervention="zero", batch_size=8)[0]
    patched = evaluate_masks(model, empty, pairs, intervention="patching", batch_size=8)[0]
    np.testing.assert_allclose(patched, evaluate_baseline(model, pairs, batch_size=8, run_corrupted=True), rtol=1e-4)
    assert abs(zero - patched) > 1e-6


def _handbuilt_circuit_metric(model, pairs, in_graph, ablated):
    """The mean logit difference of the circuit ``in_graph [src, dst]`` on the hand-built
    forward, edges outside it carrying ``ablated[node]`` (broadcast to ``[batch, pos,
    d_model]``): each removed edge ``u->v`` adds ``ablated_u - out_u`` to input ``v``, with
    ``out_u`` from the same run, found by iterating once per node level (a layer's heads,
    its MLP) and once more for the logits."""
    import handbuilt
    import jax.numpy as jnp
    from jaxinterp.metrics import logit_diff

    spec = model.graph_spec
    tokens, mask = jnp.asarray(pairs.clean), jnp.asarray(pairs.attention_mask)
    removed = spec.real_edge_mask & ~in_graph
    extra = {}
    for _ in range(2 * spec.n_layers + 2):
        logits, outs = handbuilt.forward(model.params, model.cfg, tokens, mask, extra=extra)
        extra = {}
        for s, d in zip(*np.nonzero(removed)):
            src, dst = spec.forward_names[s], spec.backward_names[d]
            extra[dst] = extra.get(dst, 0.0) + (ablated[src] - outs[src])
    return float(logit_diff(logits, logits, jnp.asarray(pairs.lengths), jnp.asarray(pairs.labels)).mean())


@pytest.mark.parametrize("intervention", ["mean", "mean-positional"])
def test_mean_ablated_circuit_equals_the_handbuilt_circuit(model, pairs, intervention):
    from jaxinterp.attribution import mean_activations

    spec = model.graph_spec
    rng = np.random.default_rng(0)
    in_graph = spec.real_edge_mask & (rng.random(spec.real_edge_mask.shape) < 0.5)
    means, _ = mean_activations(model, pairs, per_position=intervention == "mean-positional")
    ablated = {n: means[i] if means.ndim == 3 else means[i][None] for i, n in enumerate(spec.forward_names)}
    got = evaluate_masks(model, np.stack([in_graph, spec.real_edge_mask & False]), pairs,
                         intervention=intervention, batch_size=5)
    np.testing.assert_allclose(got[0], _handbuilt_circuit_metric(model, pairs, in_graph, ablated), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(got[1], _handbuilt_circuit_metric(model, pairs, ~spec.real_edge_mask, ablated),
                               rtol=1e-4, atol=1e-5)


def test_mean_intervention_faithfulness_runs_from_empty_to_full(model, pairs, scored, tmp_path):
    curve = faithfulness_curve(model, scored, pairs, [1, 20, scored.spec.n_edges], intervention="mean",
                               batch_size=8)
    assert curve.corrupted == pytest.approx(evaluate_masks(
        model, np.zeros((1,) + scored.spec.real_edge_mask.shape, bool), pairs, intervention="mean",
        batch_size=8)[0], rel=1e-4, abs=1e-6)
    assert abs(curve.clean - curve.corrupted) > 1e-4
    np.testing.assert_allclose(curve.faithfulness[-1], 1.0, atol=1e-3)
    # another data set's means give another empty circuit
    other = pairs.head(3)
    other_curve = faithfulness_curve(model, scored, pairs, [1], intervention="mean", intervention_data=other,
                                     batch_size=8)
    assert abs(other_curve.corrupted - curve.corrupted) > 1e-6
