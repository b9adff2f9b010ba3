"""ACDC against EAP and EAP-IG circuits of equal size, and compiled ACDC against the loop.

    python benchmarks/bench_acdc.py --examples 64 --out benchmarks/results/acdc_cpu

On the shipped demo model (3 layers x 4 heads, 262 edges) and IOI pairs generated as
``jaxinterp demo`` does:

* ACDC (KL to the clean model, the default) at several thresholds; for each circuit of
  ``n`` edges, the top-``n`` circuits of EAP and EAP-IG-inputs (logit difference scores):
  normalised faithfulness of the logit difference for all three, and the overlap of each
  with ACDC's edges (|A & B| / |ACDC|).
* Time of the compiled ACDC (``jaxinterp.acdc.acdc``: one compiled call per downstream
  input, a ``lax.scan`` over its edges) and of the loop implementation
  (``devtools/acdc_loop.py``: one ``evaluate_masks`` call per edge), at the same threshold,
  and whether their circuits agree.

Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from common import machine, peak_rss_mb, write_json  # puts the repository root on sys.path (devtools)

from devtools.acdc_loop import loop_acdc  # noqa: E402

from jaxinterp import load_model, tasks  # noqa: E402
from jaxinterp.acdc import acdc  # noqa: E402
from jaxinterp.attribution import attribute  # noqa: E402
from jaxinterp.interventions import prepare_data  # noqa: E402
from jaxinterp.demo import DEMO_SEED, demo_model_dir  # noqa: E402
from jaxinterp.evaluation import evaluate_baseline, evaluate_masks, normalized_faithfulness  # noqa: E402
from jaxinterp.graph import Graph  # noqa: E402


def timed(f, *args, **kw):
    t = time.perf_counter()
    out = f(*args, **kw)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--thresholds", default="0.0003,0.001,0.003,0.01,0.03,0.1")
    ap.add_argument("--loop-threshold", type=float, default=0.01, help="threshold of the compiled-vs-loop timing")
    ap.add_argument("--out", default="benchmarks/results/acdc_cpu")
    args = ap.parse_args()

    model = load_model(demo_model_dir())
    csv_path = os.path.join(tempfile.gettempdir(), "jaxinterp-bench-acdc-ioi.csv")
    tasks.write_pairs_csv("ioi", args.examples, csv_path, model.tokenizer, seed=DEMO_SEED)
    pairs, _ = prepare_data(model, csv_path, "logit_diff")
    spec = model.graph_spec
    bs = args.batch_size
    print(f"demo model: {spec.n_layers} layers x {spec.n_heads} heads, {spec.n_edges} edges; {len(pairs)} IOI pairs")

    eap, eap_s = timed(attribute, model, pairs, method="EAP", batch_size=bs, quiet=True)
    ig, ig_s = timed(attribute, model, pairs, method="EAP-IG-inputs", ig_steps=5, batch_size=bs, quiet=True)
    clean = evaluate_baseline(model, pairs, batch_size=bs)
    empty = evaluate_baseline(model, pairs, batch_size=bs, run_corrupted=True)

    rows, acdc_seconds = [], []
    for threshold in [float(t) for t in args.thresholds.split(",")]:
        g, seconds = timed(acdc, model, pairs, threshold, batch_size=bs, quiet=True)
        acdc_seconds.append(seconds)
        n = g.count_included_edges()
        circuits = {"ACDC": g}
        for name, scored in (("EAP", eap), ("EAP-IG-inputs", ig)):
            circuits[name] = Graph(scored.spec, scored.scores).apply_topn_at_least(n)
        masks = np.stack([c.in_graph for c in circuits.values()])
        values = evaluate_masks(model, masks, pairs, "logit_diff", batch_size=bs)
        kl = evaluate_masks(model, g.in_graph[None], pairs, "kl_div", batch_size=bs)[0]
        row = {"threshold": threshold, "acdc_edges": n, "acdc_seconds": seconds, "acdc_kl": float(kl)}
        for (name, c), v in zip(circuits.items(), values):
            row[name] = {"edges": c.count_included_edges(), "logit_diff": float(v),
                         "faithfulness": float(normalized_faithfulness(v, clean, empty)),
                         "overlap_with_acdc": float((c.in_graph & g.in_graph).sum() / max(n, 1))}
        rows.append(row)
        print(f"threshold {threshold:g}: ACDC {n} edges ({seconds:.1f}s), faithfulness ACDC "
              f"{row['ACDC']['faithfulness']:.3f} / EAP {row['EAP']['faithfulness']:.3f} / EAP-IG "
              f"{row['EAP-IG-inputs']['faithfulness']:.3f}; overlap EAP {row['EAP']['overlap_with_acdc']:.2f}, "
              f"EAP-IG {row['EAP-IG-inputs']['overlap_with_acdc']:.2f}")

    # compiled vs loop at one threshold; the compiled program exists by now, so time it twice
    kl_pairs, _ = prepare_data(model, csv_path, "kl_div")
    compiled, compiled_s = timed(acdc, model, kl_pairs, args.loop_threshold, batch_size=bs, quiet=True)
    (loop_graph, _, n_evaluations), loop_s = timed(loop_acdc, model, kl_pairs, args.loop_threshold, batch_size=bs)
    pruned = Graph(spec)
    pruned.in_graph[:] = loop_graph
    pruned.nodes_in_graph[:] = True
    pruned.prune()
    timing = {"threshold": args.loop_threshold, "compiled_first_call_s": acdc_seconds[0],
              "compiled_s": compiled_s, "loop_s": loop_s, "evaluations": n_evaluations,
              "speedup": loop_s / compiled_s, "same_circuit": bool((pruned.in_graph == compiled.in_graph).all()),
              "edges": compiled.count_included_edges()}
    print(f"compiled ACDC {compiled_s:.2f}s (first call with compilation {acdc_seconds[0]:.1f}s) vs loop "
          f"{loop_s:.2f}s ({n_evaluations} evaluations): {timing['speedup']:.1f}x; same circuit: "
          f"{timing['same_circuit']}")

    result = {"benchmark": "acdc", "model": "jaxinterp demo model", "n_examples": len(pairs),
              "n_edges": spec.n_edges, "batch_size": bs, "clean_logit_diff": clean, "corrupted_logit_diff": empty,
              "attribution_seconds": {"EAP": eap_s, "EAP-IG-inputs": ig_s}, "rows": rows, "timing": timing,
              "machine": machine(), "peak_rss_mb": peak_rss_mb(), "command": " ".join(sys.argv)}
    write_json(args.out + ".json", result)
    with open(args.out + ".md", "w") as f:
        f.write(report(result))
    print(f"-> {args.out}.json, {args.out}.md")


def report(r: dict) -> str:
    m, t = r["machine"], r["timing"]
    lines = [f"# ACDC vs EAP / EAP-IG on the demo model (IOI, {r['n_examples']} pairs, {r['n_edges']} edges)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), jax {m['jax']} ({m['backend']}). "
             f"Command: `python {r['command']}`.", "",
             "ACDC uses KL to the clean model; EAP and EAP-IG-inputs (5 steps) score the logit difference "
             "and keep their smallest top-m circuit with at least ACDC's edge count after pruning. Faithfulness is the "
             f"normalised logit difference (clean {r['clean_logit_diff']:.3f}, corrupted "
             f"{r['corrupted_logit_diff']:.3f}); overlap = shared edges / ACDC's edges.", "",
             "| threshold | edges (ACDC / EAP / EAP-IG) | KL of ACDC circuit | faithfulness ACDC | EAP | EAP-IG | "
             "overlap EAP | overlap EAP-IG | ACDC s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        a, e, g = row["ACDC"], row["EAP"], row["EAP-IG-inputs"]
        lines.append(f"| {row['threshold']:g} | {a['edges']} / {e['edges']} / {g['edges']} | {row['acdc_kl']:.4f} | "
                     f"{a['faithfulness']:.3f} | {e['faithfulness']:.3f} | {g['faithfulness']:.3f} | "
                     f"{e['overlap_with_acdc']:.2f} | {g['overlap_with_acdc']:.2f} | {row['acdc_seconds']:.1f} |")
    lines += ["", "## Compiled ACDC vs the loop implementation", "",
              f"Threshold {t['threshold']:g} ({t['edges']} edges): compiled {t['compiled_s']:.2f} s "
              f"(first call, with compilation: {t['compiled_first_call_s']:.1f} s), loop {t['loop_s']:.2f} s "
              f"({t['evaluations']} circuit evaluations, one `evaluate_masks` call each): "
              f"**{t['speedup']:.1f}x**. Same circuit: {t['same_circuit']}.", "",
              f"EAP took {r['attribution_seconds']['EAP']:.1f} s and EAP-IG-inputs "
              f"{r['attribution_seconds']['EAP-IG-inputs']:.1f} s for all edges (with compilation)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
