"""Make ``tests/golden/mib/``: MIB's own circuit-track evaluation (CPR/CMD and both curves)
and the reference's node- and neuron-level attribution (``attribute_node``), for
``tests/test_mib_golden.py``. Not run in CI (it needs the reference's PyTorch venv); its
outputs are committed.

Code, as MIB's leaderboard runs it:

* hannamw/MIB-circuit-track at commit b759df34433c9e31043ba9e02908ce0bf20e894f:
  ``MIB_circuit_track/evaluation.py`` (``evaluate_area_under_curve``) and
  ``MIB_circuit_track/metrics.py`` (``get_metric('logit_diff', 'ioi')``);
* hannamw/EAP-IG at commit 7af394a5662de8b23ad6154716a0cd3993d447a3, the commit MIB pins as
  its ``EAP-IG`` submodule (its ``evaluate_graph`` takes the ``optimal_ablation_path`` that
  ``evaluate_area_under_curve`` passes; the later 795f560 of make_golden.py does not), its
  only change the hard-coded ``device='cuda'`` replaced by the model's device. Its
  ``attribute_node`` equals 795f560's but for the optimal-ablation option.

Both are put on ``sys.path`` (nothing is installed), in the reference venv of
make_golden.py (torch 2.13.0 CPU, TransformerLens 2.18.0, transformers 4.57.6)::

    mkdir -p /tmp/eapig_mib /tmp/mib_ct
    git -C EAP-IG archive 7af394a5662de8b23ad6154716a0cd3993d447a3 | tar -x -C /tmp/eapig_mib
    git -C MIB-circuit-track archive b759df34433c9e31043ba9e02908ce0bf20e894f | tar -x -C /tmp/mib_ct
    sed -i "s/device='cuda'/device=model.cfg.device/g" /tmp/eapig_mib/src/eap/*.py
    /tmp/refvenv/bin/python tests/golden/make_golden_mib.py --eap-ig /tmp/eapig_mib --mib /tmp/mib_ct

Checkpoints and data are make_golden.py's (the shipped demo model, GPT-2-like and
sequential; the committed random 3-layer GPT-NeoX, parallel attention + MLP; the same 12
IOI pairs), batch size 4 (three equal batches: the reference's node scores are then
jaxinterp's mean over examples divided by 4).

Per checkpoint:

* **node** and **neuron** scores: ``attribute_node(model, graph, dl, metric, method,
  'patching', neuron=...)`` with the batch-mean ``logit_diff`` loss, for EAP and
  EAP-IG-inputs (``ig_steps=3``), written with the reference's ``Graph.to_json``
  (``<checkpoint>_<level>_<method>.json``; nodes carry ``score``, or ``neurons`` and
  ``neurons_scores``; the reference's writer fails on such graphs, see WORK_AROUND);
* **MIB's evaluation**: ``evaluate_area_under_curve(model, graph, dl, metric, level,
  absolute)`` with the per-example ``logit_diff`` (``mean=False, loss=False``, as
  run_evaluation.py) and the default ``patching``, for ``absolute`` False (CPR: its
  ``area_under``) and True (CMD: its ``area_from_1``), at the edge level on the
  reference's EAP edge scores of make_golden.py (``../<checkpoint>_EAP_patching.json``),
  and at the node and neuron levels on the EAP scores above. ``mib.json`` holds the five
  outputs (weighted edge counts, area_under, area_from_1, average, faithfulnesses) per
  (checkpoint, level, absolute), the clean and empty-circuit metrics, and the versions.
"""

import argparse
import json
import os
import sys
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "mib")
CSV = os.path.join(HERE, "ioi.csv")
BATCH_SIZE = 4
IG_STEPS = 3
MIB_COMMIT = "b759df34433c9e31043ba9e02908ce0bf20e894f"
EAP_IG_COMMIT = "7af394a5662de8b23ad6154716a0cd3993d447a3"
CHECKPOINTS = {"demo": ("jaxinterp/demo/model", "gpt2"), "neox": ("tests/golden/neox", "gpt_neox")}
NODE_METHODS = ("EAP", "EAP-IG-inputs")
LEVELS = ("edge", "node", "neuron")


WORK_AROUND = (
    "Graph.to_json of a graph with node or neuron scores (what MIB's run_attribution.py writes at those levels) "
    "raises IndexError: the logits node has no row in nodes_scores / neurons_scores. Here the reference's own "
    "to_json writes every other node, and the logits node is added back as {'in_graph': true} (Graph.from_json "
    "skips it).")


def _to_json(graph, path: str) -> None:
    """The reference's ``Graph.to_json`` without the logits node (see WORK_AROUND), which is
    then added back as ``{"in_graph": true}``; the file reads back with its ``from_json``."""
    logits = graph.nodes.pop("logits")
    try:
        graph.to_json(path)
    finally:
        graph.nodes["logits"] = logits
    with open(path) as f:
        d = json.load(f)
    d["nodes"]["logits"] = {"in_graph": True}
    with open(path, "w") as f:
        json.dump(d, f)


