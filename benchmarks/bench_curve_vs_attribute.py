"""A faithfulness curve against the attribution it ranks: whole-process time and peak RSS.

On a model (default: the real SmolLM2-135M, ``smollm2``) and IOI pairs made for its
tokenizer, runs as separate processes, one after the other:

1. ``jaxinterp attribute --method EAP --batch-size B``;
2. ``jaxinterp curve`` of that graph over MIB's ten sizes (0.1% .. 100% of the edges) at
   the same batch size, with the default number of circuits per call (as many as fit in
   EAP's memory estimate for the batch, at most 8).

and records each command's wall time, peak RSS and the load. ``--jax-python`` as in
``bench_whole_process.py``.

    python benchmarks/bench_curve_vs_attribute.py --n 32 --batch-size 32 \\
        --jax-python /tmp/jvenv/bin/python --out benchmarks/results/curve_vs_attribute_smollm2_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_whole_process import measured  # noqa: E402
from common import machine, write_json, write_report  # noqa: E402

MIB_PCT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=32, help="IOI pairs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--jax-python", default=sys.executable)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "jaxinterp_curve_vs_attribute"))
    ap.add_argument("--out", required=True, help="output prefix: OUT.json and OUT.md")
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    jx = [args.jax_python, "-m", "jaxinterp"]
    data, graph = os.path.join(args.work, "ioi.csv"), os.path.join(args.work, "eap.json")
    measured([*jx, "generate", "ioi", "--n", str(args.n), "--out", data, "--model", args.model])
    attribute = measured([*jx, "attribute", "--model", args.model, "--data", data, "--method", "EAP",
                          "--batch-size", str(args.batch_size), "--out", graph])
    with open(graph) as f:
        n_edges = sum(1 for e in json.load(f)["edges"].values() if e.get("score") is not None)
    sizes = ",".join(str(max(1, int(p * n_edges))) for p in MIB_PCT)
    curve = measured([*jx, "curve", "--model", args.model, "--data", data, "--graph", graph, "--batch-size",
                      str(args.batch_size), "--sizes", sizes, "--out", os.path.join(args.work, "curve.png")])
    result = {"command": " ".join(sys.argv), "machine": machine(), "model": args.model, "n_pairs": args.n,
              "batch_size": args.batch_size, "n_edges": n_edges, "sizes": sizes, "attribute": attribute,
              "curve": curve, "rss_ratio": curve["peak_rss_gb"] / attribute["peak_rss_gb"],
              "time_ratio": curve["seconds"] / attribute["seconds"],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_json(args.out + ".json", result)
    lines = [f"# Faithfulness curve against attribution: {args.model}, {args.n} IOI pairs, batch {args.batch_size}",
             "", f"`{result['command']}` ({result['date']}; {result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores)", "",
             "| command | whole process | peak RSS | load before / after |", "|---|---|---|---|"]
    for name, r in (("attribute --method EAP", attribute), (f"curve, 10 sizes ({sizes})", curve)):
        lines.append(f"| {name} | {r['seconds']:.0f} s | {r['peak_rss_gb']:.2f} GB | "
                     f"{r['loadavg_1min'][0]:.1f} / {r['loadavg_1min'][1]:.1f} |")
    lines += ["", f"curve / attribute: peak RSS {result['rss_ratio']:.2f}x, time {result['time_ratio']:.2f}x."]
    write_report(args.out + ".md", lines)


if __name__ == "__main__":
    main()
