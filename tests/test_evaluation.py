"""Circuit evaluation and faithfulness curves."""

import numpy as np
import pytest

from jaxinterp.attribution import attribute
from jaxinterp.interventions import batch_circuit_metrics, prepare_data, prepare_run
from jaxinterp.evaluation import (evaluate, evaluate_baseline, evaluate_empty, evaluate_graph, evaluate_masks,
                                  faithfulness_curve, normalized_faithfulness)
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
    into_a1 = [n for n, _, _ in spec.edges if n.startswith("m0->a1.")]  # the one of these that matters most
    m0_a1 = max(into_a1, key=lambda n: abs(exact.scores[spec.edge_index(n)]))
    edges = [spec.edge_index(n) for n in ["input->a1.h2<v>", "a0.h0->m0", m0_a1, "a1.h1->logits"]]
    for i, (s, d) in enumerate(edges):
        masks[i, s, d] = False
    values = evaluate_masks(model, masks, pairs, batch_size=8)
    want = np.array([exact.scores[s, d] for s, d in edges])
    scale = np.abs(exact.scores).max()
    assert np.abs(want).min() > 1e-2 * scale  # edges that matter, or a zero score would pass
    np.testing.assert_allclose(-(values - clean), want, rtol=0, atol=1e-4 * scale)


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
    from jaxinterp.interventions import mean_activations

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
    assert curve.empty == pytest.approx(evaluate_masks(
        model, np.zeros((1,) + scored.spec.real_edge_mask.shape, bool), pairs, intervention="mean",
        batch_size=8)[0], rel=1e-4, abs=1e-6)
    assert abs(curve.clean - curve.empty) > 1e-4
    np.testing.assert_allclose(curve.faithfulness[-1], 1.0, atol=1e-3)
    # another data set's means give another empty circuit
    other = pairs.head(3)
    other_curve = faithfulness_curve(model, scored, pairs, [1], intervention="mean", intervention_data=other,
                                     batch_size=8)
    assert abs(other_curve.empty - curve.empty) > 1e-6


METRICS = ["logit_diff", "prob_diff", "kl_div"]
INTERVENTIONS = ["patching", "zero", "mean", "mean-positional"]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """``(model, pairs, EAP graph)`` on a random GPT-2 whose edges matter (a large
    initializer_range: the default init's metric changes are at float noise)."""
    from jaxinterp import load_model
    from devtools.testing import save_random_gpt2

    from devtools.testing import write_ioi_csv

    path = save_random_gpt2(str(tmp_path_factory.mktemp("sharp_gpt2")), n_layer=2, n_head=4, n_embd=32, seed=0,
                            initializer_range=0.2)
    model = load_model(path)
    csv = write_ioi_csv(tmp_path_factory.mktemp("sharp_data") / "ioi.csv", model.tokenizer, n=12, ragged=True)
    pairs = prepare_data(model, csv, "logit_diff")[0]
    return model, pairs, attribute(model, pairs, method="EAP", batch_size=8, quiet=True), csv


@pytest.mark.parametrize("intervention", INTERVENTIONS)
@pytest.mark.parametrize("metric", METRICS)
def test_faithfulness_is_0_for_the_empty_circuit_and_1_for_all_edges(sharp, metric, intervention):
    """MIB's definition (issue 14): the top-0 and the all-edges circuits, evaluated as
    circuits of the curve, sit exactly at the ends; m(N) is the model itself (for KL, 0:
    the old m(N) = KL(corrupted || clean) gave -8323 here on a 3-layer model)."""
    model, pairs, scored, _ = sharp
    n = scored.spec.n_edges
    curve = faithfulness_curve(model, scored, pairs, [0, 5, n], metric=metric, intervention=intervention,
                               batch_size=8)
    np.testing.assert_allclose(curve.faithfulness[[0, -1]], [0.0, 1.0], atol=1e-4)
    assert curve.n_edges[0] == 0 and curve.n_edges[-1] == n
    scale = abs(curve.clean - curve.empty)
    assert scale > 1e-4, "the task must tell the model from the empty circuit for the check to mean anything"
    # the ends are what they say, by independent computations: the plain forward on the clean
    # and on the corrupted prompts
    clean = evaluate_baseline(model, pairs, metric, batch_size=8)
    np.testing.assert_allclose(curve.clean, clean, atol=1e-5 * scale)
    corrupted = evaluate_baseline(model, pairs, metric, batch_size=8, run_corrupted=True)
    np.testing.assert_allclose(curve.corrupted, corrupted, atol=1e-5 * scale)  # two programs: float rounding
    if metric == "kl_div":
        assert abs(clean) < 1e-6  # KL(clean || clean)
    if intervention == "patching":  # every edge patched is the corrupted run
        np.testing.assert_allclose(curve.empty, curve.corrupted, atol=1e-4 * scale)


