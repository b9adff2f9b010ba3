"""Node- and neuron-level attribution (``jaxinterp.node_attribution``):

* against the reference's own ``attribute_node`` (hannamw/EAP-IG at MIB's pinned commit;
  tests/golden/make_golden_mib.py): every neuron score within 1e-4 of the largest and
  Pearson >= 0.999, node scores the same, on the sequential demo model and the parallel
  NeoX (the reference's scores are ours / batch size, with equal batches);
* against autograd through an independent forward (tests/family_reference.py, torch):
  neuron scores are ``delta`` times the gradient of that forward's metric at the node's
  output (at the MLP's own input for the reference's MLP convention), node scores their
  sums (the directional derivative along ``delta``);
* the graph JSON fields (``neurons``, ``neurons_scores``) as the reference writes them,
  node-level top-n, and ``jaxinterp attribute --level``.
"""

import functools
import json
import os

import numpy as np
import pytest

from jaxinterp import load_model, mib
from jaxinterp.interventions import prepare_data
from jaxinterp.graph import Graph
from jaxinterp.node_attribution import assemble, neuron_scores

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(GOLDEN, "mib", "mib.json")) as _f:
    INFO = json.load(_f)
B = INFO["batch_size"]
TOL = 1e-4  # of the largest |score|


@functools.lru_cache(maxsize=None)
def _setup(checkpoint):
    entry = INFO["checkpoints"][checkpoint]
    model = load_model(os.path.join(ROOT, entry["model"]))
    pairs, _ = prepare_data(model, os.path.join(ROOT, INFO["data"]), INFO["metric"])
    assert entry["batch_lengths"] == [B] * (len(pairs) // B), "the rule reference = ours / B needs equal batches"
    return entry, model, pairs


@functools.lru_cache(maxsize=None)
def _sums(checkpoint, method):
    """``neuron_scores``: per node with the output gradient, per MLP with the input gradient (one compile)."""
    _, model, pairs = _setup(checkpoint)
    return neuron_scores(model, pairs, method, ig_steps=INFO["ig_steps"], batch_size=B)


def _ours(checkpoint, method, mlp_gradient="input"):
    """``(neurons [src, d_model], nodes [src])`` in ``mlp_gradient``'s convention."""
    _, model, _ = _setup(checkpoint)
    outputs, mlp_inputs = _sums(checkpoint, method)
    neurons = assemble(outputs, mlp_inputs if mlp_gradient == "input" else None, model.graph_spec)
    return neurons, neurons.sum(1)


def _reference(checkpoint, level, method):
    """The reference's scores, read from its file by name: ``[src]`` or ``[src, d_model]``
    (an attention head's entry is its layer's block; the head's own row is taken)."""
    entry, model, _ = _setup(checkpoint)
    run = next(a for a in entry["attribution"] if (a["level"], a["method"]) == (level, method))
    with open(os.path.join(GOLDEN, "mib", run["graph"])) as f:
        nodes = json.load(f)["nodes"]
    out = []
    for name in model.graph_spec.forward_names:
        if level == "node":
            out.append(nodes[name]["score"])
        else:
            v = nodes[name]["neurons_scores"]
            out.append(v[int(name.split(".h")[1])] if name.startswith("a") else v)
    return np.asarray(out, np.float64)


# one compiled program per checkpoint (CI time): EAP on the sequential demo model and on the
# parallel NeoX. The EAP-IG-inputs golden files (the node version's points k = 1 .. steps)
# agree as well (max |diff| 1.2e-7 and 1.6e-6 of the largest node score, 2.9e-6 and
# 1.2e-6 of the largest neuron score), and so did, checked once by hand against the same
# reference, EAP-IG-activations (patching) and EAP with zero ablation on both models
# (within 1.9e-6); each costs another compile per model. (The reference's attribute_node
# does not dispatch clean-corrupted, which jaxinterp offers.)
@pytest.mark.parametrize("checkpoint,method", [("demo", "EAP"), ("neox", "EAP")])
def test_scores_equal_the_references_attribute_node(checkpoint, method):
    neurons, nodes = _ours(checkpoint, method)
    for level, ours in (("neuron", neurons), ("node", nodes)):
        want = _reference(checkpoint, level, method)
        ours = ours.astype(np.float64) / B
        assert np.abs(want).max() > 1e-2
        rel = np.abs(ours - want).max() / np.abs(want).max()
        assert rel <= TOL, f"{level}: max |diff| {rel:.2e} of the largest |score|"
        assert np.corrcoef(ours.ravel(), want.ravel())[0, 1] >= 0.999


def test_the_reference_takes_an_mlps_gradient_at_its_input():
    """With the gradient at the MLP's output (``mlp_gradient="output"``) the MLP scores
    move away from the reference's and the others stay: the reference's choice is real."""
    entry, model, _ = _setup("demo")
    spec = model.graph_spec
    mlps = [spec.mlp_index(layer) for layer in range(spec.n_layers)]
    want = _reference("demo", "node", "EAP")
    out = _ours("demo", "EAP", "output")[1] / B
    others = np.setdiff1d(np.arange(spec.n_forward), mlps)
    scale = np.abs(want).max()
    assert np.abs(out[others] - want[others]).max() <= TOL * scale
    assert np.abs(out[mlps] - want[mlps]).max() > 100 * TOL * scale


def test_scores_equal_autograd_through_an_independent_forward():
    """Torch autograd of the metric through an independent hand-wired forward of the NeoX
    (tests/family_reference.py: Hugging Face's modules, wired head by head) with respect
    to an extra term at every downstream input: a node's output gradient is the sum over
    the inputs it feeds, so its neuron scores are ``delta_u`` times that sum (times the
    gradient at the MLP's own input for the reference's MLP convention), summed over
    examples and positions; node scores are their sums over the dimensions (the
    directional derivative along ``delta_u``)."""
    import torch
    from transformers import AutoModelForCausalLM

    import family_reference

    entry, model, pairs = _setup("neox")
    spec = model.graph_spec
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, entry["model"]), dtype=torch.float32).eval()
    mask = torch.tensor(pairs.attention_mask)
    clean_ids, corr_ids = torch.tensor(pairs.clean).long(), torch.tensor(pairs.corrupted).long()
    with torch.no_grad():
        _, clean = family_reference.forward(hf, clean_ids, mask)
        _, corr = family_reference.forward(hf, corr_ids, mask)  # the clean prompt's mask, as the reference
    names, inputs, real = spec.forward_names, spec.backward_names, spec.real_edge_mask
    extra = {v: torch.zeros(clean["input"].shape, requires_grad=True) for v in inputs}
    logits, _ = family_reference.forward(hf, clean_ids, mask, extra=extra)
    rows, last, labels = torch.arange(len(pairs)), torch.tensor(pairs.lengths - 1), torch.tensor(pairs.labels).long()
    final = logits[rows, last]
    signed = -(final[rows, labels[:, 0]] - final[rows, labels[:, 1]]).mean()  # logit_diff's attribution sign
    grads = dict(zip(inputs, torch.autograd.grad(signed, [extra[v] for v in inputs])))

    def product(u, g):
        return ((corr[names[u]] - clean[names[u]]) * g).sum((0, 1)).detach().double().numpy()

    mlps = [spec.mlp_index(layer) for layer in range(spec.n_layers)]
    at_outputs = np.stack([product(u, sum(grads[inputs[d]] for d in np.nonzero(real[u])[0]))
                           for u in range(len(names))])
    at_mlp_inputs = np.stack([product(u, grads[names[u]]) for u in mlps])
    for mlp_gradient in ("output", "input"):
        neurons, nodes = _ours("neox", "EAP", mlp_gradient)
        want = at_outputs.copy()
        if mlp_gradient == "input":
            want[mlps] = at_mlp_inputs
        assert np.abs(neurons - want).max() <= TOL * np.abs(want).max(), mlp_gradient
        assert np.abs(nodes - want.sum(1)).max() <= TOL * np.abs(want.sum(1)).max(), mlp_gradient
    # the two conventions differ on the MLPs (else the check could not tell them apart)
    assert np.abs(at_mlp_inputs.sum(1) - at_outputs[mlps].sum(1)).max() > 0.1 * np.abs(at_outputs.sum(1)).max()


