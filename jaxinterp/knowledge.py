"""Knowledge circuits before and after an edit (Yao et al. 2024, "Knowledge Circuits in
Pretrained Transformers", asked of ROME/MEMIT edits).

The same factual-recall task is scored with EAP-IG on the original and on the edited
model, and so is an unrelated task; per task the report gives

* ``overlap``: the fraction of the original top-n edges (by |score|) among the edited
  model's top-n;
* ``faithfulness_original`` and ``faithfulness_on_edited``: the original top-n circuit's
  faithfulness on the original model, and the same edges evaluated on the edited model
  (does the old circuit still carry the task?);
* ``moved``: the edges whose scores changed most (edited minus original);
* ``rank_correlation``: Spearman's correlation of all edge scores.

The factual task is built from edit records (:func:`jaxinterp.editing.read_requests`):
clean = the rewrite prompt, corrupted = the same prompt with another record's subject
(of the same token length), labels = each model's own answer against the other (original:
``target_true`` over ``target_new``; edited: the reverse), so that both circuits are
circuits *for the answer the model gives*.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def fact_rows(tokenizer, records: Sequence[dict], edited: bool, seed: int = 0, distractors: Sequence[str] = (),
              per_record: int = 1) -> list[dict]:
    """Pairs-CSV rows for the factual task (see the module docstring): per record,
    ``per_record`` rows (fewer when fewer subjects fit), each corrupted with a different
    subject drawn from the other records' subjects and ``distractors`` (extra subjects,
    e.g. for a single edit; their own answers should be neither target) of the same
    token length in the record's template."""
    from .editing import EditError, subject_last_index, target_token_ids

    if per_record < 1:
        raise EditError(f"per_record must be >= 1, got {per_record}")
    rng = np.random.default_rng(seed)
    pool = list(dict.fromkeys([o["subject"] for o in records] + list(distractors)))
    rows = []
    for i, r in enumerate(records):
        ids, _ = subject_last_index(tokenizer, r["template"], r["subject"])
        others = [s for s in pool if s != r["subject"]
                  and len(subject_last_index(tokenizer, r["template"], s)[0]) == len(ids)]
        if not others or not r.get("target_true"):
            raise EditError(f"record {i}: the factual task needs target_true and another record's subject (or a "
                            f"distractor) of the same token length to corrupt with")
        new, true = target_token_ids(tokenizer, r["target_new"])[0], target_token_ids(tokenizer, r["target_true"])[0]
        picks = [others[rng.integers(len(others))]] if per_record == 1 else \
            [others[j] for j in rng.choice(len(others), min(per_record, len(others)), replace=False)]
        rows += [{"clean": r["template"].format(r["subject"]), "corrupted": r["template"].format(s),
                  "correct_idx": new if edited else true, "incorrect_idx": true if edited else new} for s in picks]
    return rows


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` from 0, ties sharing their average rank (as Spearman's correlation
    needs: EAP-IG gives many edges exactly equal scores, e.g. 0, whose order is arbitrary)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2)[inverse.reshape(-1)]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def compare_circuits(original, edited, data_original: str, data_edited: str, n: int, ig_steps: int = 5,
                     batch_size: int = 16, n_moved: int = 10) -> dict:
    """EAP-IG (inputs) on both models, each on its own pairs CSV; see the module docstring.
    Returns the figures and ``scores_original``/``scores_edited`` (real edges, ``[edge]``)."""
    from .attribution import attribute
    from .evaluation import evaluate

    g0 = attribute(original, data_original, "EAP-IG-inputs", ig_steps=ig_steps, batch_size=batch_size, quiet=True)
    g1 = attribute(edited, data_edited, "EAP-IG-inputs", ig_steps=ig_steps, batch_size=batch_size, quiet=True)
    real = g0.spec.real_edge_mask
    names = {(s, d): name for name, s, d in g0.spec.edges}
    s0, s1 = g0.scores[real], g1.scores[real]
    top0 = set(np.argsort(-np.abs(s0))[:n].tolist())
    top1 = set(np.argsort(-np.abs(s1))[:n].tolist())
    g0.apply_topn(n, absolute=True)
    e0 = evaluate(original, g0, data_original, batch_size=batch_size)
    e1 = evaluate(edited, g0, data_edited, batch_size=batch_size)
    src, dst = np.nonzero(real)
    moved = np.argsort(-np.abs(s1 - s0))[:n_moved]
    return {"n": n, "overlap": len(top0 & top1) / n, "rank_correlation": _spearman(s0, s1),
            "faithfulness_original": e0.faithfulness, "faithfulness_on_edited": e1.faithfulness,
            "moved": [{"edge": names[(int(src[i]), int(dst[i]))], "original": float(s0[i]), "edited": float(s1[i])}
                      for i in moved],
            "scores_original": s0, "scores_edited": s1}


def circuit_report(original, edited, records, unrelated_csv: str, out_dir: str, n: int = 50, ig_steps: int = 5,
                   seed: int = 0, distractors: Sequence[str] = (), per_record: int = 1, batch_size: int = 16) -> dict:
    """The factual task of ``records`` (:func:`fact_rows`, with ``distractors`` and
    ``per_record``) and the unrelated pairs CSV, each compared with
    :func:`compare_circuits`; writes ``fact_original.csv``, ``fact_edited.csv``,
    ``report.md``, ``report.json`` and ``circuits.png`` to ``out_dir``. Returns the figures."""
    from .editing import read_requests
    from .io import atomic_write_text, dumps
    from .tasks import write_rows_csv

    recs = read_requests(records) if isinstance(records, (str, dict)) else \
        [r if "template" in r else read_requests([r])[0] for r in records]
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for which, model in (("original", original), ("edited", edited)):
        paths[which] = write_rows_csv(fact_rows(model.tokenizer, recs, which == "edited", seed, distractors, per_record),
                                      os.path.join(out_dir, f"fact_{which}.csv"))
    fact = compare_circuits(original, edited, paths["original"], paths["edited"], n, ig_steps, batch_size)
    other = compare_circuits(original, edited, unrelated_csv, unrelated_csv, n, ig_steps, batch_size)
    result = {"fact": fact, "unrelated": other}
    plot_circuit_change(result, os.path.join(out_dir, "circuits.png"))
    public = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("scores_")} for k, v in result.items()}
    atomic_write_text(os.path.join(out_dir, "report.json"), dumps(public, indent=1))
    atomic_write_text(os.path.join(out_dir, "report.md"), _markdown(public, n))
    return result


def _markdown(r: dict, n: int) -> str:
    lines = [f"# Knowledge circuits before and after the edit (EAP-IG, top {n} edges)", "",
             "| task | top-n overlap | rank correlation | faithfulness (original) | original circuit on edited |",
             "|---|---|---|---|---|"]
    for task in ("fact", "unrelated"):
        t = r[task]
        lines.append(f"| {task} | {t['overlap']:.2f} | {t['rank_correlation']:.2f} | "
                     f"{t['faithfulness_original']:.2f} | {t['faithfulness_on_edited']:.2f} |")
    for task in ("fact", "unrelated"):
        lines += ["", f"Edges whose scores moved most ({task}):", "", "| edge | original | edited |", "|---|---|---|"]
        lines += [f"| {m['edge']} | {m['original']:+.4f} | {m['edited']:+.4f} |" for m in r[task]["moved"]]
    return "\n".join(lines) + "\n"


def plot_circuit_change(result: dict, path: str) -> str:
    """Edge scores after against before, one panel per task, the most-moved edges named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import write_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=140)
    for ax, task in zip(axes, ("fact", "unrelated")):
        t = result[task]
        s0, s1 = t["scores_original"], t["scores_edited"]
        ax.scatter(s0, s1, s=4, alpha=0.5)
        lim = float(max(np.abs(s0).max(), np.abs(s1).max(), 1e-12))
        ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=0.8)
        for m in t["moved"][:5]:
            ax.annotate(m["edge"], (m["original"], m["edited"]), fontsize=6)
        ax.set_xlabel("EAP-IG score, original", fontsize=8)
        ax.set_ylabel("EAP-IG score, edited", fontsize=8)
        ax.set_title(f"{task}: top-{t['n']} overlap {t['overlap']:.2f}, old circuit on edited "
                     f"{t['faithfulness_on_edited']:.2f}", fontsize=8)
    fig.tight_layout()
    return write_figure(fig, path)
