"""Make ``tests/golden/mib_extras/``: what MIB's own code does with greedily selected
circuits, ``.pt`` graph files and InterpBench's AUROC, for ``tests/test_mib_greedy.py``,
``tests/test_mib_pt.py`` and ``tests/test_mib_auroc.py``. Not run in CI (it needs the
reference's PyTorch venv); its outputs are committed.

Code and venv as in make_golden_mib.py (hannamw/MIB-circuit-track at b759df3, its pinned
hannamw/EAP-IG at 7af394a with ``device='cuda'`` replaced by the model's device, both on
``sys.path``; torch 2.13.0 CPU, TransformerLens 2.18.0)::

    /tmp/refvenv/bin/python tests/golden/make_golden_mib_extras.py --eap-ig /tmp/eapig_mib --mib /tmp/mib_ct

Checkpoint and data as make_golden_mib.py: the shipped demo model, the 12 IOI pairs of
tests/golden/ioi.csv, batch size 4, ``logit_diff``, patching.

**Scores without ties.** The reference's ``apply_greedy`` breaks ties between equal scores
by the iteration order of a node's ``parent_edges``, a Python ``set`` of edges hashed by
name, so by ``PYTHONHASHSEED``: the same scores give different circuits in different
processes (measured below, ``tie_dependence``). Information-flow routes tie a lot (one
source's score into a layer is the same for every head and every q/k/v input). So the
graphs scored here have their ties broken first (:func:`distinct`: each score plus
a seeded jitter below 1e-4 of the largest |score|, every score and every |score| then
distinct in float32), written with the reference's ``Graph.to_json``:

* ``demo_ifr.json``: the reference's information-flow routes of ``../ifr/demo.json``
  (its NaNs replaced as make_golden_ifr.py does), ties broken;
* ``demo_eap.json``: the reference's EAP scores of ``../demo_EAP_patching.json`` (both
  signs, so the signed and |score| rankings differ), ties broken.

Outputs (``extras.json``):

* ``greedy``: ``evaluate_area_under_curve(..., apply_greedy=True)`` (what
  run_evaluation.py calls for ``--method information-flow-routes``) for ``absolute`` False
  and True on both graphs: weighted edge counts, areas, average, faithfulnesses;
* ``tie_dependence``: on the IFR scores with their ties, the greedy circuits at MIB's
  sizes under ``PYTHONHASHSEED`` 0..3 (child processes): at how many sizes they differ;
* ``pt``: ``Graph.to_pt`` files of three graphs, beside the reference's JSON of the same
  graph: ``demo_eap_top40.pt`` / ``.json`` (the EAP graph after ``apply_topn(40)``: edge
  scores, a circuit, its nodes), ``demo_node.pt`` (from ``../mib/demo_node_EAP.json``, node
  scores), ``demo_neuron.pt`` (from ``../mib/demo_neuron_EAP.json``, neuron scores);
* ``auroc``: InterpBench's evaluation, run_evaluation.py's ``evaluate_area_under_roc(
  reference, hypothesis)`` (greedy circuits at MIB's sizes against a known circuit: TPR,
  FPR, precision, recall) and print_results.py's ``area_under_curve(FPR, TPR)`` (its
  AUROC), with the known circuit ``demo_truth.json`` = the EAP graph's top 40 edges by
  |score|, pruned, and the hypothesis the IFR scores (a ranking that does not separate it).
  ``area_under_curve`` is taken from print_results.py by its source (that module imports
  ``tabulate``, which the venv lacks).
"""

import argparse
import ast
import json
import os
import subprocess
import sys
from functools import partial

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "mib_extras")
CSV = os.path.join(HERE, "ioi.csv")
BATCH_SIZE = 4
MIB_COMMIT = "b759df34433c9e31043ba9e02908ce0bf20e894f"
EAP_IG_COMMIT = "7af394a5662de8b23ad6154716a0cd3993d447a3"
MODEL = "jaxinterp/demo/model"
PERCENTAGES = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)
TRUTH_N = 40


