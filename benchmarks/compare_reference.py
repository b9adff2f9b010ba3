"""jaxinterp against the PyTorch reference (hannamw/EAP-IG), side by side.

Both run in their own process on the same Hugging Face checkpoint, CSV, method, IG steps
and batch size; this script compares wall time, examples/s, peak memory, edge-score
agreement (Pearson, Spearman, max |diff|, top-k overlap) and the faithfulness of top-k
circuits, and writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.

Set-up of the reference (outside this repo; see ``reference_eapig.py``), then e.g.::

    python benchmarks/compare_reference.py --examples 32 --batch-size 32 \
        --methods EAP,EAP-IG-inputs,EAP-IG-activations \
        --ref-python /tmp/refvenv/bin/python --eap-ig-path /tmp/eapig \
        --out benchmarks/results/compare_gpt2small_cpu

Without ``--model`` a random-init GPT-2-small-shaped checkpoint with a word tokenizer is
built once in the temp directory (torch needed for that step only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import GPT2_SMALL, ensure_checkpoint, machine, write_ioi_pairs, write_json  # noqa: E402

from jaxinterp.compare import score_agreement  # noqa: E402
from jaxinterp.graph import GraphSpec  # noqa: E402


def run(cmd: list[str], env=None) -> list[float]:
    """Run ``cmd``; return the 1-minute load average before and after (both tools get
    the same cores: a busy machine slows both, and the JSON says how busy it was)."""
    print("$", " ".join(cmd), flush=True)
    before = os.getloadavg()[0]
    subprocess.run(cmd, check=True, env=env)
    return [before, os.getloadavg()[0]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None, help="pairs CSV (default: IOI-shaped pairs over the word vocabulary)")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--methods", default="EAP,EAP-IG-inputs,EAP-IG-activations")
    ap.add_argument("--evaluate-topn", default="100,1000")
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "python"),
                    help="python of the reference's venv (default: $REF_PYTHON)")
    ap.add_argument("--eap-ig-path", default=os.environ.get("EAP_IG_PATH"),
                    help="local checkout of hannamw/EAP-IG (default: $EAP_IG_PATH)")
    ap.add_argument("--skip-reference", action="store_true", help="reuse reference outputs already in OUT_work/")
    ap.add_argument("--out", required=True, help="output prefix, e.g. benchmarks/results/compare_cpu")
    ap.add_argument("--render", metavar="JSON", help="only rewrite OUT.md and OUT.png from a finished run's JSON")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(result))
        plot(result, args.out + ".png")
        print(markdown(result))
        return
    if not args.eap_ig_path and not args.skip_reference:
        ap.error("--eap-ig-path (or EAP_IG_PATH) must point at a checkout of hannamw/EAP-IG")

    model = args.model or ensure_checkpoint(os.path.join(tempfile.gettempdir(), "jaxinterp-gpt2-small-random"),
                                            **GPT2_SMALL)
    work = args.out + "_work"
    os.makedirs(work, exist_ok=True)
    data = args.data
    if data is None:
        from transformers import AutoTokenizer

        data = write_ioi_pairs(os.path.join(work, "pairs.csv"), AutoTokenizer.from_pretrained(model), args.examples)
    with open(os.path.join(model, "config.json")) as f:
        hf = json.load(f)
    spec = GraphSpec(hf["n_layer"], hf["n_head"])
    rows = []
    for method in args.methods.split(","):
        common = ["--model", model, "--data", data, "--method", method, "--ig-steps", str(args.ig_steps),
                  "--batch-size", str(args.batch_size), "--evaluate-topn", args.evaluate_topn]
        ref_prefix, jax_prefix = os.path.join(work, f"ref_{method}"), os.path.join(work, f"jax_{method}")
        load = {}
        if not args.skip_reference:
            load["reference"] = run([args.ref_python, os.path.join(HERE, "reference_eapig.py"), *common,
                 "--eap-ig-path", args.eap_ig_path, "--out", ref_prefix])
        load["jaxinterp"] = run([sys.executable, os.path.join(HERE, "run_jaxinterp.py"), *common, "--out", jax_prefix])
        ref, ours = np.load(ref_prefix + ".npy"), np.load(jax_prefix + ".npy")
        with open(ref_prefix + ".json") as f:
            ref_info = json.load(f)
        with open(jax_prefix + ".json") as f:
            jax_info = json.load(f)
        agreement = score_agreement(ours, ref, spec.real_edge_mask, ks=(100, 1000))
        rows.append({"method": method, "agreement": agreement, "reference": ref_info, "jaxinterp": jax_info,
                     "speedup": ref_info["seconds"] / jax_info["seconds"], "loadavg_1min": load})
        print(f"{method}: reference {ref_info['seconds']:.1f}s, jaxinterp {jax_info['seconds']:.2f}s "
              f"(+{jax_info['compile_seconds'] or 0:.1f}s compile): {rows[-1]['speedup']:.1f}x; "
              f"Pearson {agreement['pearson']:.6f}", flush=True)
    result = {"benchmark": "compare_reference", "model": model, "data": data, "n_examples": args.examples,
              "batch_size": args.batch_size, "ig_steps": args.ig_steps, "machine": machine(), "rows": rows}
    write_json(args.out + ".json", result)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    plot(result, args.out + ".png")
    print(markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cores']} cores), GPU: {m.get('gpu') or 'none'}, jax {m['jax']} "
             f"({m['backend']}); {result['n_examples']} pairs, batch {result['batch_size']}, "
             f"IG steps {result['ig_steps']}.", "",
             "| method | reference s | jaxinterp s (+compile) | speed-up | ref ex/s | jax ex/s | ref RSS MB | "
             "jax RSS MB | Pearson | Spearman | max abs diff / max abs | top-100 | top-1000 | "
             "faithfulness top-k (ref / jax) |",
             "|---" * 14 + "|"]
    for r in result["rows"]:
        a, ref, jx = r["agreement"], r["reference"], r["jaxinterp"]
        faith = []
        rf, jf = _faithfulness(ref), _faithfulness(jx)
        for k in rf:
            faith.append(f"{k}: {rf[k]:.3f} / {jf.get(k, float('nan')):.3f}")
        n = result["n_examples"]
        lines.append(f"| {r['method']} | {ref['seconds']:.1f} | {jx['seconds']:.2f} (+{jx['compile_seconds'] or 0:.1f}) | "
                     f"{r['speedup']:.1f}x | {n / ref['seconds']:.2f} | {jx['examples_per_s']:.1f} | "
                     f"{ref.get('peak_rss_mb', 0):.0f} | {jx['peak_rss_mb']:.0f} | {a['pearson']:.6f} | "
                     f"{a['spearman']:.6f} | {a['max_abs_diff']:.2e} / {a['max_abs']:.2e} | "
                     f"{a['top100_overlap']:.2f} | {a['top1000_overlap']:.2f} | {'; '.join(faith)} |")
    return "\n".join(lines) + "\n"


def _faithfulness(info: dict) -> dict:
    """``{top-n: normalised faithfulness}`` from either tool's JSON: the reference script
    writes a list of ``{topn, graph, baseline, corrupted_baseline}``, ours a dict."""
    f = info.get("faithfulness") or {}
    if isinstance(f, list):
        f = {"baseline": f[0]["baseline"], "corrupted_baseline": f[0]["corrupted_baseline"],
             "topn": {str(x["topn"]): x["graph"] for x in f}} if f else {}
    if not f:
        return {}
    span = f["baseline"] - f["corrupted_baseline"]
    return {k: (v - f["corrupted_baseline"]) / span for k, v in f["topn"].items()}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r["method"] for r in result["rows"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    a1.bar(methods, [r["speedup"] for r in result["rows"]], color="#4a86e8")
    a1.set_ylabel("reference time / jaxinterp time")
    a1.set_title("speed-up (after compilation)")
    a2.bar(methods, [r["agreement"]["pearson"] for r in result["rows"]], color="#6aa84f")
    a2.set_ylim(min(0.99, min(r["agreement"]["pearson"] for r in result["rows"]) - 0.001), 1.0)
    a2.set_title("Pearson correlation of edge scores")
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