@pytest.mark.parametrize("intervention", ["patching", "zero"])
def test_plain_runs_stand_in_for_the_full_and_the_empty_circuit(sharp, intervention):
    """``Run.circuit_metrics`` takes the full graph's value from the clean run and, under
    patching, the empty circuit's from the corrupted run, and runs a repeated circuit
    once: each value equals the graph forward's own on that mask (the kernel called
    directly), in the order given."""
    model, pairs, scored, _ = sharp
    run = prepare_run(model, pairs, "logit_diff", intervention, batch_size=8)
    spec = model.graph_spec
    g = Graph(spec, scored.scores)
    g.apply_topn(20)
    everything = np.ones_like(spec.real_edge_mask)  # entries outside the real edges are no edges
    masks = np.stack([g.in_graph, everything, g.in_graph, np.zeros_like(everything)])
    got = run.circuit_metrics(masks, chunk=2)
    kw = dict(cfg=run.model.cfg, metric=run.metric, intervention=intervention, chunk=2)
    direct = run.mean(lambda b: batch_circuit_metrics(run.model.params, b, masks, None, **kw))
    scale = abs(direct[1] - direct[3])  # what faithfulness divides by
    assert scale > 1e-2 and abs(direct[0] - direct[3]) > 1e-2 * scale  # the four values are not all one
    assert got[0] == got[2]
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-4 * scale)
    clean, corrupted = run.baselines
    assert got[1] == clean
    assert (got[3] == corrupted) == (intervention == "patching")


@pytest.mark.parametrize("intervention", ["patching", "mean"])
def test_evaluate_gives_one_pass_the_circuit_and_its_ends(sharp, intervention):
    model, pairs, scored, _ = sharp
    g = Graph(scored.spec, scored.scores).apply_topn(20)
    result = evaluate(model, g, pairs, "kl_div", intervention, batch_size=8)
    kw = dict(metric="kl_div", intervention=intervention, batch_size=8)
    np.testing.assert_allclose(result.circuit, evaluate_graph(model, g, pairs, **kw), rtol=1e-5)
    np.testing.assert_allclose(result.empty, evaluate_empty(model, pairs, **kw), rtol=1e-5)
    assert abs(result.model) < 1e-6
    assert result.faithfulness == pytest.approx(1 - result.circuit / result.empty, rel=1e-6)


def test_evaluate_masks_reuses_given_means(model, pairs):
    """Given node means are used as they are (not computed again from the data)."""
    from jaxinterp.interventions import intervention_means

    spec = model.graph_spec
    empty = np.zeros((1, spec.n_forward, spec.n_backward), bool)
    means = intervention_means(model, pairs, "mean", batch_size=8)
    own = evaluate_masks(model, empty, pairs, intervention="mean", batch_size=8)
    np.testing.assert_array_equal(evaluate_masks(model, empty, pairs, intervention="mean", batch_size=8,
                                                 means=means), own)
    other = evaluate_masks(model, empty, pairs, intervention="mean", batch_size=8, means=2 * means)
    assert abs(other[0] - own[0]) > 1e-4
    with pytest.raises(ValueError, match="mean and optimal interventions only"):
        evaluate_masks(model, empty, pairs, intervention="zero", batch_size=8, means=means)


@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_cli_kl_faithfulness_of_all_edges_and_none(sharp, tmp_path, capsys, intervention):
    """The issue's command lines: ``evaluate --metric kl_div --top-n <all>`` gave -8323,
    ``--top-n 0`` gave -0.18."""
    import json

    from jaxinterp.cli import main

    model, _, _, ioi_csv = sharp
    gpt2_dir = model.path
    out = str(tmp_path / "g.json")
    assert main(["attribute", "--model", gpt2_dir, "--data", ioi_csv, "--method", "EAP", "--metric", "kl_div",
                 "--batch-size", "8", "--out", out]) == 0
    n = Graph.from_json(out).spec.n_edges
    for top_n, expected in [(n, 1.0), (0, 0.0)]:
        capsys.readouterr()
        assert main(["evaluate", "--model", gpt2_dir, "--data", ioi_csv, "--graph", out, "--metric", "kl_div",
                     "--intervention", intervention, "--top-n", str(top_n), "--batch-size", "8"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["faithfulness"] == pytest.approx(expected, abs=1e-4), (top_n, result)
        assert abs(result["model"]) < 1e-6 and result["empty"] > 1e-4 and result["corrupted"] > 1e-4


def test_kl_faithfulness_curve_on_the_demo_model_is_sensible(tmp_path):
    """On the trained demo model: about 0 for tiny circuits, 1 at all edges, mostly
    increasing in between."""
    from jaxinterp import load_model, tasks
    from jaxinterp.demo import demo_model_dir

    demo = load_model(demo_model_dir())
    csv = tasks.write_pairs_csv("ioi", 32, str(tmp_path / "ioi.csv"), demo.tokenizer, seed=3)
    g = attribute(demo, csv, method="EAP-IG-inputs", metric="kl_div", batch_size=16, quiet=True)
    n = g.spec.n_edges
    sizes = sorted({int(round(x)) for x in np.geomspace(1, n, 16)} | {n})
    curve = faithfulness_curve(demo, g, csv, sizes, metric="kl_div", batch_size=16)
    f = curve.faithfulness
    assert abs(curve.clean) < 1e-6 and curve.empty > 0.1, (curve.clean, curve.empty)
    assert abs(f[0]) < 0.1, f
    assert f[-1] == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.isfinite(f)) and np.all(f < 1.0 + 0.1), f
    steps = np.diff(f)
    assert (steps > -0.02).mean() >= 0.8, f  # mostly increasing
    assert f[len(f) // 2:].min() > f[:len(f) // 4].max(), f  # large circuits are more faithful than small ones