def distinct(scores: np.ndarray, real: np.ndarray, seed: int) -> np.ndarray:
    """``scores [src, dst]`` plus a seeded jitter in [0, 1e-4) of the largest |score| on the
    real edges, so that every score and every |score| is distinct in float32."""
    rng = np.random.default_rng(seed)
    scale = np.abs(scores[real]).max()
    out = scores.astype(np.float64) + np.where(real, rng.uniform(0, 1e-4 * scale, scores.shape), 0)
    out = out.astype(np.float32)
    assert len(np.unique(out[real])) == real.sum() and len(np.unique(np.abs(out[real]))) == real.sum()
    return out


def _setup(eap_ig_path, mib_path):
    sys.path.insert(0, os.path.join(eap_ig_path, "src"))
    sys.path.insert(0, mib_path)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import eap

    assert os.path.dirname(eap.__file__).startswith(os.path.abspath(eap_ig_path)), eap.__file__


def ifr_scores(Graph):
    """The reference's IFR graph of make_golden_ifr.py with its NaNs replaced as there."""
    with open(os.path.join(HERE, "ifr", "ifr.json")) as f:
        info = json.load(f)["checkpoints"]["demo"]
    g = Graph.from_json(os.path.join(HERE, info["graph"]))
    g.scores[g.scores.isnan()] = info["nan_replaced_by"]
    return g


def greedy_circuits(eap_ig_path, mib_path):
    """In a child process: the greedy circuits of the IFR scores with ties, at MIB's sizes."""
    _setup(eap_ig_path, mib_path)
    from eap.graph import Graph

    g = ifr_scores(Graph)
    n_edges = len(g.edges)
    out = []
    for pct in PERCENTAGES:
        g.apply_greedy(int(pct * n_edges), absolute=True, prune=True)
        out.append(g.in_graph.numpy().astype(int).ravel().tolist())
    print(json.dumps(out))


def area_under_curve_of_print_results(mib_path):
    """print_results.py's ``area_under_curve``, compiled from its source alone."""
    with open(os.path.join(mib_path, "print_results.py")) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "area_under_curve")
    ns = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "print_results.py", "exec"), ns)
    return ns["area_under_curve"]


