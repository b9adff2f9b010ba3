"""Exact patching: seconds per edge, relative to a plain forward pass of the same batch.

Each patched run starts at its destination's layer from the clean residual stream
(``forward(resume=...)``) since the scale issue's item 5; before, every patched run was a
whole forward pass. Run this file in two checkouts to compare (the code is what is on
``PYTHONPATH``), in the same time window, since the machine is shared::

    python benchmarks/bench_exact.py --out benchmarks/results/exact_cpu_after.json
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_exact.py --out .../exact_cpu_before.json

A random-init GPT-2 of ``--layers`` layers (``--heads`` heads, ``--d-model``) on ``--n``
IOI-shaped pairs in one batch. Timed after a first call that compiles. The plain forward
is the jitted ``Model`` call on the clean prompts, best of 5. Reports the seconds of
``attribute(method="exact")``, per edge, and per edge / plain forward (1.0 = each edge
costs one forward pass of the batch).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import ensure_checkpoint, machine, write_ioi_pairs, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--exact-chunk", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import jax
    import numpy as np

    import jaxinterp
    from jaxinterp.attribution import attribute
    from jaxinterp.interventions import prepare_data

    work = os.path.join(tempfile.gettempdir(), f"bench_exact_{args.layers}L{args.heads}H{args.d_model}")
    ensure_checkpoint(work, n_layer=args.layers, n_head=args.heads, n_embd=args.d_model, n_positions=64)
    model = jaxinterp.load_model(work)
    csv = write_ioi_pairs(os.path.join(work, "pairs.csv"), model.tokenizer, args.n)
    pairs, _ = prepare_data(model, csv, "logit_diff")
    kw = dict(method="exact", batch_size=args.n, exact_chunk=args.exact_chunk, quiet=True)
    t0 = time.perf_counter()
    attribute(model, pairs, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = attribute(model, pairs, **kw)
    second = time.perf_counter() - t0
    tokens = np.asarray(pairs.clean)
    jax.block_until_ready(model(tokens))
    forward = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(model(tokens))
        forward.append(time.perf_counter() - t0)
    n_edges = model.graph_spec.n_edges
    per_edge = second / n_edges
    where = os.path.dirname(os.path.abspath(jaxinterp.__file__))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True).stdout.strip()
    result = {"command": " ".join(sys.argv), "jaxinterp": where, "commit": commit, "machine": machine(),
              "loadavg": os.getloadavg(), "shape": vars(args), "n_edges": n_edges, "seconds_first": first,
              "seconds": second, "seconds_per_edge": per_edge, "seconds_forward": min(forward),
              "per_edge_over_forward": per_edge / min(forward), "max_abs_score": float(np.abs(graph.scores).max())}
    write_json(args.out, result)
    print(f"{commit[:8]}: {n_edges} edges, exact {second:.1f} s (first call {first:.1f} s), "
          f"{1e3 * per_edge:.2f} ms per edge = {per_edge / min(forward):.2f} plain forwards "
          f"({1e3 * min(forward):.2f} ms); load {os.getloadavg()}")


if __name__ == "__main__":
    main()
