"""jaxinterp against the PyTorch baselines (hannamw/EAP-IG, auto-circuit), side by side.

Each runs in its own process on the same Hugging Face checkpoint, CSV, method, IG steps
and batch size; this script compares wall time, examples/s, peak memory, edge-score
agreement (Pearson, Spearman, max |diff|, top-k overlap) and the faithfulness of top-k
circuits, and writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.

Baselines: hannamw/EAP-IG (``--eap-ig-path``, run by ``--ref-python``;
``reference_eapig.py``) and, optionally, UFO-101/auto-circuit (``--autocircuit-python``;
``reference_autocircuit.py``; EAP and, for ``EAP-IG-inputs``, its nearest method,
"Integrated Edge Gradients" over the edge masks, which jaxinterp then also computes as
``IG-edge-masks`` for a like-for-like check). Either baseline can run alone.

Set-up of the reference (outside this repo; see ``reference_eapig.py``), then e.g.::

    python benchmarks/compare_reference.py --examples 32 --batch-size 32 \
        --methods EAP,EAP-IG-inputs,EAP-IG-activations \
        --ref-python /tmp/refvenv/bin/python --eap-ig-path /tmp/eapig \
        --out benchmarks/results/compare_gpt2small_cpu

auto-circuit alone on a 4-layer, 8-head random model::

    python benchmarks/compare_reference.py --shape 4,8,256 --examples 32 --batch-size 16 \
        --methods EAP,EAP-IG-inputs --evaluate-topn 50,200 \
        --autocircuit-python /tmp/acvenv/bin/python --out benchmarks/results/compare_autocircuit_4L8H_cpu

Without ``--model`` a random-init GPT-2 checkpoint with a word tokenizer is built once in
the temp directory (GPT-2-small-shaped, or ``--shape N_LAYER,N_HEAD,N_EMBD``; torch needed
for that step only).
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
    ap.add_argument("--autocircuit-python", default=os.environ.get("AUTOCIRCUIT_PYTHON"),
                    help="python of auto-circuit's venv: adds auto-circuit as a second baseline "
                         "(default: $AUTOCIRCUIT_PYTHON; see reference_autocircuit.py)")
    ap.add_argument("--shape", default=None, metavar="N_LAYER,N_HEAD,N_EMBD",
                    help="shape of the random checkpoint built without --model (default: GPT-2 small)")
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
    eapig = bool(args.eap_ig_path or args.skip_reference)
    if not eapig and not args.autocircuit_python:
        ap.error("no baseline: give --eap-ig-path (or EAP_IG_PATH; a checkout of hannamw/EAP-IG) "
                 "and/or --autocircuit-python")

    if args.model:
        model = args.model
    elif args.shape:
        n_layer, n_head, n_embd = (int(x) for x in args.shape.split(","))
        path = os.path.join(tempfile.gettempdir(), f"jaxinterp-gpt2-{n_layer}L{n_head}H{n_embd}-random")
        model = ensure_checkpoint(path, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=64)
    else:
        model = ensure_checkpoint(os.path.join(tempfile.gettempdir(), "jaxinterp-gpt2-small-random"), **GPT2_SMALL)
    work = args.out + "_work"
    os.makedirs(work, exist_ok=True)
    data = args.data
    if data is None:
        from transformers import AutoTokenizer

        data = write_ioi_pairs(os.path.join(work, "pairs.csv"), AutoTokenizer.from_pretrained(model), args.examples)
    with open(os.path.join(model, "config.json")) as f:
        hf = json.load(f)
    spec = GraphSpec(hf["n_layer"], hf["n_head"])
    rows, ac_rows = [], []
    for method in args.methods.split(","):
        common = ["--model", model, "--data", data, "--method", method, "--ig-steps", str(args.ig_steps),
                  "--batch-size", str(args.batch_size), "--evaluate-topn", args.evaluate_topn]
        ref_prefix, jax_prefix = os.path.join(work, f"ref_{method}"), os.path.join(work, f"jax_{method}")
        load = {}
        if eapig and not args.skip_reference:
            load["reference"] = run([args.ref_python, os.path.join(HERE, "reference_eapig.py"), *common,
                 "--eap-ig-path", args.eap_ig_path, "--out", ref_prefix])
        load["jaxinterp"] = run([sys.executable, os.path.join(HERE, "run_jaxinterp.py"), *common, "--out", jax_prefix])
        ours, jax_info = _load(jax_prefix)
        ref = None
        if eapig:
            ref, ref_info = _load(ref_prefix)
            agreement = score_agreement(ours, ref, spec.real_edge_mask, ks=(100, 1000))
            rows.append({"method": method, "agreement": agreement, "reference": ref_info, "jaxinterp": jax_info,
                         "speedup": ref_info["seconds"] / jax_info["seconds"], "loadavg_1min": load})
            print(f"{method}: reference {ref_info['seconds']:.1f}s, jaxinterp {jax_info['seconds']:.2f}s "
                  f"(+{jax_info['compile_seconds'] or 0:.1f}s compile): {rows[-1]['speedup']:.1f}x; "
                  f"Pearson {agreement['pearson']:.6f}", flush=True)
        if args.autocircuit_python and method in AUTOCIRCUIT_METHODS:
            ac_rows.append(_autocircuit_row(args, method, common, work, spec, ours, jax_info, ref))
    result = {"benchmark": "compare_reference", "model": model, "data": data, "n_examples": args.examples,
              "batch_size": args.batch_size, "ig_steps": args.ig_steps, "machine": machine(), "rows": rows}
    if ac_rows:
        result["autocircuit_rows"] = ac_rows
        result["autocircuit_env"] = subprocess.run([args.autocircuit_python, "-m", "pip", "freeze"],
                                                   capture_output=True, text=True).stdout.split()
    write_json(args.out + ".json", result)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    plot(result, args.out + ".png")
    print(markdown(result))


# jaxinterp method -> (auto-circuit's counterpart, the jaxinterp run with the same definition)
AUTOCIRCUIT_METHODS = {"EAP": ("Edge Attribution Patching (mask_val=0)", "EAP"),
                       "EAP-IG-inputs": ("Integrated Edge Gradients (edge masks, steps + 1 points)", "IG-edge-masks")}


def _load(prefix: str):
    with open(prefix + ".json") as f:
        return np.load(prefix + ".npy"), json.load(f)


def _autocircuit_row(args, method, common, work, spec, ours, jax_info, ref) -> dict:
    """Run auto-circuit's counterpart of ``method``, and jaxinterp's run of the same
    definition when it is not ``method`` itself; agreement with both and with EAP-IG."""
    algorithm, same = AUTOCIRCUIT_METHODS[method]
    ac_prefix = os.path.join(work, f"autocircuit_{method}")
    load = {"autocircuit": run([args.autocircuit_python, os.path.join(HERE, "reference_autocircuit.py"), *common,
                                "--out", ac_prefix])}
    ac, ac_info = _load(ac_prefix)
    with open(ac_prefix + ".names.json") as f:
        names = json.load(f)
    if names["forward"] != spec.forward_names or names["backward"] != spec.backward_names:
        raise SystemExit("auto-circuit's edges were mapped onto another node layout than jaxinterp's")
    same_scores, same_info = ours, jax_info
    if same != method:
        same_prefix = os.path.join(work, f"jax_{same}")
        load["jaxinterp"] = run([sys.executable, os.path.join(HERE, "run_jaxinterp.py"),
                                 *[same if x == method else x for x in common], "--out", same_prefix])
        same_scores, same_info = _load(same_prefix)
    ks = (100, 1000)
    row = {"method": method, "autocircuit_algorithm": algorithm, "jaxinterp_method": same,
           "autocircuit": ac_info, "jaxinterp": same_info,
           "agreement": score_agreement(same_scores, ac, spec.real_edge_mask, ks=ks),
           "speedup": ac_info["seconds"] / same_info["seconds"], "loadavg_1min": load}
    if same != method:
        row["agreement_vs_" + method] = score_agreement(ours, ac, spec.real_edge_mask, ks=ks)
    if ref is not None:
        row["agreement_vs_eapig"] = score_agreement(ref, ac, spec.real_edge_mask, ks=ks)
    print(f"{method} ~ auto-circuit {algorithm}: {ac_info['seconds']:.1f}s (+{ac_info['seconds_setup']:.1f}s setup), "
          f"jaxinterp {same} {same_info['seconds']:.2f}s: {row['speedup']:.1f}x; "
          f"Pearson {row['agreement']['pearson']:.6f}", flush=True)
    return row


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cores']} cores), GPU: {m.get('gpu') or 'none'}, jax {m['jax']} "
             f"({m['backend']}); {result['n_examples']} pairs, batch {result['batch_size']}, "
             f"IG steps {result['ig_steps']}.", ""]
    if result["rows"] and result.get("autocircuit_rows"):
        lines += ["The reference, hannamw/EAP-IG, against jaxinterp:", ""]
    if result["rows"]:
        lines += ["| method | reference s | jaxinterp s (+compile) | speed-up | ref ex/s | jax ex/s | ref RSS MB | "
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
    if result.get("autocircuit_rows"):
        lines += _markdown_autocircuit(result)
    return "\n".join(lines) + "\n"


def _markdown_autocircuit(result: dict) -> list:
    rows = result["autocircuit_rows"]
    v = rows[0]["autocircuit"]
    lines = ["" if result["rows"] else None,
             f"auto-circuit {v['auto_circuit']} (torch {v['torch']}, TransformerLens {v['transformer_lens']}, "
             f"transformers {v['transformers']}) against jaxinterp's run of the same definition; "
             "auto-circuit's time is its prune-score call, setup is model loading and `patchable_model`:", "",
             "| method | auto-circuit algorithm | auto-circuit s (+setup) | jaxinterp run | jaxinterp s (+compile) | "
             "speed-up | ac ex/s | jax ex/s | ac RSS MB | jax RSS MB | Pearson | Spearman | max abs diff / max abs | "
             "top-100 | top-1000 | Pearson vs jaxinterp's method / vs EAP-IG | "
             "faithfulness top-k (auto-circuit's own evaluation / jax) |",
             "|---" * 17 + "|"]
    n = result["n_examples"]
    for r in rows:
        a, ac, jx = r["agreement"], r["autocircuit"], r["jaxinterp"]
        other = r.get("agreement_vs_" + r["method"])
        eapig = r.get("agreement_vs_eapig")
        vs = (f"{other['pearson']:.6f}" if other else "same") + " / " + (f"{eapig['pearson']:.6f}" if eapig else "-")
        af, jf = _faithfulness(ac), _faithfulness(jx)
        faith = "; ".join(f"{k}: {af[k]:.3f} / {jf.get(k, float('nan')):.3f}" for k in af)
        lines.append(f"| {r['method']} | {r['autocircuit_algorithm']} | "
                     f"{ac['seconds']:.1f} (+{ac['seconds_setup']:.1f}) | "
                     f"{r['jaxinterp_method']} | {jx['seconds']:.2f} (+{jx['compile_seconds'] or 0:.1f}) | "
                     f"{r['speedup']:.1f}x | {n / ac['seconds']:.2f} | {jx['examples_per_s']:.1f} | "
                     f"{ac['peak_rss_mb']:.0f} | {jx['peak_rss_mb']:.0f} | {a['pearson']:.6f} | {a['spearman']:.6f} | "
                     f"{a['max_abs_diff']:.2e} / {a['max_abs']:.2e} | {a['top100_overlap']:.2f} | "
                     f"{a['top1000_overlap']:.2f} | {vs} | {faith} |")
    return [x for x in lines if x is not None]


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

    series = [(label, {r["method"]: r for r in result.get(key) or []}, color)
              for label, key, color in (("vs hannamw/EAP-IG", "rows", "#4a86e8"),
                                        ("vs auto-circuit", "autocircuit_rows", "#e69138"))]
    series = [s for s in series if s[1]]
    methods = list(dict.fromkeys(m for _, rows, _ in series for m in rows))
    width = 0.8 / len(series)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    low = 0.99
    for i, (label, rows, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, m in enumerate(methods) if m in rows]
        a1.bar(xs, [rows[m]["speedup"] for m in methods if m in rows], width, color=color, label=label)
        pearsons = [rows[m]["agreement"]["pearson"] for m in methods if m in rows]
        a2.bar(xs, pearsons, width, color=color, label=label)
        low = min(low, min(pearsons) - 0.001)
        if label == "vs auto-circuit":  # a different definition: Pearson with jaxinterp's own method as well
            other = [(x, rows[m]["agreement_vs_" + m]["pearson"]) for x, m in zip(xs, [m for m in methods if m in rows])
                     if "agreement_vs_" + m in rows[m]]
            if other:
                a2.scatter(*zip(*other), marker="x", color="black", zorder=3,
                           label="auto-circuit vs jaxinterp's method (other definition)")
                a2.legend(fontsize=6, loc="lower left")
                low = min(low, min(p for _, p in other) - 0.005)
    a1.set_ylabel("baseline time / jaxinterp time")
    a1.set_title("speed-up (after compilation)")
    a2.set_ylim(low, 1.0)
    a2.set_title("Pearson correlation of edge scores")
    if len(series) > 1:
        a1.legend(fontsize=7)
    ac_rows = {r["method"]: r for r in result.get("autocircuit_rows") or []}
    labels = [m + (f"\n(auto-circuit: {ac_rows[m]['jaxinterp_method']})"
                   if m in ac_rows and ac_rows[m]["jaxinterp_method"] != m else "") for m in methods]
    for a in (a1, a2):
        a.set_xticks(range(len(methods)), labels)
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
