"""The main job out of the box: circuits of the shipped demo model on IOI.

``jaxinterp demo`` generates IOI prompt pairs, scores every edge with EAP, EAP-IG-inputs
and exact patching, and writes to the output directory:

* ``faithfulness.png``: faithfulness of the top-n circuits of each method, one figure;
* ``circuit.png`` (+ ``circuit.dot``): the smallest EAP-IG circuit reaching 80% faithfulness;
* ``report.md`` and ``results.json``: faithfulness at several sizes, and how well EAP and
  EAP-IG scores agree with exact patching (the ground truth they approximate);
* ``ioi.csv`` and one graph JSON per method (the reference's format).
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np

from .loading import demo_model_dir  # noqa: F401 (the demo model's home; imported from here too)

DEMO_SEED = 20261123


EXACT_MAX_EDGES = 20000  # the demo runs exact patching (the ground truth) up to this many edges


def _model_name(model: Optional[str]) -> str:
    """How the pictures and the report name the model (``--model`` as given)."""
    if model is None or os.path.abspath(model) == os.path.abspath(demo_model_dir()):
        return "the demo model"
    return os.path.basename(os.path.normpath(model))


def _sizes(n_edges: int) -> list[int]:
    sizes = sorted({int(round(x)) for x in np.geomspace(1, n_edges, 24)} | {n_edges})
    return [s for s in sizes if s >= 1]


def run_demo(model: Optional[str] = None, out_dir: str = "jaxinterp-demo", n_examples: int = 64,
             batch_size: int = 32, methods=("EAP", "EAP-IG-inputs", "exact"), ig_steps: int = 5) -> dict:
    from . import tasks
    from .attribution import attribute
    from .interventions import prepare_data
    from .compare import score_agreement
    from .evaluation import faithfulness_curve
    from .graph import Graph
    from .loading import load_model
    from .errors import require_finite
    from .io import atomic_write_text, dumps
    from .plots import draw_circuit, plot_curves

    from .data import check_batch_size

    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"the number of IOI pairs must be an integer >= 1, got {n_examples!r}")
    check_batch_size(batch_size)
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    model_dir = model or demo_model_dir()
    m = load_model(model_dir)
    csv_path = os.path.join(out_dir, "ioi.csv")
    if tasks.word_level(m.tokenizer):  # the shipped model: prompts of its own words
        tasks.write_pairs_csv("ioi", n_examples, csv_path, m.tokenizer, seed=DEMO_SEED)
    else:  # a pretrained model (e.g. smollm2): natural prompts, single-token names for its tokenizer
        tasks.write_rows_csv(tasks.generate_real("ioi", n_examples, m.tokenizer, seed=DEMO_SEED), csv_path)
    pairs, _ = prepare_data(m, csv_path, "logit_diff")
    spec = m.graph_spec
    if "exact" in methods and spec.n_edges > EXACT_MAX_EDGES:
        # one forward pass per edge and batch: hours for a real model's ~10^5 edges on a CPU
        methods = tuple(x for x in methods if x != "exact")
        print(f"exact patching skipped: {spec.n_edges} edges (more than {EXACT_MAX_EDGES})")
    print(f"model {model_dir}: {m.cfg.n_layers} layers x {m.cfg.n_heads} heads, {spec.n_edges} edges; "
          f"{len(pairs)} IOI pairs")

    graphs, seconds = {}, {}
    for method in methods:
        t = time.perf_counter()
        graphs[method] = attribute(m, pairs, method=method, ig_steps=ig_steps, batch_size=batch_size)
        seconds[method] = time.perf_counter() - t
        graphs[method].to_json(os.path.join(out_dir, f"graph_{method}.json"))

    sizes = _sizes(spec.n_edges)
    curves = {method: faithfulness_curve(m, g, pairs, sizes, batch_size=batch_size, label=method, quiet=False)
              for method, g in graphs.items()}
    for method, c in curves.items():  # before anything is drawn or reported
        require_finite({"circuit metric values": c.metric, "full model": c.clean, "empty circuit": getattr(c, "empty", None),
                        "faithfulness": c.faithfulness}, f"{method} faithfulness curve")
    plot_curves(list(curves.values()), os.path.join(out_dir, "faithfulness.png"),
                title=f"IOI on {_model_name(model)}: faithfulness of top-n circuits ({len(pairs)} pairs)")

    real = spec.real_edge_mask
    agreement = {}
    if "exact" in graphs:
        for method in methods:
            if method != "exact":
                agreement[method] = score_agreement(graphs[method].scores, graphs["exact"].scores, real,
                                                    ks=(10, 50))

    circuit_method = "EAP-IG-inputs" if "EAP-IG-inputs" in graphs else methods[0]
    c = curves[circuit_method]
    reach = np.nonzero(c.faithfulness >= 0.8)[0]
    n_circuit = int(c.sizes[reach[0]]) if len(reach) else int(c.sizes[len(c.sizes) // 2])
    g = Graph(spec, graphs[circuit_method].scores).apply_topn(n_circuit)
    draw_circuit(g, os.path.join(out_dir, "circuit.png"),
                 title=f"{circuit_method} top-{n_circuit} circuit ({g.count_included_edges()} edges after pruning)")

    results = {
        "model": model_dir, "n_examples": len(pairs), "n_edges": spec.n_edges, "ig_steps": ig_steps,
        "seconds": seconds, "clean_logit_diff": c.clean, "corrupted_logit_diff": c.corrupted,
        "curves": {k: v.to_dict() for k, v in curves.items()}, "agreement_with_exact": agreement,
        "circuit": {"method": circuit_method, "top_n": n_circuit, "edges": g.count_included_edges(),
                    "edge_names": list(g.edges_in_graph())},
        "total_seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(os.path.join(out_dir, "results.json"), dumps(results, indent=1))
    report = _report(results, curves, agreement)
    atomic_write_text(os.path.join(out_dir, "report.md"), report)
    print(report)
    print(f"wrote {out_dir}/faithfulness.png, circuit.png, report.md, results.json "
          f"({results['total_seconds']:.0f}s in all)")
    return results


def _report(results: dict, curves: dict, agreement: dict) -> str:
    methods = list(curves)
    c0 = next(iter(curves.values()))
    show = [i for i, s in enumerate(c0.sizes) if s in _pick(c0.sizes)]
    lines = [f"# jaxinterp demo: IOI on {_model_name(results['model'])} ({results['n_examples']} pairs, "
             f"{results['n_edges']} edges)", "",
             f"Clean logit difference {results['clean_logit_diff']:.3f}, corrupted "
             f"{results['corrupted_logit_diff']:.3f}.", "",
             "## Faithfulness of top-n circuits", "",
             "| top-n edges | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for i in show:
        lines.append(f"| {c0.sizes[i]} | " + " | ".join(f"{curves[m].faithfulness[i]:.3f}" for m in methods) + " |")
    if agreement:
        lines += ["", "## Agreement with exact patching (all edges)", "",
                  "| method | Pearson | Spearman | top-10 overlap | top-50 overlap |", "|---|---|---|---|---|"]
        for m, a in agreement.items():
            lines.append(f"| {m} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['top10_overlap']:.2f} | "
                         f"{a['top50_overlap']:.2f} |")
    if "EAP" in curves and "EAP-IG-inputs" in curves:
        eap, ig = curves["EAP"].faithfulness, curves["EAP-IG-inputs"].faithfulness
        small = c0.sizes <= results["n_edges"] // 4
        better = int((ig[small] > eap[small] + 1e-6).sum())
        worse = int((ig[small] < eap[small] - 1e-6).sum())
        lines += ["", "## Is EAP-IG more faithful than EAP at equal size?", "",
                  f"Over the {int(small.sum())} sizes up to a quarter of all edges, EAP-IG-inputs' circuit is "
                  f"more faithful at {better}, less faithful at {worse}; mean faithfulness "
                  f"EAP-IG {np.nanmean(ig[small]):.3f} vs EAP {np.nanmean(eap[small]):.3f}."]
    lines += ["", "## Time (seconds, including compilation)", ""]
    lines += [f"- {m}: {s:.1f}" for m, s in results["seconds"].items()]
    return "\n".join(lines) + "\n"


def _pick(sizes) -> set:
    """About eight sizes spread over the curve for the table."""
    idx = np.unique(np.linspace(0, len(sizes) - 1, 8).round().astype(int))
    return {int(sizes[i]) for i in idx}
