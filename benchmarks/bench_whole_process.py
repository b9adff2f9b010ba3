"""Whole-process ``jaxinterp attribute --method EAP`` against the reference's attribute() call.

What a user waits for is the whole command: starting Python, importing jax, reading the
checkpoint and the tokenizer, compiling (unless jax's persistent cache already holds the
program), scoring and writing the graph. This runs, in one go on the same machine and
checkpoint:

1. hannamw/EAP-IG (``reference_eapig.py`` in ``--ref-python``): only its ``attribute()``
   call is timed (model loading into TransformerLens excluded), the baseline of the ratio;
2. ``jaxinterp attribute`` as a fresh process with an empty compilation cache (**cold**);
3. the same command again, ``--warm`` times, with the cache the cold run filled (**warm**);

and repeats the three ``--rounds`` times, each jaxinterp run's ratio taken against its own
round's reference. On a shared machine either tool's time moves by 15% or more between
minutes (the reference's attribute() took 34-56 s over a few sessions on one VM), so the
figures to quote are the medians over the rounds: the median cold ratio and the median of
all warm ratios.

Every jaxinterp run is timed from outside (wall clock of the child process) with its peak
RSS. ``--jax-python`` picks the interpreter of the jaxinterp runs: a venv made by the
README's own install (``pip install -e .``, no torch) is what a user has, and importing
``transformers`` there does not import torch (where torch is installed, ``transformers``
imports it when the tokenizer is loaded, a few seconds on an idle machine). The scores of
the two tools are compared as a check that both did the same work.

Before the first run the package's bytecode is compiled (``compileall`` on the directories
``--jax-python`` imports ``jaxinterp`` and ``conversion`` from), as ``pip install`` does and
as Python does on a package's first import: where ``PYTHONDONTWRITEBYTECODE`` is set (it is
on the development VM), an editable install otherwise compiled every module from source in
every process (~0.3 s of a warm run's import, measured: importing the CLI 1.99 -> 1.68 s,
median of 10). The reference's imports are outside its timed call.

    python benchmarks/bench_whole_process.py --ref-python /tmp/refvenv/bin/python \\
        --eap-ig-path /tmp/eapig --jax-python /tmp/jvenv/bin/python --rounds 3 --warm 2 \\
        --out benchmarks/results/whole_process_gpt2small_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import GPT2_SMALL, ensure_checkpoint, machine, write_ioi_pairs, write_json, write_report  # noqa: E402

from jaxinterp.compare import score_agreement  # noqa: E402
from jaxinterp.graph import Graph, GraphSpec  # noqa: E402

# runs a command and prints its own children's peak RSS (KiB) last: the timed process's
_MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; w = time.perf_counter() - t; "
            "print('MEASURED', rc, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measured(cmd: list[str], env=None) -> dict:
    """Wall seconds, peak RSS (GB) and the 1-minute load before and after of ``cmd``."""
    print("$", " ".join(cmd), flush=True)
    before = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("MEASURED")]
    if out.returncode or not line or line[-1].split()[1] != "0":
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    _, _, wall, rss = line[-1].split()
    return {"seconds": float(wall), "peak_rss_gb": int(rss) / 2 ** 20, "loadavg_1min": [before, os.getloadavg()[0]]}


def compile_bytecode(python: str) -> None:
    """Compile the bytecode of the packages ``python`` imports ``jaxinterp`` and
    ``conversion`` from (module docstring); an error if it cannot."""
    where = subprocess.run([python, "-c", "import os, jaxinterp, conversion; "
                            "print(os.path.dirname(jaxinterp.__file__)); print(os.path.dirname(conversion.__file__))"],
                           capture_output=True, text=True)
    if where.returncode:
        sys.exit(f"{python} cannot import jaxinterp: {where.stderr[-2000:]}")
    out = subprocess.run([python, "-m", "compileall", "-q", *where.stdout.split()], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"compileall failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", required=True)
    ap.add_argument("--eap-ig-path", required=True)
    ap.add_argument("--jax-python", default=sys.executable, help="interpreter of the jaxinterp runs")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warm", type=int, default=2, help="warm runs after the cold one, per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of reference, cold and warm runs")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "jaxinterp_whole_process"))
    ap.add_argument("--out", required=True, help="output prefix: OUT.json and OUT.md")
    args = ap.parse_args()
    if args.rounds < 1 or args.warm < 0:
        ap.error(f"--rounds must be at least 1 and --warm at least 0 (got {args.rounds} and {args.warm})")

    os.makedirs(args.work, exist_ok=True)
    compile_bytecode(args.jax_python)
    model = ensure_checkpoint(os.path.join(args.work, "gpt2small"), **GPT2_SMALL)
    from transformers import AutoTokenizer

    data = write_ioi_pairs(os.path.join(args.work, "pairs.csv"), AutoTokenizer.from_pretrained(model), args.examples)
    common = ["--model", model, "--data", data, "--method", "EAP", "--batch-size", str(args.batch_size)]

    ref_prefix = os.path.join(args.work, "ref_EAP")
    refs, runs = [], []
    for round_ in range(args.rounds):
        ref_run = measured([args.ref_python, os.path.join(HERE, "reference_eapig.py"), *common,
                            "--eap-ig-path", args.eap_ig_path, "--out", ref_prefix])
        with open(ref_prefix + ".json") as f:
            ref_info = json.load(f)
        ref_seconds = ref_info["seconds"]
        refs.append({"attribute_seconds": ref_seconds, "load_seconds": ref_info.get("seconds_load"),
                     "process": ref_run})
        cache = tempfile.mkdtemp(prefix="cache_", dir=args.work)  # empty: the cold run compiles
        for i in range(1 + args.warm):
            out = os.path.join(args.work, f"jax_EAP_{i}.json")
            r = measured([args.jax_python, "-m", "jaxinterp", "attribute", *common, "--compile-cache", cache,
                          "--out", out])
            r.update(kind="cold" if i == 0 else "warm", round=round_, ratio=ref_seconds / r["seconds"])
            runs.append(r)
            print(f"round {round_} {r['kind']}: {r['seconds']:.1f} s whole process, {r['peak_rss_gb']:.2f} GB; "
                  f"reference attribute() {ref_seconds:.1f} s: {r['ratio']:.1f}x", flush=True)
    median = {kind: float(np.median([r["ratio"] for r in runs if r["kind"] == kind]))
              for kind in ("cold", "warm") if any(r["kind"] == kind for r in runs)}

    spec = GraphSpec(GPT2_SMALL["n_layer"], GPT2_SMALL["n_head"])
    ours = Graph.from_json(os.path.join(args.work, "jax_EAP_0.json")).scores
    agreement = score_agreement(ours, np.load(ref_prefix + ".npy"), spec.real_edge_mask, ks=(100, 1000))
    jax_version = subprocess.run([args.jax_python, "-c", "import jax, importlib.util as u; "
                                  "print(jax.__version__, u.find_spec('torch') is not None)"],
                                 capture_output=True, text=True).stdout.split()
    result = {"command": " ".join(sys.argv), "machine": machine(), "examples": args.examples,
              "batch_size": args.batch_size, "rounds": args.rounds, "reference": refs, "jaxinterp": runs,
              "median_ratio": median, "jaxinterp_python": {"jax": jax_version[0], "torch_installed": jax_version[1],
                                                      "bytecode_compiled_before": True},
              "agreement": agreement, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_json(args.out + ".json", result)
    lines = [f"# Whole-process EAP, GPT-2-small shape, {args.examples} pairs, batch {args.batch_size}", "",
             f"`{result['command']}`", "", f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
             f"{result['date']}. {args.rounds} rounds, each: hannamw/EAP-IG's attribute(), then jaxinterp cold "
             f"(empty cache) and {args.warm} warm. **Median ratio: "
             + ", ".join(f"{kind} {ratio:.1f}x" for kind, ratio in median.items()) + ".**", "",
             "| round | reference attribute() (its process, peak RSS) | jaxinterp run | whole process | peak RSS "
             "| load before / after | reference / it |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        ref = refs[r["round"]]
        lines.append(f"| {r['round']} | {ref['attribute_seconds']:.1f} s ({ref['process']['seconds']:.1f} s, "
                     f"{ref['process']['peak_rss_gb']:.2f} GB) | {r['kind']} | {r['seconds']:.1f} s | "
                     f"{r['peak_rss_gb']:.2f} GB | {r['loadavg_1min'][0]:.1f} / {r['loadavg_1min'][1]:.1f} | "
                     f"{r['ratio']:.1f}x |")
    lines += ["", f"Scores: Pearson {agreement['pearson']:.7f}, top-100 overlap {agreement['top100_overlap']:.2f}. "
              f"jaxinterp's interpreter: jax {jax_version[0]}, torch installed: {jax_version[1]}; jaxinterp's "
              "bytecode compiled before the runs."]
    write_report(args.out + ".md", lines)


if __name__ == "__main__":
    main()
