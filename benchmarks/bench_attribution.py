"""Throughput of jaxinterp attribution on a GPT-2-small-shaped random model.

    python benchmarks/bench_attribution.py --examples 64 --batch-size 32 \
        --out benchmarks/results/attribution_cpu.json

Measures, per method: compilation (first batch minus a steady batch), steady-state
seconds per batch, examples/s, and peak RSS (and GPU memory on a GPU). Numbers only;
the comparison against the PyTorch reference lives in ``compare_reference.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from common import GPT2_SMALL, ensure_checkpoint, gpu_peak_mb, machine, peak_rss_mb, write_ioi_pairs, write_json

from jaxinterp import load_model
from jaxinterp.attribution import batch_scores
from jaxinterp.interventions import prepare_data


def time_method(model, pairs, metric, method, batch_size, ig_steps, repeats):
    batches = list(pairs.batches(batch_size))
    kw = dict(cfg=model.cfg, method=method, metric=metric, ig_steps=ig_steps)
    t = time.perf_counter()
    jax.block_until_ready(batch_scores(model.params, batches[0], **kw))
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        for b in batches:
            t = time.perf_counter()
            jax.block_until_ready(batch_scores(model.params, b, **kw))
            times.append(time.perf_counter() - t)
    per_batch = float(np.median(times))
    return {"method": method, "ig_steps": ig_steps if "IG" in method else None, "batch_size": batch_size,
            "n_pos": pairs.n_pos, "first_batch_s": first, "compile_s": max(first - per_batch, 0.0),
            "seconds_per_batch": per_batch, "examples_per_s": batch_size / per_batch,
            "seconds_for_examples": per_batch * len(batches)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF GPT-2 checkpoint (default: a random GPT-2-small-shaped one)")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default="EAP,EAP-IG-inputs")
    ap.add_argument("--out", default="benchmarks/results/attribution.json")
    args = ap.parse_args()

    path = args.model or ensure_checkpoint(os.path.join(tempfile.gettempdir(), "jaxinterp-gpt2-small-random"),
                                           **GPT2_SMALL)
    model = load_model(path)
    csv_path = write_ioi_pairs(os.path.join(tempfile.gettempdir(), "jaxinterp-bench-ioi.csv"),
                               model.tokenizer, args.examples)
    pairs, metric = prepare_data(model, csv_path, "logit_diff")
    rows = []
    for method in args.methods.split(","):
        r = time_method(model, pairs, metric, method, args.batch_size, args.ig_steps, args.repeats)
        rows.append(r)
        print(f"{method:>20}: {r['examples_per_s']:8.1f} examples/s  ({r['seconds_per_batch']:.3f} s/batch of "
              f"{args.batch_size} x {pairs.n_pos} tokens; compile {r['compile_s']:.1f} s)")
    result = {"benchmark": "attribution", "model": path, "shape": GPT2_SMALL if args.model is None else None,
              "n_examples": len(pairs), "machine": machine(), "results": rows, "peak_rss_mb": peak_rss_mb(),
              "peak_gpu_mb": gpu_peak_mb()}
    write_json(args.out, result)
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB, peak GPU memory {result['peak_gpu_mb']} MB -> {args.out}")


if __name__ == "__main__":
    main()
