"""Throughput of jaxinterp attribution on a GPT-2-small-shaped random model.

    python benchmarks/bench_attribution.py --examples 64 --batch-size 32 \
        --out benchmarks/results/attribution_cpu.json

Measures, per method: compilation (first batch minus a steady batch), steady-state
seconds per batch, examples/s, and peak RSS (and GPU memory on a GPU). With
``--eval-circuits K``, also circuit evaluation (``interventions.batch_circuit_metrics``,
what ``curve`` and ``evaluate`` run): K nested top-n circuits of random scores, from 0.1%
to 100% of the edges as MIB's sizes, ``--eval-chunk`` per vectorised forward; its
examples/s count each example once per circuit. With ``--profile DIR``, one more batch of
each is traced with ``jax.profiler`` (into ``DIR/<method>``) and the result's rows carry a
summary of where its time went (the longest events per host thread and device stream).
Numbers only; the comparison against the PyTorch reference lives in ``compare_reference.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Optional

import jax
import numpy as np

from common import (GPT2_SMALL, ensure_checkpoint, gpu_peak_mb, machine, peak_rss_mb, profiled, write_ioi_pairs,
                    write_json)

from jaxinterp import load_model
from jaxinterp.attribution import batch_scores
from jaxinterp.interventions import batch_circuit_metrics, prepare_data


def _timed(call, batches, repeats, profile=None) -> tuple[float, float, Optional[dict]]:
    """``(first call's seconds, median steady seconds per batch, summary of one more call
    traced into the directory profile, or None)`` of ``call(batch)``."""
    t = time.perf_counter()
    jax.block_until_ready(call(batches[0]))
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        for b in batches:
            t = time.perf_counter()
            jax.block_until_ready(call(b))
            times.append(time.perf_counter() - t)
    summary = None if profile is None else profiled(lambda: call(batches[0]), profile)
    return first, float(np.median(times)), summary


def _row(name, pairs, batch_size, n_batches, first, per_batch, per_example=1, **extra) -> dict:
    return {"method": name, "batch_size": batch_size, "n_pos": pairs.n_pos, "first_batch_s": first,
            "compile_s": max(first - per_batch, 0.0), "seconds_per_batch": per_batch,
            "examples_per_s": batch_size * per_example / per_batch, "seconds_for_examples": per_batch * n_batches,
            **extra}


def time_method(model, pairs, metric, method, batch_size, ig_steps, repeats, profile=None):
    batches = list(pairs.batches(batch_size))
    kw = dict(cfg=model.cfg, method=method, metric=metric, ig_steps=ig_steps)
    first, per_batch, summary = _timed(lambda b: batch_scores(model.params, b, **kw), batches, repeats,
                                       profile and os.path.join(profile, method))
    return _row(method, pairs, batch_size, len(batches), first, per_batch,
                ig_steps=ig_steps if "IG" in method else None, profile=summary)


def nested_circuits(spec, n_circuits: int, seed: int = 0) -> np.ndarray:
    """``[circuit, src, dst]`` bool: the top-n real edges of random scores, n from 0.1% of
    the edges to all of them, log-spaced."""
    scores = np.random.default_rng(seed).random(spec.real_edge_mask.shape) * spec.real_edge_mask
    order = np.argsort(-scores, axis=None)
    sizes = np.unique(np.geomspace(max(1, spec.n_edges // 1000), spec.n_edges, n_circuits).astype(int))
    masks = np.zeros((len(sizes),) + scores.shape, bool)
    for mask, n in zip(masks, sizes):
        mask.flat[order[:n]] = True
    return masks


def time_evaluation(model, pairs, metric, batch_size, n_circuits, chunk, repeats, profile=None):
    batches = list(pairs.batches(batch_size))
    masks = jax.numpy.asarray(nested_circuits(model.graph_spec, n_circuits))
    kw = dict(cfg=model.cfg, metric=metric, intervention="patching", chunk=chunk)
    first, per_batch, summary = _timed(lambda b: batch_circuit_metrics(model.params, b, masks, **kw), batches,
                                       repeats, profile and os.path.join(profile, "evaluation"))
    return _row(f"evaluation ({len(masks)} circuits)", pairs, batch_size, len(batches), first, per_batch,
                per_example=len(masks), n_circuits=len(masks), chunk=chunk, profile=summary)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF GPT-2 checkpoint (default: a random GPT-2-small-shaped one)")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default="EAP,EAP-IG-inputs")
    ap.add_argument("--eval-circuits", type=int, default=0, help="also time evaluating this many circuits")
    ap.add_argument("--eval-chunk", type=int, default=8, help="circuits per vectorised forward")
    ap.add_argument("--out", default="benchmarks/results/attribution.json")
    ap.add_argument("--profile", default=None, metavar="DIR", help="trace one more batch of each into DIR")
    args = ap.parse_args()

    path = args.model or ensure_checkpoint(os.path.join(tempfile.gettempdir(), "jaxinterp-gpt2-small-random"),
                                           **GPT2_SMALL)
    model = load_model(path)
    csv_path = write_ioi_pairs(os.path.join(tempfile.gettempdir(), "jaxinterp-bench-ioi.csv"),
                               model.tokenizer, args.examples)
    pairs, metric = prepare_data(model, csv_path, "logit_diff")
    rows = []
    runs = [lambda m=m: time_method(model, pairs, metric, m, args.batch_size, args.ig_steps, args.repeats,
                                    args.profile) for m in args.methods.split(",")]
    if args.eval_circuits:
        runs.append(lambda: time_evaluation(model, pairs, metric, args.batch_size, args.eval_circuits,
                                            args.eval_chunk, args.repeats, args.profile))
    for run in runs:
        r = run()
        rows.append(r)
        method = r["method"]
        print(f"{method:>20}: {r['examples_per_s']:8.1f} examples/s  ({r['seconds_per_batch']:.3f} s/batch of "
              f"{args.batch_size} x {pairs.n_pos} tokens; compile {r['compile_s']:.1f} s)")
    result = {"benchmark": "attribution", "model": path, "shape": GPT2_SMALL if args.model is None else None,
              "n_examples": len(pairs), "machine": machine(), "results": rows, "peak_rss_mb": peak_rss_mb(),
              "peak_gpu_mb": gpu_peak_mb()}
    write_json(args.out, result)
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB, peak GPU memory {result['peak_gpu_mb']} MB -> {args.out}")


if __name__ == "__main__":
    main()
