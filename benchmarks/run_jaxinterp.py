"""Run jaxinterp attribution the way ``reference_eapig.py`` runs the reference, for a
side-by-side comparison: same checkpoint, CSV, method, steps and batch size.

    python benchmarks/run_jaxinterp.py --model DIR --data pairs.csv --method EAP \
        --batch-size 32 --out results/prefix

Writes ``PREFIX.npy`` (scores ``[n_forward, n_backward]`` in the reference's
normalisation: gradient methods divided by ``batch_size``, as the reference's batch-mean
metric does; ``exact`` unscaled), ``PREFIX.graph.json`` and ``PREFIX.json`` with
``compile_seconds`` (first batch minus a steady batch), ``seconds`` (all batches, after
compilation, as the reference's attribute() call is timed), peak RSS and peak GPU memory.

Besides the library's methods, ``--method IG-edge-masks`` computes auto-circuit's
"Integrated Edge Gradients" (``reference_autocircuit.py``) with jaxinterp's graph forward,
for the comparison only: every edge coefficient set to ``m = k / steps``, ``k = 0 ..
steps`` (``replace`` mode, so each downstream input is ``x_v + m * sum_u (corrupted_u -
this run's u)``, the gradient flowing through this run's outputs too), the gradient of the
signed metric w.r.t. the coefficients averaged over the ``steps + 1`` points.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import gpu_peak_mb, machine, peak_rss_mb, write_json  # noqa: E402

from jaxinterp import load_model  # noqa: E402
from jaxinterp.attribution import attribute  # noqa: E402
from jaxinterp.interventions import prepare_data  # noqa: E402
from jaxinterp.evaluation import evaluate_baseline, evaluate_graph  # noqa: E402
from jaxinterp.graph import Graph, GraphSpec  # noqa: E402
from jaxinterp.models import EdgeIntervention, forward  # noqa: E402


def _ig_edge_masks_batch(params, batch, *, cfg, metric, ig_steps):
    """Sum over the batch of the per-example IG-edge-masks scores ``[src, dst]`` (built
    from the public graph forward only)."""
    spec = GraphSpec.from_config(cfg)
    mask, at = batch["attention_mask"], batch["lengths"] - 1  # each prompt's last real token
    clean_logits = forward(params, cfg, batch["clean"], mask, logit_positions=at)
    _, corr_outs = forward(params, cfg, batch["corrupted"], mask, return_node_outputs=True, logit_positions=at)
    corr_outs = jax.lax.stop_gradient(corr_outs)
    sign = metric.sign

    def f(coef):
        logits = forward(params, cfg, batch["clean"], mask, EdgeIntervention(coef, corr_outs, mode="replace"),
                         logit_positions=at)
        values = metric(logits, clean_logits, batch)
        return (sign * values * batch["weight"]).sum()

    real = jnp.asarray(spec.real_edge_mask, jnp.float32)

    def step(total, m):
        return total + jax.grad(f)(m * real), None

    ms = jnp.arange(ig_steps + 1, dtype=jnp.float32) / ig_steps
    return jax.lax.scan(step, jnp.zeros_like(real), ms)[0] * real


_ig_edge_masks_jit = jax.jit(_ig_edge_masks_batch, static_argnames=("cfg", "metric", "ig_steps"))


def ig_edge_masks(model, pairs, task_metric, *, ig_steps, batch_size, **_):
    """auto-circuit's Integrated Edge Gradients as a :class:`Graph` of mean scores."""
    total = np.zeros((model.graph_spec.n_forward, model.graph_spec.n_backward), np.float64)
    for batch in pairs.batches(batch_size):
        total += np.asarray(_ig_edge_masks_jit(model.params, batch, cfg=model.cfg, metric=task_metric,
                                               ig_steps=ig_steps))
    return Graph(model.graph_spec, (total / len(pairs) / (ig_steps + 1)).astype(np.float32))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--metric", default="logit_diff")
    ap.add_argument("--evaluate-topn", default=None, help="comma-separated edge counts")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    t = time.perf_counter()
    model = load_model(args.model)
    pairs, task_metric = prepare_data(model, args.data, args.metric)
    seconds_load = time.perf_counter() - t
    compile_s = None
    kw = dict(method=args.method, metric=args.metric, ig_steps=args.ig_steps, batch_size=args.batch_size, quiet=True)
    def run_method(model, pairs, **kw):
        if args.method == "IG-edge-masks":  # the comparison-only method above
            return ig_edge_masks(model, pairs, task_metric, **kw)
        return attribute(model, pairs, **kw)
    if args.method != "exact":
        # warm up through the same call that is timed: one batch twice, the difference is compilation
        head = pairs.head(args.batch_size)
        t = time.perf_counter()
        run_method(model, head, **kw)
        first = time.perf_counter() - t
        t = time.perf_counter()
        run_method(model, head, **kw)
        compile_s = max(first - (time.perf_counter() - t), 0.0)
    t = time.perf_counter()
    graph = run_method(model, pairs, **kw)
    seconds = time.perf_counter() - t

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.save(args.out + ".npy", graph.scores / (1 if args.method == "exact" else args.batch_size))
    graph.to_json(args.out + ".graph.json")
    result = {"implementation": "jaxinterp", "method": args.method, "ig_steps": args.ig_steps,
              "batch_size": args.batch_size, "n_examples": len(pairs), "n_pos": pairs.n_pos,
              "seconds": seconds, "compile_seconds": compile_s, "seconds_load": seconds_load,
              "examples_per_s": len(pairs) / seconds, "peak_rss_mb": peak_rss_mb(),
              "peak_gpu_mb": gpu_peak_mb(), "machine": machine()}
    if args.evaluate_topn:
        clean = evaluate_baseline(model, pairs, args.metric, args.batch_size)
        corrupted = evaluate_baseline(model, pairs, args.metric, args.batch_size, run_corrupted=True)
        result["faithfulness"] = {"baseline": clean, "corrupted_baseline": corrupted, "topn": {}}
        for n in (int(x) for x in args.evaluate_topn.split(",")):
            g = Graph(graph.spec, graph.scores).apply_topn(n)
            result["faithfulness"]["topn"][str(n)] = evaluate_graph(model, g, pairs, args.metric,
                                                                    batch_size=args.batch_size)
    write_json(args.out + ".json", result)
    print(f"{args.method}: {seconds:.2f}s ({result['examples_per_s']:.1f} examples/s), compile {compile_s}")


if __name__ == "__main__":
    main()