def test_graph_json_neurons_as_the_reference_writes_them(tmp_path):
    """``to_json`` writes ``neurons`` / ``neurons_scores`` per node as the reference does
    (an attention head: its layer's ``[n_heads][d_model]`` block) and reads the
    reference's file back to the same arrays; node-level top-n is the reference's."""
    entry, model, _ = _setup("demo")
    spec = model.graph_spec
    ref_path = os.path.join(GOLDEN, "mib", "demo_neuron_EAP.json")
    g = Graph.from_json(ref_path, spec=spec)
    np.testing.assert_array_equal(g.neurons_scores, _reference("demo", "neuron", "EAP").astype(np.float32))
    assert g.neurons_in_graph.shape == g.neurons_scores.shape and not g.neurons_in_graph.any()
    g.to_json(str(tmp_path / "g.json"))
    with open(ref_path) as f:
        ref = json.load(f)["nodes"]
    with open(tmp_path / "g.json") as f:
        ours = json.load(f)["nodes"]
    for name in spec.forward_names:
        assert ours[name]["neurons"] == ref[name]["neurons"]
        np.testing.assert_allclose(ours[name]["neurons_scores"], ref[name]["neurons_scores"], rtol=1e-6)
    # top-n neurons: the nodes holding them, every real edge among those nodes and into the logits
    mib.apply_topn(g, 40, absolute=True, level="neuron")
    flat = np.abs(g.neurons_scores).reshape(-1)
    assert g.neurons_in_graph.sum() == 40 and np.abs(g.neurons_scores[g.neurons_in_graph]).min() >= np.sort(flat)[-40]
    nodes = g.neurons_in_graph.any(1)
    np.testing.assert_array_equal(g.nodes_in_graph, nodes)
    for _, s, d in spec.edges:
        dst_nodes = np.nonzero(spec.forward_to_backward[:, d])[0]
        want = nodes[s] and (d == spec.logits_index or nodes[dst_nodes].any())
        assert g.in_graph[s, d] == want
    g.to_json(str(tmp_path / "c.json"))
    h = Graph.from_json(str(tmp_path / "c.json"), spec=spec)
    np.testing.assert_array_equal(h.neurons_in_graph, g.neurons_in_graph)


