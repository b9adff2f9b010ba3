"""Score ensembles: normalisation and combination by hand, the graph files, the command,
and Edge Pruning started from an ensemble."""

import json
import re

import numpy as np
import pytest

from jaxinterp.cli import main
from jaxinterp.ensemble import combine_scores, ensemble_graphs, normalise_scores
from jaxinterp.graph import Graph, GraphSpec

# One layer, one head: src = input, a0.h0, m0; dst = a0.h0<q>, <k>, <v>, m0, logits.
# The real edges: input -> everything, a0.h0 -> m0 and logits, m0 -> logits (8 edges).
SPEC = GraphSpec(1, 1)
X = 99.0  # entries that are no edges: never read
A = np.array([[2.0, -4.0, 0.0, 1.0, 4.0],
              [X, X, X, -2.0, 0.0],
              [X, X, X, X, -1.0]])
B = np.array([[1.0, 1.0, 1.0, 0.0, -2.0],  # ties (q, k, v) and zeros
              [X, X, X, 0.0, 0.0],
              [X, X, X, X, 0.0]])


def test_the_small_graph_is_the_one_the_expected_figures_assume():
    assert SPEC.forward_names == ["input", "a0.h0", "m0"]
    assert SPEC.backward_names == ["a0.h0<q>", "a0.h0<k>", "a0.h0<v>", "m0", "logits"]
    np.testing.assert_array_equal(SPEC.real_edge_mask, np.array([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]],
                                                                 bool))


