"""Node- and neuron-level attribution and MIB scoring with ``gemma2_heads="per-input"``
(MIB's Gemma 2 head definition) against the reference's ``attribute_node`` and MIB's own
``evaluate_area_under_curve`` on the random Gemma 2 of tests/golden/gemma2
(tests/golden/gemma2_nodes/, made by tests/golden/make_golden_gemma2_nodes.py in the
reference's venv), and the refusals of the shared definition at the neuron level.

What is checked: a head's score is its raw output difference times the gradient at its raw
output (through ``ln1_post``), an MLP's its output difference times the gradient at its
input (the MLP's own vector-Jacobian product: node_attribution's module docstring); node
circuits are evaluated with each input renormalising its own mix of heads, neuron circuits
with a layer's kept and patched head dimensions renormalised together and an MLP's
dimensions kept through ``ln2_post``'s scale.

Three equal batches of 4: the reference's scores are jaxinterp's means divided by 4. Scores
within 1e-5 of the largest |score| (measured: 6e-6 node EAP, 1.6e-6 neuron EAP, 3.8e-6
EAP-IG-inputs, 1.2e-6 EAP-IG-activations, 3.1e-6 exact), Pearson >= 0.999; faithfulness
points, CPR and CMD within 1e-4 (faithfulness is normalised: 1 is the full model; measured
3.3e-6), MIB's weighted edge counts exactly. (The default shared heads' node EAP scores
differ from these on purpose: Pearson 0.958 with the reference's here.)"""

import json
import os

import numpy as np
import pytest

from devtools.testing import slow
from jaxinterp import load_model, mib
from jaxinterp.graph import Graph
from jaxinterp.interventions import prepare_data
from jaxinterp.node_attribution import attribute_nodes, evaluate_neuron_masks

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "gemma2_nodes")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(GOLDEN, "gemma2_nodes.json")) as _f:
    INFO = json.load(_f)
B = INFO["batch_size"]
SCORE_TOL = 1e-5  # of the largest |score|
TOL = 1e-4  # faithfulness, CPR, CMD


@pytest.fixture(scope="module")
def setup():
    model = load_model(os.path.join(ROOT, INFO["model"]), gemma2_heads="per-input")
    pairs, _ = prepare_data(model, os.path.join(ROOT, INFO["data"]), INFO["metric"])
    assert len(pairs) == INFO["n_examples"] == 3 * B
    return model, pairs


def _reference(model, level, method):
    g = Graph.from_json(os.path.join(GOLDEN, f"{level}_{method}.json"), spec=model.graph_spec)
    return g.neurons_scores if level == "neuron" else g.nodes_scores


def _assert_close(got, want):
    scale = np.abs(want).max()
    assert scale > 0.01  # effects that are not tiny
    assert np.abs(got - want).max() <= SCORE_TOL * scale
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] >= 0.999


def test_node_and_neuron_scores_equal_the_reference(setup):
    """One neuron-level EAP run gives both levels (node scores are the neurons' sums)."""
    model, pairs = setup
    got = attribute_nodes(model, pairs, "EAP", level="neuron", batch_size=B)
    _assert_close(got.neurons_scores / B, _reference(model, "neuron", "EAP"))
    _assert_close(got.nodes_scores / B, _reference(model, "node", "EAP"))


@slow("the EAP case guards the same MLP input gradient; EAP-IG-activations also its cut gradients")
@pytest.mark.parametrize("method", ["EAP-IG-inputs", "EAP-IG-activations", "exact"])
def test_other_methods_node_scores_equal_the_reference(setup, method):
    model, pairs = setup
    got = attribute_nodes(model, pairs, method, level="node", ig_steps=INFO["ig_steps"], batch_size=B)
    _assert_close(got.nodes_scores / (1 if method == "exact" else B), _reference(model, "node", method))


@pytest.mark.parametrize("fname", ["node_EAP_input_kept.json", "neuron_EAP.json"])
def test_node_and_neuron_curves_equal_mibs_own_evaluation(setup, fname):
    """MIB's curves at the node level (the input node unscored: always kept, so that the
    circuits reach the logits; make_golden_gemma2_nodes.py) and the neuron level."""
    model, pairs = setup
    runs = {e["absolute"]: e for e in INFO["evaluation"] if e["graph"] == fname}
    level = runs[True]["level"]
    got = mib.score_graph(model, Graph.from_json(os.path.join(GOLDEN, fname), spec=model.graph_spec), pairs,
                          batch_size=B, level=level)
    assert abs(got.cpr - runs[False]["area_under"]) <= TOL and abs(got.cmd - runs[True]["area_from_1"]) <= TOL
    for absolute, curve in ((False, got.signed), (True, got.absolute)):
        want = runs[absolute]
        np.testing.assert_allclose(curve.faithfulness, want["faithfulnesses"], rtol=0, atol=TOL)
        assert curve.weighted_edge_counts == want["weighted_edge_counts"]
        # some circuit strictly between the empty one and the full model
        assert any(0.05 < abs(f) and abs(f - 1) > 0.05 for f in want["faithfulnesses"])
    scale = max(abs(INFO["clean"]), abs(INFO["empty"]))
    assert abs(got.model - INFO["clean"]) <= TOL * scale and abs(got.empty - INFO["empty"]) <= TOL * scale


def test_shared_heads_refuse_neuron_circuits(setup, tmp_path, capsys):
    """The default shared heads: neuron circuits are refused (API, mib score, mib run)
    before any evaluation, with one line naming the option."""
    from jaxinterp.cli import main

    model_dir = os.path.join(ROOT, INFO["model"])
    shared = load_model(model_dir)
    _, pairs = setup
    neurons = np.ones((1, shared.graph_spec.n_forward, shared.cfg.d_model), bool)
    with pytest.raises(ValueError, match="need gemma2_heads='per-input'"):
        evaluate_neuron_masks(shared, neurons, pairs, batch_size=B)
    graph = os.path.join(GOLDEN, "neuron_EAP.json")
    data = os.path.join(ROOT, INFO["data"])
    out = str(tmp_path / "score.json")
    assert main(["mib", "score", "--model", model_dir, "--data", data, "--graph", graph, "--level", "neuron",
                 "--batch-size", str(B), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--level neuron" in err and "--gemma2-heads per-input" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)
    assert main(["mib", "run", "--model", f"gemma2={model_dir}", "--task", f"ioi={data}", "--level", "neuron",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--level neuron" in err and "--gemma2-heads per-input" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "run")
