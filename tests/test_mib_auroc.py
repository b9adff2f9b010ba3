"""InterpBench's AUROC (``jaxinterp.mib.circuit_roc``, ``jaxinterp mib auroc``) against MIB's
own computation: run_evaluation.py's ``evaluate_area_under_roc`` (greedy circuits of the
hypothesis' scores at MIB's sizes, compared edge by edge with a known circuit) and
print_results.py's ``area_under_curve(FPR, TPR)`` (tests/golden/make_golden_mib_extras.py,
mib_extras/extras.json). The known circuit is the demo model's top 40 EAP edges (34 after
pruning), the hypothesis its information-flow routes (ties broken): a ranking that finds
part of the circuit, not all of it (AUROC 0.65). TPR, FPR, precision and recall are ratios
of edge counts, so they must agree to float rounding, as must the AUROC."""

import json
import os

import numpy as np
import pytest

from jaxinterp import mib
from jaxinterp.graph import Graph, GraphSpec

EXTRAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "mib_extras")
with open(os.path.join(EXTRAS, "extras.json")) as _f:
    WANT = json.load(_f)["auroc"]


def _golden_graphs():
    hypothesis = Graph.from_json(os.path.join(EXTRAS, WANT["hypothesis"]))
    return hypothesis, Graph.from_json(os.path.join(EXTRAS, WANT["reference"]), spec=hypothesis.spec)


def test_roc_and_auroc_equal_mibs_own():
    hypothesis, reference = _golden_graphs()
    got = mib.circuit_roc(reference, hypothesis)
    assert got.n_true == WANT["truth_edges"] == reference.count_included_edges()
    for ours, theirs in ((got.tpr, WANT["TPR"]), (got.fpr, WANT["FPR"]), (got.precision, WANT["precision"]),
                         (got.recall, WANT["recall"])):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert got.auroc == pytest.approx(WANT["auroc"], abs=1e-12)
    assert 0.55 < got.auroc < 0.9  # not trivially separable, not random
    # MIB asks its greedy loop for pct * n_edges edges unrounded: ceil of it (0.1% of 262 -> 1)
    assert got.sizes[:2] == [1, 1] and got.sizes[-1] == hypothesis.spec.n_edges


def test_roc_area_is_the_trapezoid_over_the_given_points():
    """No point at (0, 0) is added, FPR is divided by its last value: by hand."""
    assert mib.roc_area([0.2, 0.5, 1.0], [0.4, 0.8, 1.0]) == pytest.approx(0.3 * 0.6 + 0.5 * 0.9)
    assert mib.roc_area([0.1, 0.5], [0.5, 1.0]) == pytest.approx(0.8 * 0.75)  # x = 0.2, 1
    with pytest.raises(ValueError, match="undefined"):
        mib.roc_area([0.0, 0.0], [0.5, 1.0])


def test_a_perfect_ranking_and_undefined_references():
    """Scores that put the known circuit first find it exactly at its size: TPR 1 and FPR 0
    from there on; a reference without edges (or with all) is refused."""
    spec = GraphSpec(2, 2, d_model=4)
    truth = Graph(spec, np.random.default_rng(0).standard_normal((spec.n_forward, spec.n_backward)))
    truth.apply_greedy(12)  # a connected circuit the greedy search can grow into
    n_true = truth.count_included_edges()
    scores = np.where(truth.in_graph, 10.0, 0.0) + np.random.default_rng(1).random(truth.scores.shape)
    got = mib.circuit_roc(truth, Graph(spec, scores), percentages=(0.1, n_true / spec.n_edges, 1))
    assert got.sizes[1] == n_true and got.tpr[1:] == [1.0, 1.0] and got.fpr[1] == 0.0 and got.precision[1] == 1.0
    for empty in (True, False):
        ref = Graph(spec)
        ref.reset(empty=empty)
        with pytest.raises(ValueError, match="undefined"):
            mib.circuit_roc(ref, truth)


def test_mib_auroc_command(tmp_path, capsys):
    from jaxinterp.cli import main

    out = str(tmp_path / "roc.json")
    graph, reference = (os.path.join(EXTRAS, WANT[k]) for k in ("hypothesis", "reference"))
    assert main(["mib", "auroc", "--graph", graph, "--reference", reference, "--out", out]) == 0
    with open(out) as f:
        written = json.load(f)
    assert written["auroc"] == pytest.approx(WANT["auroc"], abs=1e-12) and written["fpr"] == pytest.approx(WANT["FPR"])
    assert f"AUROC {WANT['auroc']:.4f}" in capsys.readouterr().out
    other = str(tmp_path / "other.json")
    Graph(GraphSpec(2, 2, d_model=4)).to_json(other)
    for argv, message in [(["--graph", graph, "--reference", other], "graph file"),
                          (["--graph", str(tmp_path / "none.json"), "--reference", reference], "does not exist")]:
        assert main(["mib", "auroc", *argv, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not os.path.exists(tmp_path / "x.json")