def main(eap_ig_path: str, mib_path: str) -> None:
    _setup(eap_ig_path, mib_path)
    from importlib.metadata import version

    import torch
    from eap.evaluate import evaluate_baseline, evaluate_graph
    from eap.graph import Graph
    from MIB_circuit_track.evaluation import evaluate_area_under_curve, evaluate_area_under_roc
    from MIB_circuit_track.metrics import get_metric
    from reference_eapig import EAPDataset, load_model

    torch.set_grad_enabled(True)
    os.makedirs(OUT, exist_ok=True)
    out = {"mib": {"repository": "hannamw/MIB-circuit-track", "commit": MIB_COMMIT},
           "reference": {"repository": "hannamw/EAP-IG", "commit": EAP_IG_COMMIT,
                         "change": "device='cuda' replaced by device=model.cfg.device"},
           "torch": version("torch"), "transformer_lens": version("transformer-lens"),
           "model": MODEL, "data": os.path.relpath(CSV, ROOT), "batch_size": BATCH_SIZE, "metric": "logit_diff",
           "intervention": "patching"}

    # --- the scored graphs, ties broken
    ifr = ifr_scores(Graph)
    real = ifr.real_edge_mask.numpy()
    ifr.scores[:] = torch.from_numpy(distinct(ifr.scores.numpy(), real, seed=0))
    ifr.to_json(os.path.join(OUT, "demo_ifr.json"))
    eap_graph = Graph.from_json(os.path.join(HERE, "demo_EAP_patching.json"))
    eap_graph.scores[:] = torch.from_numpy(distinct(eap_graph.scores.numpy(), real, seed=1))
    eap_graph.to_json(os.path.join(OUT, "demo_eap.json"))
    graphs = {"ifr": "demo_ifr.json", "eap": "demo_eap.json"}

    # --- greedy curves, as run_evaluation.py for information-flow-routes
    model, _ = load_model(os.path.join(ROOT, MODEL), "cpu")
    ds = EAPDataset(CSV)
    dl = ds.to_dataloader(BATCH_SIZE)
    metric = partial(get_metric("logit_diff", "ioi", model.tokenizer, model), mean=False, loss=False)
    out["n_examples"] = len(ds)
    out["clean"] = evaluate_baseline(model, dl, metric, quiet=True).mean().item()
    empty = Graph.from_json(os.path.join(OUT, graphs["ifr"]))
    empty.apply_topn(0, True)
    out["empty"] = evaluate_graph(model, empty, dl, metric, quiet=True).mean().item()
    out["greedy"] = []
    for name, fname in graphs.items():
        for absolute in (False, True):
            graph = Graph.from_json(os.path.join(OUT, fname))
            counts, area_under, area_from_1, average, faith = evaluate_area_under_curve(
                model, graph, dl, metric, quiet=True, level="edge", absolute=absolute, apply_greedy=True)
            out["greedy"].append({"graph": fname, "scores": name, "absolute": absolute,
                                  "weighted_edge_counts": [float(c) for c in counts], "area_under": area_under,
                                  "area_from_1": area_from_1, "average": average, "faithfulnesses": faith})
            print(f"greedy {name} absolute={absolute}: area_under {area_under:.6f} area_from_1 {area_from_1:.6f} "
                  f"f {[round(f, 4) for f in faith]} counts {counts}", flush=True)

    # --- ties: the reference's greedy circuits depend on the string hash seed
    runs = []
    for seed in range(4):
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--eap-ig", eap_ig_path, "--mib", mib_path,
                              "--greedy-circuits"], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    differ = [any(runs[s][k] != runs[0][k] for s in range(1, 4)) for k in range(len(PERCENTAGES))]
    out["tie_dependence"] = {"scores": "../ifr/demo.json, NaNs replaced, ties kept", "hash_seeds": [0, 1, 2, 3],
                             "percentages": list(PERCENTAGES), "circuits_differ": differ,
                             "n_sizes_differing": int(sum(differ))}
    print("tie dependence:", differ, flush=True)

    # --- .pt files, beside the reference's JSON of the same graph
    top = Graph.from_json(os.path.join(HERE, "demo_EAP_patching.json"))
    top.apply_topn(TRUTH_N, True)
    top.to_pt(os.path.join(OUT, "demo_eap_top40.pt"))
    top.to_json(os.path.join(OUT, "demo_eap_top40.json"))
    out["pt"] = [{"pt": "demo_eap_top40.pt", "json": "demo_eap_top40.json",
                  "edges_in_graph": top.count_included_edges()}]
    for level in ("node", "neuron"):
        g = Graph.from_json(os.path.join(HERE, "mib", f"demo_{level}_EAP.json"))
        g.to_pt(os.path.join(OUT, f"demo_{level}.pt"))
        out["pt"].append({"pt": f"demo_{level}.pt", "json": f"../mib/demo_{level}_EAP.json"})

    # --- InterpBench's AUROC: greedy circuits of the hypothesis against a known circuit
    truth = Graph.from_json(os.path.join(HERE, "demo_EAP_patching.json"))
    truth.apply_topn(TRUTH_N, True)
    truth.scores[:] = 0  # a ground-truth circuit carries membership, not scores
    truth.to_json(os.path.join(OUT, "demo_truth.json"))
    hypothesis = Graph.from_json(os.path.join(OUT, graphs["ifr"]))
    roc = evaluate_area_under_roc(Graph.from_json(os.path.join(OUT, "demo_truth.json")), hypothesis)
    auroc = area_under_curve_of_print_results(mib_path)(roc["FPR"], roc["TPR"])
    out["auroc"] = {"reference": "demo_truth.json", "hypothesis": graphs["ifr"],
                    "truth_edges": truth.count_included_edges(), **roc, "auroc": auroc}
    print(f"auroc {auroc:.6f} TPR {roc['TPR']} FPR {roc['FPR']}", flush=True)

    with open(os.path.join(OUT, "extras.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eap-ig", required=True, help=f"hannamw/EAP-IG at {EAP_IG_COMMIT} (PATH/src goes on sys.path)")
    ap.add_argument("--mib", required=True, help=f"hannamw/MIB-circuit-track at {MIB_COMMIT}")
    ap.add_argument("--greedy-circuits", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.greedy_circuits:
        greedy_circuits(os.path.abspath(args.eap_ig), os.path.abspath(args.mib))
    else:
        main(os.path.abspath(args.eap_ig), os.path.abspath(args.mib))