def test_normalisation_by_hand():
    real = SPEC.real_edge_mask
    # global: divided by the largest |score| over the real edges (A: 4, B: 2), sign kept
    np.testing.assert_array_equal(normalise_scores(A, real), [[0.5, -1, 0, 0.25, 1], [0, 0, 0, -0.5, 0],
                                                               [0, 0, 0, 0, -0.25]])
    np.testing.assert_array_equal(normalise_scores(B, real), [[0.5, 0.5, 0.5, 0, -1], [0, 0, 0, 0, 0],
                                                               [0, 0, 0, 0, 0]])
    # per destination: each column by its own largest |score|; A's <v> column and B's m0
    # column are all zero and stay zero (no 0/0)
    np.testing.assert_array_equal(normalise_scores(A, real, per_destination=True),
                                  [[1, -1, 0, 0.5, 1], [0, 0, 0, -1, 0], [0, 0, 0, 0, -0.25]])
    np.testing.assert_array_equal(normalise_scores(B, real, per_destination=True),
                                  [[1, 1, 1, 0, -1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    zero = normalise_scores(np.where(real, 0.0, X), real)
    assert np.isfinite(zero).all() and not zero.any()


@pytest.mark.parametrize("how, weights, absolute, expected", [
    ("mean", None, False, [[0.5, -0.25, 0.25, 0.125, 0], [0, 0, 0, -0.25, 0], [0, 0, 0, 0, -0.125]]),
    ("max", None, False, [[0.5, 0.5, 0.5, 0.25, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]),
    ("min", None, False, [[0.5, -1, 0, 0, -1], [0, 0, 0, -0.5, 0], [0, 0, 0, 0, -0.25]]),
    ("weighted", [3, 1], False, [[0.5, -0.625, 0.125, 0.1875, 0.5], [0, 0, 0, -0.375, 0], [0, 0, 0, 0, -0.1875]]),
    ("mean", None, True, [[0.5, 0.75, 0.25, 0.125, 1], [0, 0, 0, 0.25, 0], [0, 0, 0, 0, 0.125]]),
])
def test_combinations_by_hand(how, weights, absolute, expected):
    real = SPEC.real_edge_mask
    combined = combine_scores([normalise_scores(A, real), normalise_scores(B, real)], how, weights, absolute)
    np.testing.assert_allclose(combined, expected, rtol=0, atol=1e-12)


def test_per_destination_ensemble_of_graphs():
    g = ensemble_graphs([Graph(SPEC, A), Graph(SPEC, B)], "mean", per_destination=True)
    np.testing.assert_allclose(g.scores, [[1, 0, 0.5, 0.25, 0], [0, 0, 0, -0.5, 0], [0, 0, 0, 0, -0.125]], atol=1e-7)
    assert g.scores.dtype == np.float32 and not g.in_graph.any()  # scores only: no circuit chosen


def test_bad_combinations_are_refused():
    real = SPEC.real_edge_mask
    parts = [normalise_scores(A, real), normalise_scores(B, real)]
    with pytest.raises(ValueError, match="unknown ensemble 'median'"):
        combine_scores(parts, "median")
    with pytest.raises(ValueError, match="weights go with how='weighted'"):
        combine_scores(parts, "mean", [1, 1])
    with pytest.raises(ValueError, match="weights go with how='weighted'"):
        combine_scores(parts, "weighted")
    for weights in ([1], [1, 0], [1, float("nan")]):
        with pytest.raises(ValueError, match="weights must be 2 finite numbers > 0"):
            combine_scores(parts, "weighted", weights)


def test_graphs_of_different_models_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"b\.json is a graph of 1 layers x 2 heads .* but a\.json is a graph of "
                                         r"1 layers x 1 heads"):
        ensemble_graphs([Graph(SPEC, A), Graph(GraphSpec(1, 2))], names=["a.json", "b.json"])
    grouped, ungrouped = GraphSpec(1, 4, n_kv_inputs=2), GraphSpec(1, 4)
    with pytest.raises(ValueError, match="grouped <k>/<v> view"):
        ensemble_graphs([Graph(ungrouped), Graph(grouped)])
    # a file that does not record d_model fits any width; the width a file has is kept
    g = ensemble_graphs([Graph(GraphSpec(1, 1, d_model=0), A), Graph(GraphSpec(1, 1, d_model=64), B)])
    assert g.spec.d_model == 64
    with pytest.raises(ValueError, match="graph 1 is a graph of .*d_model 64, but graph 0 .*d_model 32"):
        ensemble_graphs([Graph(GraphSpec(1, 1, d_model=32), A), Graph(GraphSpec(1, 1, d_model=64), B)])


def test_cli_round_trip(tmp_path, capsys):
    a, b, out = str(tmp_path / "a.json"), str(tmp_path / "b.json"), str(tmp_path / "ens.json")
    Graph(SPEC, A).to_json(a)
    Graph(SPEC, B).to_json(b)
    assert main(["ensemble", "--graph", a, "--graph", b, "--how", "weighted", "--weight", "3", "--weight", "1",
                 "--out", out]) == 0
    assert "ensemble (weighted" in capsys.readouterr().out
    edges = json.load(open(out))["edges"]
    assert sorted(edges) == sorted(name for name, _, _ in SPEC.edges)  # the 8 edges, nothing else
    expected = {"input->a0.h0<q>": 0.5, "input->a0.h0<k>": -0.625, "input->a0.h0<v>": 0.125, "input->m0": 0.1875,
                "input->logits": 0.5, "a0.h0->m0": -0.375, "a0.h0->logits": 0.0, "m0->logits": -0.1875}
    assert {k: v["score"] for k, v in edges.items()} == pytest.approx(expected, abs=1e-7)
    assert not any(v["in_graph"] for v in edges.values())

    assert main(["ensemble", "--graph", a, "--graph", b, "--how", "min", "--per-destination", "--out", out]) == 0
    np.testing.assert_allclose(Graph.from_json(out).scores, [[1, -1, 0, 0, -1], [0, 0, 0, -1, 0], [0, 0, 0, 0, -0.25]],
                               atol=1e-7)


@pytest.mark.parametrize("args, out, message", [
    (["--how", "weighted", "--weight", "1"], "out", r"--how weighted needs one --weight per --graph \(2 graphs, "
                                                   r"1 weights\)"),
    (["--how", "weighted"], "out", r"--how weighted needs one --weight per --graph \(2 graphs, 0 weights\)"),
    (["--weight", "1", "--weight", "2"], "out", "--weight is for --how weighted, not --how mean"),
    ([], "a", "--out .*a.json is the --graph input"),
    (["--graph", "{c}"], "out", r"c\.json is a graph of 1 layers x 2 heads"),
    (["--graph", "{tmp}/missing.json"], "out", "--graph .*missing.json does not exist"),
])
def test_cli_errors(tmp_path, capsys, args, out, message):
    """Exit 2, one line naming the option or file and the cause, inputs untouched, nothing written."""
    a, b, c = (str(tmp_path / f"{x}.json") for x in "abc")
    Graph(SPEC, A).to_json(a)
    Graph(SPEC, B).to_json(b)
    Graph(GraphSpec(1, 2)).to_json(c)
    before = {p: open(p, "rb").read() for p in (a, b)}
    argv = ["ensemble", "--graph", a, "--graph", b] + [x.format(c=c, tmp=tmp_path) for x in args]
    assert main(argv + ["--out", str(tmp_path / f"{out}.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert {p: open(p, "rb").read() for p in (a, b)} == before
    assert not (tmp_path / "out.json").exists()


def test_cli_refuses_a_weight_that_is_not_positive(tmp_path, capsys):
    a = str(tmp_path / "a.json")
    Graph(SPEC, A).to_json(a)
    with pytest.raises(SystemExit) as e:
        main(["ensemble", "--graph", a, "--how", "weighted", "--weight", "-1", "--out", str(tmp_path / "o.json")])
    assert e.value.code == 2 and "argument --weight: -1 is not a number > 0" in capsys.readouterr().err


# --- Edge Pruning started from an ensemble -------------------------------------------------
def _intended_logits(scores, real, n_edges, init_logit=3.0, key=abs):
    """The warm start, written out: the real edges sorted by (|score| or ``key(score)``,
    flat index), the k-th of N at 2 * init_logit * (k / (N - 1) - (1 - n_edges / N))."""
    flat = [(key(float(s)), i) for i, s in enumerate(scores.reshape(-1)) if real.reshape(-1)[i]]
    order = sorted(flat)
    n = len(order)
    out = np.zeros(scores.size)
    for k, (_, i) in enumerate(order):
        out[i] = 2 * init_logit * (k / (n - 1) - (1 - n_edges / n))
    return out.reshape(scores.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model, 12 IOI pairs)``: a random GPT-2 of 1 layer, 2 heads and width 32 (13
    edges; compiling Edge Pruning's step dominates these tests' time)."""
    from devtools.testing import save_random_gpt2, write_ioi_csv
    from jaxinterp import load_model

    model = load_model(save_random_gpt2(str(tmp_path_factory.mktemp("tiny")), n_layer=1, n_head=2, n_embd=32))
    return model, write_ioi_csv(tmp_path_factory.mktemp("data") / "ioi.csv", model.tokenizer, ragged=True)


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def ioi_csv(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def ensemble_file(tmp_path_factory, model):
    """An ensemble (mean) of two random integer score graphs on the test model's graph:
    many edges tie, some are zero, some negative."""
    d = tmp_path_factory.mktemp("ens")
    spec = model.graph_spec
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        paths.append(str(d / f"m{k}.json"))
        Graph(spec, rng.integers(-2, 3, size=(spec.n_forward, spec.n_backward))).to_json(paths[-1])
    out = str(d / "ensemble.json")
    assert main(["ensemble", "--graph", paths[0], "--graph", paths[1], "--out", out]) == 0
    return out


def test_warm_start_is_the_ensembles_rank(model, ensemble_file):
    from jaxinterp.edge_pruning import _init_log_alpha

    spec = model.graph_spec
    real = spec.real_edge_mask
    scores = Graph.from_json(ensemble_file, spec=spec).scores
    assert len(np.unique(np.abs(scores[real]))) < real.sum() / 2 and (scores[real] < 0).any()
    got = _init_log_alpha(real.shape, real, 5, 3.0, scores)
    np.testing.assert_allclose(got, _intended_logits(scores, real, 5), rtol=0, atol=1e-5)
    assert ((got > 0) & real).sum() == 5
    signed = _init_log_alpha(real.shape, real, 5, 3.0, scores, absolute=False)
    np.testing.assert_allclose(signed, _intended_logits(scores, real, 5, key=float), rtol=0, atol=1e-5)
    assert (scores[(signed > 0) & real].min() >= scores[(signed <= 0) & real].max())


def test_edge_pruning_from_an_ensemble_starts_there_and_trains(model, ioi_csv, ensemble_file):
    """A few Adam steps from the ensemble's start: the learned logits stay within Adam's
    step bound of the intended start (each step moves a logit by at most ~3.2 lr), and
    training ran (finite losses, a circuit of at least the asked size)."""
    from jaxinterp.edge_pruning import learn_circuit

    spec = model.graph_spec
    real = spec.real_edge_mask
    steps, lr = 3, 0.01
    result = learn_circuit(model, ioi_csv, 5, steps=steps, lr=lr, batch_size=12, quiet=True,
                           init_scores=Graph.from_json(ensemble_file, spec=spec))
    intended = _intended_logits(Graph.from_json(ensemble_file, spec=spec).scores, real, 5)
    assert np.abs(result.log_alpha[real] - intended[real]).max() <= 3.2 * lr * steps
    assert np.isfinite(result.history["faithfulness_loss"]).all() and len(result.history["loss"]) == steps
    assert result.graph.count_included_edges() >= 5


def test_prune_refuses_init_signed_without_init_graph(tmp_path, capsys):
    csv = tmp_path / "d.csv"
    csv.write_text("clean,corrupted,correct_idx,incorrect_idx\n")
    assert main(["prune", "--model", str(tmp_path), "--data", str(csv), "--edges", "5", "--init-signed",
                 "--out", str(tmp_path / "o.json")]) == 2
    assert "--init-signed goes with --init-graph" in capsys.readouterr().err
