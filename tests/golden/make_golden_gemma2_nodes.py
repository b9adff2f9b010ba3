"""Make ``tests/golden/gemma2_nodes/``: the reference's node- and neuron-level attribution
(``attribute_node``) and MIB's own node- and neuron-level evaluation on the random Gemma 2
of tests/golden/gemma2 (MIB's head definition: jaxinterp's ``gemma2_heads="per-input"``),
for ``tests/test_gemma2_nodes.py``. Not run in CI (it needs the reference's PyTorch venv);
its outputs are committed.

Code as tests/golden/make_golden_mib.py (hannamw/EAP-IG at MIB's pinned 7af394a, its only
change ``device='cuda'`` replaced by the model's device; hannamw/MIB-circuit-track at
b759df3), the model loaded into TransformerLens as tests/golden/make_golden_gemma2.py does
(``load_gemma2``). From the repository root, in the reference venv::

    /tmp/refvenv/bin/python tests/golden/make_golden_gemma2_nodes.py --eap-ig /tmp/eapig_mib --mib /tmp/mib_ct

What the reference does on Gemma 2 at these levels (TransformerLens
``use_normalization_before_and_after``): a head's node output is its raw ``hook_result``
and its gradient is taken there, i.e. through ``ln1_post``; an MLP's output is
``hook_mlp_out`` (after ``ln2_post``) and its gradient is taken at ``hook_mlp_in`` (before
``ln2``). Its ``evaluate_graph`` renormalises each downstream input's mix of a layer's heads
(at the neuron level every input sees the same mix: kept dimensions of this run's raw
heads, the others corrupted).

Runs: the 12 IOI pairs of tests/golden/ioi.csv, batch size 4 (three equal batches: the
reference's scores are jaxinterp's means over examples divided by 4), MIB's ``logit_diff``
for IOI (batch mean, ``loss=True`` to attribute; per example to evaluate), patching:

* node scores: ``attribute_node(..., neuron=False)`` for EAP, EAP-IG-inputs and
  EAP-IG-activations (``ig_steps=3``), and exact: its ``attribute_node(method='exact')``
  raises IndexError at this commit (a score set on the logits node), so each node is
  patched on all its outgoing edges through the reference's ``evaluate_graph`` here
  (``exact_node_scores``); neuron scores: EAP with ``neuron=True``;
  written with the reference's ``Graph.to_json`` (the logits node added back, see
  make_golden_mib.py's WORK_AROUND): ``<level>_<method>.json``;
* MIB's ``evaluate_area_under_curve`` at the node level on the EAP node scores and at the
  neuron level on the EAP neuron scores, ``absolute`` False and True. On this 11-node graph
  every node circuit of MIB's sizes without the input node prunes to the empty circuit
  (faithfulness 0), so the node curves are run once more with the input node unscored
  (its score NaN: always kept, as MIB keeps unscored nodes; ``node_EAP_input_kept.json``),
  which gives circuits with a path from the input.

``gemma2_nodes.json`` holds the maximum |score| per run, the five outputs of every curve
(weighted edge counts, area_under, area_from_1, average, faithfulnesses), the clean and
empty-circuit metrics and the versions.
"""

import argparse
import json
import os
import sys
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "gemma2_nodes")
MODEL = "tests/golden/gemma2/model"
CSV = os.path.join(HERE, "ioi.csv")
BATCH_SIZE = 4
IG_STEPS = 3
RUNS = [("node", "EAP"), ("node", "EAP-IG-inputs"), ("node", "EAP-IG-activations"), ("node", "exact"),
        ("neuron", "EAP")]


