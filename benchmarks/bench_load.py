"""Loading a checkpoint: wall seconds and peak RSS of ``load_model`` in a fresh process.

    python benchmarks/bench_load.py --shape llama-3.2-1b --dtype float16 --out benchmarks/results/load_llama1b_cpu
    cd OLD_CHECKOUT && PYTHONPATH=$PWD python /path/to/bench_load.py ... --out OUT_old   # another revision

The checkpoint (``bench_large.build_checkpoint``: Hugging Face's Llama names, random
weights, one ``model.safetensors``) is written once under ``--work``, so every revision
reads the same file; its pages are in the page cache after the first run (reported: the
first run's figures include reading the file). Each run is a new interpreter that imports
jaxinterp, then times ``load_model`` until its parameters are ready on the device; peak
RSS is the child's (``ru_maxrss``), the whole process. An older checkout without
``jaxinterp/conversion`` needs the link ``jaxinterp/conversion -> ../conversion`` so that
its own converter, not the installed one, is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench_large import SHAPES, build_checkpoint
from common import machine, write_json, write_report

_CHILD = """
import json, os, resource, sys, time
import jax, jaxinterp
from jaxinterp.conversion import hf
t = time.perf_counter()
model = jaxinterp.load_model(sys.argv[1])
jax.block_until_ready(model.params)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "converter": os.path.relpath(hf.__file__), "params": sum(x.size for x in jax.tree.leaves(model.params))}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="of the stored weights")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "jaxinterp_bench_load"))
    ap.add_argument("--out", required=True, help="output prefix: OUT.json and OUT.md")
    args = ap.parse_args()
    path = build_checkpoint(os.path.join(args.work, f"{args.shape}-{args.dtype}"), SHAPES[args.shape], args.dtype)
    file_gb = os.path.getsize(os.path.join(path, "model.safetensors")) / 2 ** 30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.getcwd()).stdout.strip()
    runs = []
    for i in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", _CHILD, path], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"load failed:\n{out.stderr[-3000:]}")
        runs.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), load=os.getloadavg()[0]))
        print(f"run {i}: {runs[-1]['seconds']:.2f} s, {runs[-1]['peak_rss_gb']:.2f} GB", flush=True)
    result = {"command": " ".join(sys.argv), "commit": commit, "machine": machine(), "shape": args.shape,
              "stored_dtype": args.dtype, "file_gb": file_gb, "params": runs[0]["params"], "runs": runs,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_json(args.out + ".json", result)
    write_report(args.out + ".md", [
        f"# load_model: {args.shape}, {args.dtype} safetensors ({file_gb:.2f} GB, {runs[0]['params'] / 1e9:.2f} B "
        f"parameters, float32 on the device)", "",
        f"`{result['command']}` at {commit} ({runs[0]['converter']}); {machine()['cpu']}, "
        f"{machine()['cores']} cores; {result['date']}. Fresh process per run; the first reads the file.", "",
        "| run | seconds | peak RSS (GB) | load (1 min) |", "|---|---|---|---|",
        *[f"| {i} | {r['seconds']:.2f} | {r['peak_rss_gb']:.2f} | {r['load']:.1f} |" for i, r in enumerate(runs)]])


if __name__ == "__main__":
    main()
