"""Position-aware edges: per-(position, edge) scores and circuits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handbuilt
from devtools.testing import write_ioi_csv
from jaxinterp.attribution import attribute
from jaxinterp.interventions import prepare_data
from jaxinterp.evaluation import evaluate_masks, faithfulness_curve
from jaxinterp.metrics import logit_diff
from jaxinterp.positional import PositionalGraph, PositionError

GRADIENT_METHODS = ["EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted"]


@pytest.fixture(scope="module")
def pairs(model, tmp_path_factory):
    """IOI pairs of one template: every prompt has the same token length."""
    csv = write_ioi_csv(tmp_path_factory.mktemp("pos") / "ioi.csv", model.tokenizer, n=10, seed=1)
    p = prepare_data(model, csv, "logit_diff")[0]
    assert len(set(p.lengths)) == 1
    return p


def _metric_mean(logits, pairs):
    return logit_diff(logits, logits, jnp.asarray(pairs.lengths), jnp.asarray(pairs.labels)).mean()


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_position_scores_sum_to_the_position_free_scores(model, pairs, method):
    free = attribute(model, pairs, method=method, ig_steps=2, batch_size=4, quiet=True)
    per_pos = attribute(model, pairs, method=method, ig_steps=2, batch_size=4, quiet=True, positional=True)
    assert isinstance(per_pos, PositionalGraph) and per_pos.scores.shape[0] == pairs.n_pos
    scale = np.abs(free.scores).max()
    np.testing.assert_allclose(per_pos.scores.sum(0), free.scores, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(per_pos.summed().scores, free.scores, rtol=1e-4, atol=1e-5 * scale)
    # the scores really differ between positions (the sum is not spread evenly)
    real = model.graph_spec.real_edge_mask
    assert np.abs(per_pos.scores[:, real]).max(0).max() > 2 * np.abs(per_pos.scores[:, real]).mean()


def test_eap_position_score_is_the_derivative_along_that_position_only(model, pairs):
    graph = attribute(model, pairs, method="EAP", batch_size=4, quiet=True, positional=True)
    mask = jnp.asarray(pairs.attention_mask)
    _, clean = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask)
    _, corr = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.corrupted), mask)
    spec = model.graph_spec
    last = pairs.n_pos - 1
    got, wants = [], []
    for name, p in [("input->a0.h1<k>", 4), ("a0.h2->a1.h0<v>", 2), ("m0->logits", last), ("input->m1", last)]:
        src, dst = name.split("->")
        s, d = spec.edge_index(name)
        at_p = jnp.zeros(pairs.n_pos).at[p].set(1.0)[None, :, None]

        def f(t):
            logits, _ = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask,
                                          extra={dst: t * (corr[src] - clean[src]) * at_p})
            return _metric_mean(logits, pairs)

        wants.append(-jax.jvp(f, (0.0,), (1.0,))[1])
        got.append(graph.scores[p, s, d])
    # every score within 1e-4 of the largest |score| compared
    np.testing.assert_allclose(got, wants, rtol=0, atol=1e-4 * np.abs(wants).max())


def test_a_circuit_ablates_each_edge_at_the_positions_outside_it_only(model, pairs):
    spec = model.graph_spec
    mask = jnp.asarray(pairs.attention_mask)
    _, clean = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask)
    _, corr = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.corrupted), mask)
    full = np.broadcast_to(spec.real_edge_mask, (pairs.n_pos,) + spec.real_edge_mask.shape)
    cases = [("input->a1.h2<v>", 3), ("a0.h0->m0", pairs.n_pos - 1), ("input->logits", pairs.n_pos - 1)]
    masks = np.repeat(full[None], len(cases) + 1, 0).copy()
    for i, (name, p) in enumerate(cases):
        s, d = spec.edge_index(name)
        masks[i, p, s, d] = False
    values = evaluate_masks(model, masks, pairs, batch_size=4)
    for i, (name, p) in enumerate(cases):
        src, dst = name.split("->")
        at_p = jnp.zeros(pairs.n_pos).at[p].set(1.0)[None, :, None]
        logits, _ = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask,
                                      extra={dst: (corr[src] - clean[src]) * at_p})
        np.testing.assert_allclose(values[i], _metric_mean(logits, pairs), rtol=1e-4, atol=1e-6, err_msg=name)
    # a circuit that is the same at every position is the position-free circuit
    same = evaluate_masks(model, masks[:1, 0], pairs, batch_size=4)[0]
    np.testing.assert_allclose(evaluate_masks(model, np.repeat(masks[:1, :1], pairs.n_pos, 1), pairs,
                                              batch_size=4)[0], same, rtol=1e-5)


def test_positional_curve_runs_from_the_corrupted_run_to_the_model(model, pairs):
    graph = attribute(model, pairs, method="EAP-IG-inputs", ig_steps=2, batch_size=4, quiet=True, positional=True)
    curve = faithfulness_curve(model, graph, pairs, [0, 10, 100, graph.n_edges], batch_size=4)
    np.testing.assert_allclose(curve.faithfulness[[0, -1]], [0.0, 1.0], atol=1e-3)
    assert list(curve.n_edges) == [0, 10, 100, graph.n_edges]


def test_positional_graph_file_round_trip(model, pairs, tmp_path):
    graph = attribute(model, pairs, method="EAP", batch_size=4, quiet=True, positional=True)
    graph.apply_topn(25)
    assert graph.count_included_edges() == 25
    path = str(tmp_path / "pos.json")
    graph.to_json(path)
    back = PositionalGraph.from_json(path, spec=model.graph_spec)
    np.testing.assert_array_equal(back.scores, graph.scores)
    np.testing.assert_array_equal(back.in_graph, graph.in_graph)
    assert back.positions == graph.positions and graph.positions[0].startswith("0:")
    with pytest.raises(ValueError, match="not a position-aware graph"):
        attribute(model, pairs, method="EAP", batch_size=4, quiet=True).to_json(path) or PositionalGraph.from_json(path)


def test_prompts_of_different_lengths_are_refused(model, ioi_csv):
    with pytest.raises(PositionError, match="one token length"):
        attribute(model, ioi_csv, method="EAP", quiet=True, positional=True)
    with pytest.raises(ValueError, match="gradient methods"):
        attribute(model, ioi_csv, method="exact", quiet=True, positional=True)