def main(eap_ig_path: str, mib_path: str) -> None:
    sys.path.insert(0, os.path.join(eap_ig_path, "src"))
    sys.path.insert(0, mib_path)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    sys.path.insert(0, HERE)
    from importlib.metadata import version

    import eap
    import torch
    from eap.attribute_node import attribute_node
    from eap.evaluate import evaluate_baseline, evaluate_graph
    from eap.graph import Graph
    from MIB_circuit_track.evaluation import evaluate_area_under_curve
    from MIB_circuit_track.metrics import get_metric
    from make_golden import WORK_AROUNDS, _work_around_reference_bugs
    from make_golden_gemma2 import load_gemma2
    from make_golden_mib import EAP_IG_COMMIT, MIB_COMMIT, WORK_AROUND, _to_json
    from reference_eapig import EAPDataset

    assert os.path.dirname(eap.__file__).startswith(os.path.abspath(eap_ig_path)), eap.__file__
    torch.set_grad_enabled(True)
    _work_around_reference_bugs(eap)  # rotary: EAP-IG-activations would lose input -> layer-0 gradients
    import eap.attribute

    def exact_node_scores(graph, metric):
        """What ``attribute_node(method='exact')`` computes, which raises IndexError at this
        commit (its loop sets a score on the logits node, which has no row in
        ``nodes_scores``): the reference's ``evaluate_graph`` with all of one node's outgoing
        edges removed, minus the full model's metric, for every node but the logits; through
        make_golden.py's work-around that restores the graph its prune changes."""
        graph.in_graph |= graph.real_edge_mask
        graph.nodes_in_graph[:] = True
        baseline = evaluate_baseline(model, dl, metric, quiet=True).mean().item()
        for name, node in graph.nodes.items():
            if name == "logits":
                continue
            for edge in node.child_edges:
                edge.in_graph = False
            patched = eap.attribute.evaluate_graph(model, graph, dl, metric, quiet=True, skip_clean=True)
            node.score = patched.mean().item() - baseline
            for edge in node.child_edges:
                edge.in_graph = True
    os.makedirs(OUT, exist_ok=True)
    model, hf = load_gemma2(os.path.join(ROOT, MODEL))
    del hf
    ds = EAPDataset(CSV)
    dl = ds.to_dataloader(BATCH_SIZE)
    metric = get_metric("logit_diff", "ioi", model.tokenizer, model)
    attr_metric = partial(metric, mean=True, loss=True)
    eval_metric = partial(metric, mean=False, loss=False)
    out = {"mib": {"repository": "hannamw/MIB-circuit-track", "commit": MIB_COMMIT},
           "reference": {"repository": "hannamw/EAP-IG", "commit": EAP_IG_COMMIT,
                         "change": "device='cuda' replaced by device=model.cfg.device",
                         "work_arounds": [WORK_AROUND] + list(WORK_AROUNDS)},
           "torch": version("torch"), "transformer_lens": version("transformer-lens"),
           "transformers": version("transformers"), "model": MODEL, "data": os.path.relpath(CSV, ROOT),
           "batch_size": BATCH_SIZE, "ig_steps": IG_STEPS, "metric": "logit_diff", "intervention": "patching",
           "n_examples": len(ds), "attribution": [], "evaluation": []}
    out["clean"] = evaluate_baseline(model, dl, eval_metric, quiet=True).mean().item()
    out["empty"] = evaluate_graph(model, Graph.from_model(model), dl, eval_metric, quiet=True).mean().item()

    graphs = {}
    for level, method in RUNS:
        g = Graph.from_model(model, neuron_level=level == "neuron", node_scores=level == "node")
        if method == "exact":
            exact_node_scores(g, attr_metric)
        else:
            attribute_node(model, g, dl, attr_metric, method=method, intervention="patching",
                           ig_steps=IG_STEPS if "IG" in method else None, quiet=True, neuron=level == "neuron")
        fname = f"{level}_{method}.json"
        _to_json(g, os.path.join(OUT, fname))
        scores = g.neurons_scores if level == "neuron" else g.nodes_scores
        out["attribution"].append({"level": level, "method": method, "graph": fname,
                                   "max_abs_score": scores.abs().max().item()})
        print(out["attribution"][-1], flush=True)
        if method == "EAP":
            graphs[level] = fname
        if (level, method) == ("node", "EAP"):  # the input node unscored: always in the circuit
            g.nodes_scores[g.forward_index(g.nodes["input"])] = float("nan")
            _to_json(g, os.path.join(OUT, "node_EAP_input_kept.json"))
            graphs["node-input-kept"] = "node_EAP_input_kept.json"

    for key, fname in graphs.items():
        level = key.split("-")[0]
        for absolute in (False, True):
            graph = Graph.from_json(os.path.join(OUT, fname))
            counts, area_under, area_from_1, average, faith = evaluate_area_under_curve(
                model, graph, dl, eval_metric, quiet=True, level=level, absolute=absolute)
            out["evaluation"].append({
                "level": level, "absolute": absolute, "graph": fname,
                "weighted_edge_counts": [float(c) for c in counts], "area_under": area_under,
                "area_from_1": area_from_1, "average": average, "faithfulnesses": faith})
            print(f"{fname} absolute={absolute}: area_under {area_under:.6f} area_from_1 {area_from_1:.6f} "
                  f"f {[round(f, 4) for f in faith]}", flush=True)
    with open(os.path.join(OUT, "gemma2_nodes.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eap-ig", required=True, help="hannamw/EAP-IG at MIB's pinned commit (PATH/src goes on sys.path)")
    ap.add_argument("--mib", required=True, help="hannamw/MIB-circuit-track at MIB's pinned commit")
    args = ap.parse_args()
    main(os.path.abspath(args.eap_ig), os.path.abspath(args.mib))
