"""Score ensembles and optimal ablation on the shipped demo model (the README's MIB figures).

    python benchmarks/bench_ensemble_oa.py --out benchmarks/results/ensemble_oa_demo_cpu.json

Demo model (3 layers x 4 heads, 262 edges), IOI pairs generated as ``jaxinterp demo``
does: 64 to attribute on (seed 0), 64 others to score on (seed 1).

* EAP, EAP-IG-inputs and exact patching scores, and ensembles of the three
  (:mod:`jaxinterp.ensemble`: mean; mean per destination; max and min of |score|), each
  scored with MIB's CPR and CMD (:func:`jaxinterp.mib.score_graph`, patching).
* Optimal ablation (:mod:`jaxinterp.optimal_ablation`, MIB's oa.py settings: lr 1e-3, at
  most 1,000 steps, early stop 10/3) on the training prompts: each node's next-token loss
  at the node means and at the learned constants; the three methods' graphs scored with
  ``mean`` and with ``optimal`` ablation (m(N), m(empty), CPR, CMD).

Writes one JSON with every figure, the times, the load and the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import machine, peak_rss_mb, write_json

from jaxinterp import load_model
from jaxinterp.attribution import attribute
from jaxinterp.ensemble import ensemble_graphs
from jaxinterp.loading import demo_model_dir
from jaxinterp.mib import score_graph
from jaxinterp.optimal_ablation import learn_optimal_ablation, save
from jaxinterp.tasks import write_task_csv

METHODS = ("EAP", "EAP-IG-inputs", "exact")
ENSEMBLES = (("mean", False, False), ("mean", True, False), ("max", False, True), ("min", False, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON of the figures")
    parser.add_argument("--n", type=int, default=64, help="pairs to attribute on, and as many to score on")
    parser.add_argument("--oa-steps", type=int, default=1000, help="optimal ablation's steps (default: oa.py's 1000)")
    args = parser.parse_args()
    t0, load_start = time.time(), os.getloadavg()[0]
    work = tempfile.mkdtemp()
    model = load_model(demo_model_dir())
    train, test = os.path.join(work, "train.csv"), os.path.join(work, "test.csv")
    write_task_csv("ioi", args.n, train, model, seed=0)
    write_task_csv("ioi", args.n, test, model, seed=1)
    res = {"n_edges": model.graph_spec.n_edges, "n_nodes": model.graph_spec.n_forward, "n_pairs": args.n,
           "times": {}}
    graphs = {}
    for method in METHODS:
        t = time.time()
        graphs[method] = attribute(model, train, method=method, batch_size=32, quiet=True)
        res["times"][method] = time.time() - t
    for how, per_dst, absolute in ENSEMBLES:
        name = f"ensemble {how}{' per-destination' if per_dst else ''}{' of |score|' if absolute else ''}"
        graphs[name] = ensemble_graphs([graphs[m] for m in METHODS], how, per_destination=per_dst, absolute=absolute)
    res["patching"] = {}
    for name, graph in graphs.items():
        s = score_graph(model, graph, test, batch_size=32)
        res["patching"][name] = {"cpr": s.cpr, "cmd": s.cmd}
        print(f"{name:>45}: CPR {s.cpr:.4f}  CMD {s.cmd:.4f}", flush=True)
    t = time.time()
    oa = learn_optimal_ablation(model, train, steps=args.oa_steps, lr=1e-3, batch_size=16, quiet=False)
    res["times"]["optimal_ablation"] = time.time() - t
    res["optimal_ablation"] = {"steps": len(oa.history["loss"]), "start_losses": oa.start_losses.tolist(),
                               "losses": oa.losses.tolist(), "nodes": oa.node_names}
    print(f"optimal ablation: {len(oa.history['loss'])} steps, mean loss {np.mean(oa.start_losses):.3f} -> "
          f"{np.mean(oa.losses):.3f}", flush=True)
    path = os.path.join(work, "oa.npz")
    save(oa, path)
    for intervention, data in (("mean", None), ("optimal", path)):
        res[intervention] = {}
        for name in METHODS:
            s = score_graph(model, graphs[name], test, batch_size=32, intervention=intervention, intervention_data=data)
            res[intervention][name] = {"cpr": s.cpr, "cmd": s.cmd, "m_full": s.model, "m_empty": s.empty}
    res.update(total_seconds=time.time() - t0, load=[load_start, os.getloadavg()[0]], peak_rss_mb=peak_rss_mb(),
               machine=machine())
    write_json(args.out, res)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
