"""How far jaxinterp's two Gemma 2 head definitions differ (``gemma2_heads``: ``shared``, a
head is its share of the layer's normalised output; ``per-input``, MIB's through the
reference: raw heads, each downstream input renormalising its own mix).

On random Gemma 2 checkpoints (devtools.testing's, ``initializer_range`` 0.3 so that edges
matter) and IOI-shaped pairs over their word vocabulary, for EAP and EAP-IG-inputs: the
Pearson correlation of the two definitions' edge scores, the overlap of their top-k edges,
and the faithfulness of each definition's top-n circuits (MIB's sizes, 0.1% .. 100% of
the edges) evaluated under each definition. Writes ``results/gemma2_heads_cpu.{json,md}``::

    JAX_PLATFORMS=cpu python benchmarks/gemma2_heads.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from devtools.testing import save_random_gemma2, small_vocab, write_ioi_csv  # noqa: E402
from jaxinterp import load_model  # noqa: E402
from jaxinterp.attribution import attribute  # noqa: E402
from jaxinterp.evaluation import evaluate_masks, normalized_faithfulness, topn_masks  # noqa: E402
from jaxinterp.interventions import prepare_data  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "gemma2_heads_cpu")
MODELS = {  # name: overrides of devtools.testing's small Gemma 2
    "2L-4H-d32": dict(),
    "4L-8H-d64": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=16),
}
METHODS = ("EAP", "EAP-IG-inputs")
PERCENTAGES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
N_PAIRS, BATCH, IG_STEPS = 24, 8, 5


def main():
    results = {"n_pairs": N_PAIRS, "ig_steps": IG_STEPS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in MODELS.items():
            path = save_random_gemma2(os.path.join(tmp, name), seed=0, words=small_vocab(), initializer_range=0.3,
                                      **overrides)
            models = {h: load_model(path, gemma2_heads=h) for h in ("shared", "per-input")}
            csv = write_ioi_csv(os.path.join(tmp, f"{name}.csv"), models["shared"].tokenizer, n=N_PAIRS, seed=1)
            pairs, _ = prepare_data(models["shared"], csv, "logit_diff")
            spec = models["shared"].graph_spec
            real = spec.real_edge_mask
            entry = {"n_edges": int(real.sum()), "methods": {}}
            for method in METHODS:
                t = time.perf_counter()
                graphs = {h: attribute(m, pairs, method=method, ig_steps=IG_STEPS, batch_size=BATCH, quiet=True)
                          for h, m in models.items()}
                a, b = (graphs[h].scores[real] for h in ("shared", "per-input"))
                ranks = {h: np.argsort(-np.abs(graphs[h].scores[real])) for h in graphs}
                overlap = {k: len(set(ranks["shared"][:k]) & set(ranks["per-input"][:k])) / k
                           for k in (10, 50, 100) if k <= real.sum()}
                sizes = [max(1, int(p * real.sum())) for p in PERCENTAGES]
                faith = {}
                for chosen in graphs:  # each definition's circuits, evaluated under each definition
                    masks, kept = topn_masks(graphs[chosen], sizes)
                    ends = np.stack([np.zeros_like(real), real])
                    for h, m in models.items():
                        vals = evaluate_masks(m, np.concatenate([masks, ends]), pairs, "logit_diff", "patching", BATCH)
                        faith[f"{chosen} circuits, {h} evaluation"] = {
                            "edges": kept.tolist(),
                            "faithfulness": normalized_faithfulness(vals[:-2], vals[-1], vals[-2]).round(4).tolist()}
                entry["methods"][method] = {"pearson": float(np.corrcoef(a, b)[0, 1]), "top_k_overlap": overlap,
                                            "faithfulness": faith, "seconds": round(time.perf_counter() - t, 1)}
                print(name, method, json.dumps(entry["methods"][method]), flush=True)
            results["models"][name] = entry
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".json", "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# Gemma 2 head definitions: shared vs per-input (MIB's)", "",
             f"Random Gemma 2 checkpoints, {N_PAIRS} IOI-shaped pairs, patching, logit difference; "
             f"EAP-IG-inputs with {IG_STEPS} steps (benchmarks/gemma2_heads.py).", ""]
    for name, entry in results["models"].items():
        for method, r in entry["methods"].items():
            lines += [f"## {name} ({entry['n_edges']} edges), {method}", "",
                      f"Pearson of the scores: {r['pearson']:.4f}; top-k overlap: "
                      + ", ".join(f"k={k}: {v:.2f}" for k, v in r["top_k_overlap"].items()), "",
                      "| circuits / evaluation | " + " | ".join(f"{p:.0%}" for p in PERCENTAGES) + " |",
                      "|---|" + "---|" * len(PERCENTAGES)]
            for what, v in r["faithfulness"].items():
                lines.append(f"| {what} | " + " | ".join(f"{x:.3f} ({n})" for x, n in zip(v["faithfulness"],
                                                                                       v["edges"])) + " |")
            lines.append("")
    with open(OUT + ".md", "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