def test_attribute_level_command(tmp_path, capsys):
    from jaxinterp.cli import main

    entry, model, pairs = _setup("demo")
    base = ["attribute", "--model", os.path.join(ROOT, entry["model"]), "--data", os.path.join(ROOT, INFO["data"]),
            "--method", "EAP", "--batch-size", str(B)]
    out = str(tmp_path / "n.json")
    assert main(base + ["--level", "neuron", "--top-n", "100", "--out", out]) == 0
    g = Graph.from_json(out, spec=model.graph_spec)
    neurons, nodes = _ours("demo", "EAP")
    np.testing.assert_allclose(g.neurons_scores, neurons, rtol=1e-5, atol=1e-6 * np.abs(neurons).max())
    np.testing.assert_allclose(g.nodes_scores, nodes, rtol=1e-5, atol=1e-6 * np.abs(nodes).max())
    assert g.neurons_in_graph.sum() == 100
    capsys.readouterr()
    for argv, message in [
        (base + ["--level", "neurons", "--out", out], "--level"),
        (base[:-4] + ["--method", "exact", "--level", "neuron", "--out", out], "--level neuron"),
        (base + ["--mlp-gradient", "output", "--out", out], "--mlp-gradient"),
        (base + ["--level", "node", "--top-n", "17", "--out", out], "--top-n 17"),
        (base + ["--level", "node", "--remat", "--out", out], "--remat"),
    ]:
        try:
            status = main(argv)
        except SystemExit as e:  # argparse's own refusal of a bad choice
            status = e.code
        assert status == 2, argv
        assert message in capsys.readouterr().err, argv
