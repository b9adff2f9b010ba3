"""Knowledge circuits before and after an edit (``knowledge.circuit_report``), recomputed by hand.

A ROME edit of the demo model ("... , {John} gave a drink to" -> Kate) and its report on
the fact (the rewrite prompt corrupted with four other names) and on an unrelated task (IOI
prompts without the edited names). Each figure is recomputed here from its parts:

* the overlap: the top-n edges of each model's EAP-IG graph, ranked by |score| by name
  from the graph's edge list, intersected;
* faithfulness: (m(C) - m(empty)) / (m(N) - m(empty)) with m(C) from ``evaluate_graph`` of a
  circuit built edge by edge from those names, and m(N), m(empty) the mean logit
  difference of plain forwards of each prompt alone on the clean and corrupted prompts
  (what patching every edge gives);
* the rank correlation: scipy's Spearman; the moved edges: |edited - original| by name.
"""

import csv
import copy
import json
import os

import numpy as np
import pytest

from jaxinterp import editing, load_model, tasks
from jaxinterp.attribution import attribute
from jaxinterp.data import tokenize
from jaxinterp.demo import demo_model_dir
from jaxinterp.evaluation import evaluate_graph
from jaxinterp.graph import Graph
from jaxinterp.knowledge import circuit_report, fact_rows

PROMPT = "When Mary and John went to the store , {} gave a drink to"
SUBJECT, TARGET, TRUE = "John", "Kate", "Mary"
DISTRACTORS = ["Tom", "Paul", "Bob", "Lucy", "Mark"]
N, IG_STEPS, BATCH = 30, 3, 8


@pytest.fixture(scope="module")
def stats_env(tmp_path_factory):
    old = os.environ.get("JAXINTERP_STATS_DIR")
    os.environ["JAXINTERP_STATS_DIR"] = str(tmp_path_factory.mktemp("stats"))
    yield
    if old is None:
        del os.environ["JAXINTERP_STATS_DIR"]
    else:
        os.environ["JAXINTERP_STATS_DIR"] = old


@pytest.fixture(scope="module")
def demo():
    return load_model(demo_model_dir())


@pytest.fixture(scope="module")
def records():
    return editing.read_requests([{"prompt": PROMPT, "subject": SUBJECT, "target_new": TARGET, "target_true": TRUE}])