def main(eap_ig_path: str, mib_path: str) -> None:
    sys.path.insert(0, os.path.join(eap_ig_path, "src"))
    sys.path.insert(0, mib_path)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    sys.path.insert(0, HERE)
    from importlib.metadata import version

    import torch
    import eap
    from eap.attribute_node import attribute_node
    from eap.evaluate import evaluate_baseline, evaluate_graph
    from eap.graph import Graph
    from MIB_circuit_track.evaluation import evaluate_area_under_curve
    from MIB_circuit_track.metrics import get_metric
    from make_golden import load_neox
    from reference_eapig import EAPDataset, load_model

    assert os.path.dirname(eap.__file__).startswith(os.path.abspath(eap_ig_path)), eap.__file__
    torch.set_grad_enabled(True)
    os.makedirs(OUT, exist_ok=True)
    out = {"mib": {"repository": "hannamw/MIB-circuit-track", "commit": MIB_COMMIT},
           "reference": {"repository": "hannamw/EAP-IG", "commit": EAP_IG_COMMIT,
                         "change": "device='cuda' replaced by device=model.cfg.device",
                         "work_around": WORK_AROUND},
           "torch": version("torch"), "transformer_lens": version("transformer-lens"),
           "transformers": version("transformers"),
           "data": os.path.relpath(CSV, ROOT), "batch_size": BATCH_SIZE, "ig_steps": IG_STEPS,
           "metric": "logit_diff", "intervention": "patching", "checkpoints": {}}
    ds = EAPDataset(CSV)
    dl = ds.to_dataloader(BATCH_SIZE)
    for name, (rel, family) in CHECKPOINTS.items():
        model, _ = (load_model if family == "gpt2" else load_neox)(os.path.join(ROOT, rel), "cpu")
        metric = get_metric("logit_diff", "ioi", model.tokenizer, model)
        attr_metric = partial(metric, mean=True, loss=True)
        eval_metric = partial(metric, mean=False, loss=False)
        entry = {"model": rel, "family": family, "n_examples": len(ds),
                 "batch_lengths": [len(b[0]) for b in dl], "attribution": [], "evaluation": []}
        entry["clean"] = evaluate_baseline(model, dl, eval_metric, quiet=True).mean().item()
        empty = Graph.from_model(model)
        entry["empty"] = evaluate_graph(model, empty, dl, eval_metric, quiet=True).mean().item()

        graphs = {"edge": os.path.join(HERE, f"{name}_EAP_patching.json")}
        for method in NODE_METHODS:
            for level in ("node", "neuron"):
                g = Graph.from_model(model, neuron_level=level == "neuron", node_scores=level == "node")
                attribute_node(model, g, dl, attr_metric, method=method, intervention="patching",
                               ig_steps=IG_STEPS if "IG" in method else None, quiet=True, neuron=level == "neuron")
                fname = f"{name}_{level}_{method}.json"
                _to_json(g, os.path.join(OUT, fname))
                scores = g.neurons_scores if level == "neuron" else g.nodes_scores
                entry["attribution"].append({"level": level, "method": method, "graph": fname,
                                             "max_abs_score": scores.abs().max().item()})
                print(f"{name} {level} {method}: max |score| {entry['attribution'][-1]['max_abs_score']:.4g}",
                      flush=True)
                if method == "EAP":
                    graphs[level] = os.path.join(OUT, fname)

        for level in LEVELS:
            for absolute in (False, True):
                graph = Graph.from_json(graphs[level])
                counts, area_under, area_from_1, average, faith = evaluate_area_under_curve(
                    model, graph, dl, eval_metric, quiet=True, level=level, absolute=absolute)
                entry["evaluation"].append({
                    "level": level, "absolute": absolute, "graph": os.path.relpath(graphs[level], HERE),
                    "weighted_edge_counts": [float(c) for c in counts], "area_under": area_under,
                    "area_from_1": area_from_1, "average": average, "faithfulnesses": faith})
                print(f"{name} {level} absolute={absolute}: area_under {area_under:.6f} area_from_1 "
                      f"{area_from_1:.6f} f {[round(f, 4) for f in faith]}", flush=True)
        out["checkpoints"][name] = entry
    with open(os.path.join(OUT, "mib.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eap-ig", required=True, help=f"hannamw/EAP-IG at {EAP_IG_COMMIT} (PATH/src goes on sys.path)")
    ap.add_argument("--mib", required=True, help=f"hannamw/MIB-circuit-track at {MIB_COMMIT}")
    args = ap.parse_args()
    main(os.path.abspath(args.eap_ig), os.path.abspath(args.mib))
