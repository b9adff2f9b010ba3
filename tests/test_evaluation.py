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
