"""Learned circuits (Edge Pruning) against EAP-IG's top-n circuits of the same size.

    python benchmarks/bench_edge_pruning.py --out benchmarks/results/edge_pruning_cpu

On the shipped demo model (3 layers x 4 heads, 262 edges) and IOI pairs generated as
``jaxinterp demo`` does (64 to train / score on, 64 more with another seed held out):
for each target size ``n``, masks learned with ``jaxinterp.edge_pruning.learn_circuit``
(objective ``--objective``, from the full model; and initialised from EAP-IG scores) and the top-n
circuit of EAP-IG-inputs, compared at equal edge counts *after pruning* (EAP-IG's top-m
grown until it has at least as many edges as the learned circuit). Normalised
faithfulness of the logit difference on the training pairs and on the held-out pairs.

Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import machine, peak_rss_mb, write_json

from jaxinterp import load_model, tasks
from jaxinterp.attribution import attribute
from jaxinterp.interventions import prepare_data
from jaxinterp.demo import DEMO_SEED, demo_model_dir
from jaxinterp.edge_pruning import learn_circuit
from jaxinterp.evaluation import evaluate_baseline, evaluate_masks, normalized_faithfulness
from jaxinterp.graph import Graph


def faithfulness(model, pairs, masks: np.ndarray) -> np.ndarray:
    values = evaluate_masks(model, masks, pairs, batch_size=32)
    clean = evaluate_baseline(model, pairs, batch_size=32)
    empty = evaluate_baseline(model, pairs, batch_size=32, run_corrupted=True)
    return normalized_faithfulness(values, clean, empty)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--sizes", default="10,20,30,50,80")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--objective", default="logit_diff", choices=["logit_diff", "kl_div"],
                    help="the masks' loss (default: the logit difference the faithfulness measures)")
    ap.add_argument("--out", default="benchmarks/results/edge_pruning_cpu")
    args = ap.parse_args()

    model = load_model(demo_model_dir())
    tmp = tempfile.mkdtemp()
    data = {}
    for split, seed in (("train", DEMO_SEED), ("held_out", DEMO_SEED + 1)):
        path = os.path.join(tmp, f"{split}.csv")
        tasks.write_pairs_csv("ioi", args.examples, path, model.tokenizer, seed=seed)
        data[split] = prepare_data(model, path, "logit_diff")[0]
    eap_ig = attribute(model, data["train"], method="EAP-IG-inputs", ig_steps=5, batch_size=32, quiet=True)

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        row = {"target_edges": n}
        for variant, init in (("learned", None), ("learned_from_eap_ig", eap_ig)):
            t = time.perf_counter()
            result = learn_circuit(model, data["train"], n, objective=args.objective, steps=args.steps,
                                   batch_size=32, init_scores=init, quiet=True)
            seconds = time.perf_counter() - t
            learned = result.graph
            learned.prune()
            k = learned.count_included_edges()
            baseline = Graph(eap_ig.spec, eap_ig.scores).apply_topn_at_least(k)
            masks = np.stack([learned.in_graph, baseline.in_graph])
            train, held = faithfulness(model, data["train"], masks), faithfulness(model, data["held_out"], masks)
            row[variant] = {"edges": k, "eap_ig_edges": baseline.count_included_edges(), "seconds": seconds,
                            "faithfulness_train": float(train[0]), "eap_ig_faithfulness_train": float(train[1]),
                            "faithfulness_held_out": float(held[0]),
                            "eap_ig_faithfulness_held_out": float(held[1])}
            print(n, variant, row[variant], flush=True)
        rows.append(row)

    result = {"machine": machine(), "examples": args.examples, "steps": args.steps, "objective": args.objective,
              "model": "demo (3L x 4H)",
              "n_edges": model.graph_spec.n_edges, "rows": rows, "peak_rss_mb": peak_rss_mb(),
              "command": f"python benchmarks/bench_edge_pruning.py --examples {args.examples} --sizes {args.sizes} "
                         f"--steps {args.steps} --objective {args.objective} --out {args.out}"}
    write_json(args.out + ".json", result)
    lines = [f"# Edge Pruning vs EAP-IG-inputs top-n (demo model, {args.examples} IOI pairs, {args.steps} steps, "
             f"objective {args.objective})", "",
             f"`{result['command']}`", "", f"Machine: {result['machine']}", "",
             "Normalised faithfulness (logit difference) at equal edge counts after pruning; EAP-IG's top-m "
             "grown to at least the learned circuit's edges.", "",
             "| target | variant | edges (learned / EAP-IG) | learned train | EAP-IG train | learned held-out "
             "| EAP-IG held-out | train time |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for variant in ("learned", "learned_from_eap_ig"):
            r = row[variant]
            lines.append(f"| {row['target_edges']} | {variant} | {r['edges']} / {r['eap_ig_edges']} | "
                         f"{r['faithfulness_train']:.3f} | {r['eap_ig_faithfulness_train']:.3f} | "
                         f"{r['faithfulness_held_out']:.3f} | {r['eap_ig_faithfulness_held_out']:.3f} | "
                         f"{r['seconds']:.1f} s |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
