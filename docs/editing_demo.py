"""ROME and MEMIT on the shipped demo model, measured as the papers do (the README's figures).

    python docs/editing_demo.py --out editing-demo [--edits 50] [--mom2-weight 100]

The demo model knows three tasks, not facts; its "facts" are IOI answers. A request
rewrites what a second subject mention leads to: ``"When Mary and John went to the store ,
{John} gave a drink to"`` -> ``Kate`` instead of ``Mary`` (the value optimisation reaches
the target only from layer 0 of this 3-layer model). Records are CounterFact's: the
rewrite prompt, paraphrases (other templates, places and objects with the same two names),
neighbourhood prompts (another second name, the same first one: the answer stays
``target_true``). Unrelated prompts: IOI prompts with none of the edited names, and
induction prompts; their top-1 before and after.

Writes ``records.json``, ``text.txt`` (the statistics sample: task prompts), ``results.json``
and, with ``--circuits N``, ``circuits/`` (:func:`jaxinterp.knowledge.circuit_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def records(n_names: int, per_name: int, seed: int = 0) -> list[dict]:
    from jaxinterp import tasks

    rng = np.random.default_rng(seed)
    names = list(tasks.NAMES)
    edited = names[:n_names]
    out = []
    for i, s in enumerate(edited):
        new = names[(i + 7) % len(names)]  # a name that is no request's subject's own answer
        for _ in range(per_name):
            io = [x for x in names if x not in (s, new)][rng.integers(len(names) - 2)]
            t = [0, 2, 3, 4][rng.integers(4)]
            fill = dict(PLACE=tasks.PLACES[rng.integers(12)], OBJECT=tasks.OBJECTS[rng.integers(12)])
            para = [tasks.IOI_TEMPLATES[u].format(N1=io, N2=s, S2=s, PLACE=tasks.PLACES[rng.integers(12)],
                                                  OBJECT=tasks.OBJECTS[rng.integers(12)])
                    for u in (0, 2, 3, 4) if u != t]
            others = [x for x in names if x not in edited and x not in (io, new)]
            neigh = [tasks.IOI_TEMPLATES[t].format(N1=io, N2=o, S2=o, **fill)
                     for o in rng.choice(others, 2, replace=False)]
            out.append({"requested_rewrite": {"prompt": tasks.IOI_TEMPLATES[t].format(N1=io, N2=s, S2="{}", **fill),
                                              "subject": s, "target_new": {"str": new}, "target_true": {"str": io}},
                        "paraphrase_prompts": para, "neighborhood_prompts": neigh})
    return out


def unrelated(edited: set, n: int = 40, seed: int = 9) -> list[str]:
    from jaxinterp import tasks

    ioi = [r["clean"] for r in tasks.generate("ioi", 4000, seed=seed) if not edited & set(r["clean"].split())][:n // 2]
    return ioi + [r["clean"] for r in tasks.generate("induction", n - len(ioi), seed=seed)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="editing-demo")
    p.add_argument("--edits", type=int, default=50)
    p.add_argument("--per-name", type=int, default=2, help="requests per edited name (same target)")
    p.add_argument("--mom2-weight", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--layers", default="0")
    p.add_argument("--circuits", type=int, default=0, help="also the knowledge-circuit report at this top-n")
    args = p.parse_args(argv)
    from jaxinterp import editing, load_model, tasks
    from jaxinterp.demo import demo_model_dir

    os.makedirs(args.out, exist_ok=True)
    model = load_model(demo_model_dir())
    recs = records(-(-args.edits // args.per_name), args.per_name)[:args.edits]
    with open(os.path.join(args.out, "records.json"), "w") as f:
        json.dump(recs, f, indent=1)
    rows = tasks.generate("ioi", 1000, seed=1) + tasks.generate("greater_than", 500, seed=1) + \
        tasks.generate("induction", 500, seed=1)
    text = os.path.join(args.out, "text.txt")
    with open(text, "w") as f:
        f.write("\n".join(r["clean"] + " " + r["target"] for r in rows))
    flat = editing.read_requests(recs)
    layers = [int(x) for x in args.layers.split(",")]
    tokens = editing.sample_tokens(model, text)
    mom2s = {l: editing.second_moment(model, l, tokens) for l in layers}
    t = time.perf_counter()
    edited = editing.memit(model, flat, layers=layers, mom2s=mom2s, contexts=["{}"],
                           hparams=editing.MemitHParams(v_steps=args.steps, mom2_update_weight=args.mom2_weight))
    seconds = time.perf_counter() - t
    names = {r["subject"] for r in flat} | {r["target_new"] for r in flat}
    unrel = unrelated(names)
    before_u, after_u = editing.top1_ids(model, unrel), editing.top1_ids(edited, unrel)
    result = {"edits": len(flat), "layers": layers, "mom2_update_weight": args.mom2_weight, "steps": args.steps,
              "seconds": seconds, "before": editing.evaluate_edits(model, flat),
              "after": editing.evaluate_edits(edited, flat),
              "unrelated_top1_unchanged": float(np.mean(before_u == after_u)), "n_unrelated": len(unrel)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    b, a = result["before"], result["after"]
    print(f"MEMIT, {len(flat)} edits at layers {layers} (lambda {args.mom2_weight}, {seconds:.1f}s):")
    for k in ("efficacy", "efficacy_top1", "paraphrase", "paraphrase_top1", "neighborhood", "neighborhood_top1",
              "fluency"):
        print(f"  {k:18s} {b[k]:.3f} -> {a[k]:.3f}")
    print(f"  unrelated top-1 unchanged {result['unrelated_top1_unchanged']:.3f} ({len(unrel)} prompts)")
    if args.circuits:  # knowledge circuits before/after: EAP-IG on the facts and on an unrelated task
        from jaxinterp.knowledge import circuit_report

        other = tasks.generate("induction", 32, seed=3)  # every name is edited or a target: induction is unrelated
        csv = tasks.write_rows_csv(tasks.csv_rows(other, model.tokenizer), os.path.join(args.out, "unrelated.csv"))
        rep = circuit_report(model, edited, flat, csv, os.path.join(args.out, "circuits"), n=args.circuits)
        for task in ("fact", "unrelated"):
            r = rep[task]
            print(f"  circuits, {task}: top-{r['n']} overlap {r['overlap']:.2f}, rank correlation "
                  f"{r['rank_correlation']:.2f}, faithfulness {r['faithfulness_original']:.2f} -> original circuit on "
                  f"the edited model {r['faithfulness_on_edited']:.2f}")
    return result


if __name__ == "__main__":
    main()