@pytest.fixture(scope="module")
def report(demo, records, stats_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knowledge")
    rows = tasks.generate("ioi", 96, seed=1) + tasks.generate("induction", 48, seed=1)
    text = tmp / "text.txt"
    text.write_text("\n".join(r["clean"] + " " + r["target"] for r in rows))
    edited = editing.rome(demo, PROMPT, SUBJECT, TARGET, layer=0, hparams=editing.RomeHParams(v_steps=60),
                          contexts=["{}"], text_file=str(text), progress=False)
    other = [r for r in tasks.generate("ioi", 40, seed=5) if not {SUBJECT, TARGET, TRUE} & set(r["clean"].split())]
    unrelated = tasks.write_rows_csv(tasks.csv_rows(other[:BATCH], demo.tokenizer), str(tmp / "unrelated.csv"))
    out = tmp / "report"
    rep = circuit_report(demo, edited, records, unrelated, str(out), n=N, ig_steps=IG_STEPS, distractors=DISTRACTORS,
                         per_record=4, batch_size=BATCH)
    return edited, rep, out, unrelated


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _mean_logit_diff(model, rows, which):
    """Mean logit(correct) - logit(incorrect) at the last token, each prompt run alone."""
    out = []
    for r in rows:
        ids = np.asarray(tokenize(model.tokenizer, [r[which]]), np.int32)
        logits = np.asarray(model(ids))[0, -1]
        out.append(logits[int(r["correct_idx"])] - logits[int(r["incorrect_idx"])])
    return float(np.mean(out))


def test_fact_rows_with_distractors(demo, records):
    rows = fact_rows(demo.tokenizer, records, edited=True, distractors=DISTRACTORS, per_record=4)
    subjects = [r["corrupted"].split(" , ")[1].split()[0] for r in rows]
    assert len(rows) == 4 and len(set(subjects)) == 4 and set(subjects) <= set(DISTRACTORS)
    assert all(r["clean"] == PROMPT.format(SUBJECT) for r in rows)
    ids = {w: demo.tokenizer.convert_tokens_to_ids(w) for w in (TARGET, TRUE)}
    assert all((r["correct_idx"], r["incorrect_idx"]) == (ids[TARGET], ids[TRUE]) for r in rows)
    assert len(fact_rows(demo.tokenizer, records, edited=False, distractors=DISTRACTORS[:2], per_record=4)) == 2
    with pytest.raises(editing.EditError, match="per_record"):
        fact_rows(demo.tokenizer, records, edited=False, distractors=DISTRACTORS, per_record=0)


@pytest.mark.parametrize("task", ["fact", "unrelated"])
def test_report_figures_equal_a_hand_computation(demo, report, task):
    from scipy.stats import spearmanr

    edited, rep, out, unrelated = report
    data = {"fact": (str(out / "fact_original.csv"), str(out / "fact_edited.csv")),
            "unrelated": (unrelated, unrelated)}[task]
    assert len(_rows(data[0])) == (4 if task == "fact" else BATCH)
    r = rep[task]
    g0 = attribute(demo, data[0], "EAP-IG-inputs", ig_steps=IG_STEPS, batch_size=BATCH, quiet=True)
    g1 = attribute(edited, data[1], "EAP-IG-inputs", ig_steps=IG_STEPS, batch_size=BATCH, quiet=True)
    spec = g0.spec
    names = [name for name, _, _ in spec.edges]
    s0 = np.array([g0.scores[s, d] for _, s, d in spec.edges], np.float64)
    s1 = np.array([g1.scores[s, d] for _, s, d in spec.edges], np.float64)
    # the report's scores are these (all real edges, in its own order)
    for mine, theirs in ((s0, r["scores_original"]), (s1, r["scores_edited"])):
        np.testing.assert_allclose(np.sort(theirs), np.sort(mine), rtol=0, atol=1e-6 * np.abs(mine).max())
    tops = []
    for s in (s0, s1):
        order = np.argsort(-np.abs(s), kind="stable")
        assert abs(s[order[N - 1]]) > abs(s[order[N]]) * (1 + 1e-4)  # no tie at the cut: the top-n is one set
        tops.append({names[i] for i in order[:N]})
    assert r["overlap"] == len(tops[0] & tops[1]) / N
    # the two graphs are two models' (on the fact, far apart: the labels flip with the answer)
    assert np.abs(s1 - s0).max() > (0.1 if task == "fact" else 1e-3) * np.abs(s0).max()
    assert r["rank_correlation"] == pytest.approx(spearmanr(s0, s1).statistic, abs=1e-6)
    moved = np.argsort(-np.abs(s1 - s0), kind="stable")[:len(r["moved"])]
    assert [m["edge"] for m in r["moved"]] == [names[i] for i in moved]
    np.testing.assert_allclose([m["edited"] - m["original"] for m in r["moved"]], (s1 - s0)[moved], rtol=0,
                               atol=1e-6 * np.abs(s1 - s0).max())
    # faithfulness of the original top-n circuit, built edge by edge, on each model
    circuit = Graph(spec, g0.scores)
    for name in tops[0]:
        circuit.in_graph[spec.edge_index(name)] = True
    circuit.nodes_in_graph[:] = True  # evaluate_graph prunes what is not connected, as apply_topn does
    for model, path, key in ((demo, data[0], "faithfulness_original"), (edited, data[1], "faithfulness_on_edited")):
        m_c = evaluate_graph(model, copy.deepcopy(circuit), path, batch_size=BATCH)
        rows = _rows(path)
        m_n, m_e = _mean_logit_diff(model, rows, "clean"), _mean_logit_diff(model, rows, "corrupted")
        # a difference to normalise by that is not rounding (small for the original model on the fact: a
        # corrupted second name does not change the demo model's IOI answer Mary, 10.3 against 10.8)
        assert abs(m_n - m_e) > 1e-2 * max(abs(m_n), abs(m_e))
        want = (m_c - m_e) / (m_n - m_e)
        # float32 forwards of two programs: ~1e-5 of the logit differences' scale, over the denominator
        tol = 1e-4 * (abs(m_n) + abs(m_e) + abs(m_c)) / abs(m_n - m_e)
        assert r[key] == pytest.approx(want, abs=tol), key
    if task == "unrelated":  # the same prompts and labels on both models: the edit moved little here
        assert r["rank_correlation"] > 0.5


def test_report_files(report):
    _, rep, out, _ = report
    saved = json.loads((out / "report.json").read_text())
    for task in ("fact", "unrelated"):
        for key in ("n", "overlap", "rank_correlation", "faithfulness_original", "faithfulness_on_edited", "moved"):
            assert saved[task][key] == pytest.approx(rep[task][key]) if key != "moved" else \
                saved[task][key] == rep[task][key]
    md = (out / "report.md").read_text()
    assert f"| fact | {rep['fact']['overlap']:.2f} |" in md and rep["fact"]["moved"][0]["edge"] in md
    assert os.path.getsize(out / "circuits.png") > 1000
