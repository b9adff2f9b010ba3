"""One ROME edit of SmolLM2-135M-Instruct and its knowledge circuits before and after (the README's figures).

    python docs/knowledge_smollm2.py --out knowledge-smollm2 [--pairs 8] [--top-n 200] [--ig-steps 5]

The fact "The capital of France is" -> ``Paris`` is rewritten to ``London`` with ROME at the
layer a causal trace of the subject picks (:func:`jaxinterp.editing.default_layer`); the
keys' second moment comes from the repository's own prose (README and docs, cut into lines
of ~80 words: no download). Then, with :func:`jaxinterp.knowledge.circuit_report`, EAP-IG
circuits of the original and the edited model on

* the fact: the rewrite prompt against ``--pairs`` corrupted prompts with other countries
  (whose capitals are neither Paris nor London), labels each model's own answer against the
  other (original: Paris over London; edited: London over Paris);
* an unrelated task: ``--pairs`` IOI prompts the model gets right.

Writes ``text.txt``, ``results.json`` (stage timings, the edit's layer, CounterFact-style
scores before and after) and ``circuits/`` (report.md, report.json, circuits.png).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = {"requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                                "target_new": {"str": "London"}, "target_true": {"str": "Paris"}},
          "paraphrase_prompts": ["The capital city of France is", "France's capital city is"],
          "neighborhood_prompts": ["The Eiffel Tower is located in the city of", "The Louvre is located in the city of"]}


def prose_lines(paths, words_per_line: int = 80) -> list[str]:
    """The files' text without code blocks, tables and markup, cut into lines of ~80 words."""
    words = []
    for path in paths:
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"```.*?```", " ", text, flags=re.S)
        for line in text.splitlines():
            if line.lstrip().startswith(("|", "#", "!", "<")):
                continue
            words += re.sub(r"[`*_\[\]]", "", line).split()
    return [" ".join(words[i:i + words_per_line]) for i in range(0, len(words), words_per_line)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="knowledge-smollm2")
    p.add_argument("--pairs", type=int, default=8, help="prompt pairs per task")
    p.add_argument("--top-n", type=int, default=200)
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--layer", type=int, default=None, help="ROME's layer (default: from a causal trace)")
    args = p.parse_args(argv)
    from jaxinterp import editing, load_model, tasks
    from jaxinterp.knowledge import circuit_report

    os.makedirs(args.out, exist_ok=True)
    times, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        times[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}: {times[name]} s]", flush=True)
        t = time.perf_counter()

    model = load_model("smollm2")
    lap("load")
    text = os.path.join(args.out, "text.txt")
    with open(text, "w") as f:
        f.write("\n".join(prose_lines([os.path.join(HERE, "..", "README.md")])))
    rec = editing.read_requests([RECORD])[0]
    request = editing.Request(rec["template"], rec["subject"], rec["target_new"])
    layer = editing.default_layer(model, request) if args.layer is None else args.layer
    lap("default layer (causal trace)")
    mom2 = editing.second_moment(model, layer, editing.sample_tokens(model, text))
    lap("second moment")
    edited, info = editing.rome(model, request.prompt, rec["subject"], rec["target_new"], layer=layer, mom2=mom2,
                                return_info=True)
    lap("ROME")
    before, after = editing.evaluate_edits(model, [rec]), editing.evaluate_edits(edited, [rec])
    lap("CounterFact scores")
    # the other countries of the capital relation whose capital is a single token and neither answer
    answers = {"Paris", "London"}
    distractors = [s for s, a in tasks.FACTS["capital"] if a not in answers and s != rec["subject"]]
    ioi = tasks.generate_real("ioi", args.pairs, model.tokenizer, seed=0, model=model, keep_correct=True)
    ioi_csv = tasks.write_rows_csv(ioi, os.path.join(args.out, "ioi.csv"))
    rep = circuit_report(model, edited, [rec], ioi_csv, os.path.join(args.out, "circuits"), n=args.top_n,
                         ig_steps=args.ig_steps, distractors=distractors, per_record=args.pairs, batch_size=args.pairs)
    lap("circuit report (4 x EAP-IG, 4 x evaluate)")
    result = {"layer": int(layer), "rome_p_target": info["history"][-1]["p_target"], "before": before,
              "after": after, "times_s": times, "pairs": args.pairs, "top_n": args.top_n, "ig_steps": args.ig_steps,
              "circuits": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("scores_")}
                           for k, v in rep.items()}}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"ROME at layer {layer}: efficacy top-1 {before['efficacy_top1']:.2f} -> {after['efficacy_top1']:.2f}, "
          f"paraphrase top-1 {before['paraphrase_top1']:.2f} -> {after['paraphrase_top1']:.2f}, neighbourhood "
          f"{before['neighborhood']:.2f} -> {after['neighborhood']:.2f}")
    for task in ("fact", "unrelated"):
        r = rep[task]
        print(f"circuits, {task}: top-{r['n']} overlap {r['overlap']:.2f}, rank correlation "
              f"{r['rank_correlation']:.2f}, faithfulness {r['faithfulness_original']:.2f} -> original circuit on the "
              f"edited model {r['faithfulness_on_edited']:.2f}")
    return result


if __name__ == "__main__":
    main()
