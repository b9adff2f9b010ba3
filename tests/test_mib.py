"""MIB circuit track: data read as HFEAPDataset reads it, CPR/CMD as the leaderboard computes
them, submission directories, graph JSON speed-ups that keep the format, and the CLI.

The data rows are hand-made in MIB's schema (the columns and nesting HFEAPDataset reads);
expected labels come from the test tokenizer directly, expected areas from numpy's
trapezoid over the per-size faithfulness values, never from the code under test."""

import csv
import json
import os

import numpy as np
import pytest

from jaxinterp import mib
from jaxinterp.data import DataError
from jaxinterp.graph import Graph, GraphSpec
from devtools.testing import NAMES, WORDS, save_random_gpt2

EXTRA = ["A", "B", "C", "D", "Answer", "Question", "color", "red", "blue", "green", "brown", "is", "+", "=", ":",
         "12", "7", "5", "9", "3", "4", "Ann"]


@pytest.fixture(scope="module")
def mib_model(tmp_path_factory):
    from jaxinterp import load_model

    path = save_random_gpt2(str(tmp_path_factory.mktemp("mibgpt2")), n_layer=2, n_head=4, n_embd=64, seed=3,
                            words=NAMES + WORDS + EXTRA)
    return load_model(path)


def ioi_rows():
    """MIB's IOI schema: prompt, metadata{subject, indirect_object, random_c, ...},
    s2_io_flip_counterfactual{prompt, ...}. Row 2 has a two-token name: MIB drops it."""
    rows = []
    for io, s, c in [("Mary", "John", "Kate"), ("Alice", "Bob", "Tom"), ("Mary Ann", "John", "Kate"),
                     ("Lucy", "Mark", "Emma"), ("Paul", "Jack", "Anna")]:
        rows.append({
            "prompt": f"When {io} and {s} went to the store , {s} gave a drink to",
            "metadata": {"subject": s, "indirect_object": io, "random_c": c, "template": "x"},
            "s2_io_flip_counterfactual": {"prompt": f"When {io} and {s} went to the store , {io} gave a drink to",
                                          "metadata": {"subject": io}},
            "random_names_counterfactual": {"prompt": "unused"},
        })
    return rows


def mcqa_rows():
    """MIB's MCQA/ARC schema: choices{label, text}, answerKey an index, and the same in
    symbol_counterfactual. Row 1's counterfactual answer has two tokens: dropped."""
    def row(key, cf_labels, cf_key):
        return {"prompt": "Question : color is red . Answer :", "answerKey": key,
                "choices": {"label": ["A", "B", "C", "D"], "text": ["red", "blue", "green", "brown"]},
                "symbol_counterfactual": {"prompt": "Question : color is blue . Answer :", "answerKey": cf_key,
                                          "choices": {"label": cf_labels, "text": ["red", "blue", "green", "brown"]}}}
    return [row(0, ["B", "C", "D", "A"], 2), row(1, ["A B", "C", "D", "A"], 0), row(3, ["C", "D", "A", "B"], 1)]


def arithmetic_rows():
    """MIB's arithmetic schema: label, operator, random_counterfactual{prompt, label} (may be null)."""
    return [
        {"prompt": "7 + 5 =", "label": 12, "operator": "+", "random_counterfactual": {"prompt": "5 + 4 =", "label": 9}},
        {"prompt": "7 + 5 =", "label": 12, "operator": "+", "random_counterfactual": None},
        {"prompt": "12 - 5 =", "label": 7, "operator": "-", "random_counterfactual": {"prompt": "7 - 3 =", "label": 4}},
        {"prompt": "4 + 5 =", "label": 9, "operator": "+", "random_counterfactual": {"prompt": "9 + 3 =", "label": 12}},
    ]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_pandas_style_csv(path, rows):
    """What ``Dataset.to_csv`` (pandas) writes: nested dicts as their Python repr, None as empty."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, dict) else v) for k, v in r.items()})
    return str(path)


# --- data ---------------------------------------------------------------------------------

def test_ioi_rows_become_mibs_pairs_and_filter(mib_model, tmp_path):
    tok = mib_model.tokenizer
    path = write_jsonl(tmp_path / "ioi.jsonl", ioi_rows())
    examples, dropped = mib.load_mib_examples(path, "ioi", tok)
    assert dropped == 1 and len(examples) == 4
    kept = [r for r in ioi_rows() if " " not in r["metadata"]["indirect_object"]]
    for ex, row in zip(examples, kept):
        assert ex["clean"] == row["prompt"]
        assert ex["corrupted"] == row["s2_io_flip_counterfactual"]["prompt"]
        assert ex["labels"] == (tok.convert_tokens_to_ids(row["metadata"]["indirect_object"]),
                                tok.convert_tokens_to_ids(row["metadata"]["subject"]))
    # the pandas CSV export and a JSON array read the same
    assert mib.load_mib_examples(write_pandas_style_csv(tmp_path / "ioi.csv", ioi_rows()), "ioi", tok)[0] == \
        [dict(e, line=e["line"].replace("ioi.jsonl", "ioi.csv")) for e in examples]
    (tmp_path / "ioi.json").write_text(json.dumps(ioi_rows()))
    assert [e["labels"] for e in mib.load_mib_examples(str(tmp_path / "ioi.json"), "ioi", tok)[0]] == \
        [e["labels"] for e in examples]
    # MIB's head(n) comes after the filter
    assert mib.load_mib_examples(path, "ioi", tok, limit=2)[0] == examples[:2]


def test_mcqa_and_arc_labels_are_the_answer_symbols(mib_model, tmp_path):
    tok = mib_model.tokenizer
    for task in ("mcqa", "arc-easy", "arc_challenge"):
        examples, dropped = mib.load_mib_examples(write_jsonl(tmp_path / "m.jsonl", mcqa_rows()), task, tok)
        assert dropped == 1
        ids = tok.convert_tokens_to_ids
        assert [e["labels"] for e in examples] == [(ids("A"), ids("D")), (ids("D"), ids("D"))]
        assert examples[0]["corrupted"] == "Question : color is blue . Answer :"


def test_arithmetic_filters_operator_and_missing_counterfactual(mib_model, tmp_path):
    tok = mib_model.tokenizer
    ids = tok.convert_tokens_to_ids
    path = write_jsonl(tmp_path / "a.jsonl", arithmetic_rows())
    add, dropped = mib.load_mib_examples(path, "arithmetic_addition", tok)
    assert dropped == 2 and [e["labels"] for e in add] == [(ids("12"), ids("9")), (ids("9"), ids("12"))]
    sub, dropped = mib.load_mib_examples(path, "arithmetic-subtraction", tok)
    assert dropped == 3 and sub[0]["labels"] == (ids("7"), ids("4")) and sub[0]["corrupted"] == "7 - 3 ="
    # a CSV export (nulls as empty cells, dicts as reprs) reads the same
    assert mib.load_mib_examples(write_pandas_style_csv(tmp_path / "a.csv", arithmetic_rows()),
                                 "arithmetic_addition", tok)[0][0]["labels"] == add[0]["labels"]


def test_split_directory_and_bad_data_are_named(mib_model, tmp_path):
    tok = mib_model.tokenizer
    d = tmp_path / "ioi" / "data"
    d.mkdir(parents=True)
    write_jsonl(d / "validation.jsonl", ioi_rows())
    write_jsonl(d / "test.jsonl", ioi_rows()[:2])
    assert len(mib.load_mib_examples(str(tmp_path / "ioi"), "ioi", tok, split="test")[0]) == 2
    assert len(mib.load_mib_examples(str(tmp_path / "ioi"), "ioi", tok)[0]) == 4
    with pytest.raises(DataError, match="split 'train'"):
        mib.read_mib_rows(str(tmp_path / "ioi"), "train")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "metadata": {"subject": "John"}}])
    with pytest.raises(DataError, match=r"bad.jsonl row 0: no field \['metadata'\]\['indirect_object'\]"):
        mib.load_mib_examples(bad, "ioi", tok)
    with pytest.raises(ValueError, match="unknown MIB task"):
        mib.canonical_task("sst2")


def test_mib_data_becomes_the_same_pairs_as_its_pairs_csv(mib_model, tmp_path):
    from jaxinterp.data import load_pairs

    path = write_jsonl(tmp_path / "ioi.jsonl", ioi_rows())
    pairs = mib.load_task_data(mib_model, path, "ioi")
    examples, _ = mib.load_mib_examples(path, "ioi", mib_model.tokenizer)
    csv_path = mib.write_pairs_csv(examples, str(tmp_path / "pairs.csv"))
    assert mib.is_pairs_csv(csv_path) and not mib.is_pairs_csv(path)
    again = load_pairs(csv_path, mib_model.tokenizer, mib_model.cfg.vocab_size)
    for a, b in zip((pairs.clean, pairs.corrupted, pairs.labels, pairs.lengths),
                    (again.clean, again.corrupted, again.labels, again.lengths)):
        np.testing.assert_array_equal(a, b)
    assert pairs.clean[0, 0] == mib_model.tokenizer.bos_token_id  # BOS prepended, as to_tokens does


# --- metrics --------------------------------------------------------------------------------

def random_graph(spec, seed=0):
    rng = np.random.default_rng(seed)
    return Graph(spec, rng.standard_normal((spec.n_forward, spec.n_backward)).astype(np.float32))


@pytest.fixture(scope="module")
def ioi_pairs(mib_model, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("d") / "ioi.jsonl", ioi_rows())
    return mib.load_task_data(mib_model, path, "ioi")


def test_cpr_cmd_are_mibs_trapezoids_of_the_curves(mib_model, ioi_pairs):
    from jaxinterp.evaluation import evaluate

    spec = mib_model.graph_spec
    graph = random_graph(spec)
    res = mib.score_graph(mib_model, graph, ioi_pairs, batch_size=4)
    n = spec.n_edges
    assert res.signed.sizes == [int(p * n) for p in mib.PERCENTAGES]
    x = np.array(mib.PERCENTAGES)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    assert res.cpr == pytest.approx(trapezoid(np.array(res.signed.faithfulness), x), abs=1e-12)
    assert res.cmd == pytest.approx(trapezoid(np.abs(1 - np.array(res.absolute.faithfulness)), x), abs=1e-12)
    assert res.signed.area_from_1 == pytest.approx(trapezoid(np.abs(1 - np.array(res.signed.faithfulness)), x))
    assert res.signed.faithfulness[-1] == pytest.approx(1, abs=1e-5)  # all edges: the full model
    assert res.absolute.faithfulness[-1] == pytest.approx(1, abs=1e-5)
    # each point is the faithfulness of the pruned top-n circuit evaluated on its own
    for absolute, curve in ((False, res.signed), (True, res.absolute)):
        for k in (3, 6, 8):
            g = random_graph(spec).apply_topn(curve.sizes[k], absolute=absolute, prune=True)
            assert curve.edge_counts[k] == g.count_included_edges() == curve.weighted_edge_counts[k]
            assert curve.faithfulness[k] == pytest.approx(evaluate(mib_model, g, ioi_pairs).faithfulness, abs=1e-4)
    # the two rankings differ on random scores (else the test would not tell them apart)
    assert res.signed.faithfulness != res.absolute.faithfulness


def test_curve_ends_are_zero_and_one(mib_model, ioi_pairs):
    res = mib.score_graph(mib_model, random_graph(mib_model.graph_spec, 1), ioi_pairs, percentages=(0, 0.5, 1))
    for curve in (res.signed, res.absolute):
        assert curve.edge_counts[0] == 0 and curve.edge_counts[-1] == mib_model.graph_spec.n_edges
        assert curve.faithfulness[0] == pytest.approx(0, abs=1e-5)
        assert curve.faithfulness[-1] == pytest.approx(1, abs=1e-5)


def test_area_matches_mibs_loop_and_log_scale():
    f = [0.1, 0.3, -0.2, 0.5, 0.9, 1.1, 0.95, 1.0, 1.0, 1.0]
    expected = 0.0
    for i in range(9):  # MIB's loop, written out
        expected += (mib.PERCENTAGES[i + 1] - mib.PERCENTAGES[i]) * (f[i] + f[i + 1]) / 2
    assert mib.area_under(f) == pytest.approx(expected, abs=1e-15)
    assert mib.area_under([1.0] * 10) == pytest.approx(0.999)  # not rescaled to [0, 1]
    logx = np.log(mib.PERCENTAGES)
    assert mib.area_under(f, log_scale=True) == pytest.approx(float(np.sum(np.diff(logx) * (np.array(f[1:]) + f[:-1]) / 2)))


def test_weighted_edge_count_of_neuron_circuits():
    spec = GraphSpec(1, 2, d_model=4)
    in_graph = spec.real_edge_mask.copy()
    neurons = np.zeros((spec.n_forward, 4), bool)
    neurons[0, :2] = True  # input: half its neurons
    neurons[1] = True      # a0.h0: all
    per_src = in_graph.sum(1)
    assert mib.weighted_edge_count(in_graph, spec.real_edge_mask, neurons) == pytest.approx(per_src[0] * 0.5 + per_src[1])
    assert mib.weighted_edge_count(in_graph, spec.real_edge_mask) == spec.n_edges


# --- graph JSON: fast and the same format -------------------------------------------------------

@pytest.mark.parametrize("spec", [GraphSpec(2, 3, d_model=8), GraphSpec(2, 4, True, 8),
                                  GraphSpec(3, 4, d_model=8, n_kv_inputs=2)])
def test_graph_json_is_byte_for_byte_json_dumps(spec, tmp_path):
    g = random_graph(spec)
    g.apply_topn(spec.n_edges // 3)
    g.nodes_scores = np.arange(spec.n_forward, dtype=np.float32) / 7
    g.to_json(str(tmp_path / "g.json"))
    nodes = {n: {"in_graph": bool(g.nodes_in_graph[i]), "score": float(g.nodes_scores[i])}
             for i, n in enumerate(spec.forward_names)}
    nodes["logits"] = {"in_graph": True, "score": None}
    edges = {name: {"score": float(g.scores[s, d]), "in_graph": bool(g.in_graph[s, d])} for name, s, d in spec.edges}
    assert (tmp_path / "g.json").read_text() == json.dumps({"cfg": spec.to_cfg(), "nodes": nodes, "edges": edges})
    # the reference writes its edges in the same order; another order reads the same
    h = Graph.from_json(str(tmp_path / "g.json"), spec=spec)
    shuffled = dict(reversed(list(edges.items())))
    (tmp_path / "r.json").write_text(json.dumps({"cfg": spec.to_cfg(), "nodes": nodes, "edges": shuffled}))
    r = Graph.from_json(str(tmp_path / "r.json"))
    for x in (h, r):
        np.testing.assert_array_equal(x.scores, g.scores)
        np.testing.assert_array_equal(x.in_graph, g.in_graph)
    # irregular files still get the per-edge messages
    bad = dict(edges)
    bad[spec.edges[1][0]] = {"score": None, "in_graph": False}
    (tmp_path / "b.json").write_text(json.dumps({"cfg": spec.to_cfg(), "nodes": nodes, "edges": bad}))
    with pytest.raises(ValueError, match="1 of .* edges have no score"):
        Graph.from_json(str(tmp_path / "b.json"))
    del bad[spec.edges[2][0]]
    (tmp_path / "m.json").write_text(json.dumps({"cfg": spec.to_cfg(), "nodes": nodes, "edges": bad}))
    with pytest.raises(ValueError, match="edges are missing"):
        Graph.from_json(str(tmp_path / "m.json"))


# --- submissions ----------------------------------------------------------------------------------

def test_submission_round_trip_both_forms(tmp_path):
    spec = GraphSpec(12, 12, d_model=768)  # GPT-2 small: MIB's 32,491 edges
    assert spec.n_edges == mib.MODELS["gpt2"]
    g = random_graph(spec, 2)
    out = str(tmp_path / "sub")
    mib.write_submission(out, {"ioi_gpt2": g})
    assert os.listdir(out) == ["ioi_gpt2"] and os.listdir(os.path.join(out, "ioi_gpt2")) == ["importances.json"]
    (cell,) = mib.read_submission(out)
    np.testing.assert_array_equal(cell.importances.scores, g.scores)

    mib.write_submission(out, {"ioi_gpt2": g}, circuits=True)  # replaces the directory
    cells = {(c.cell, c.absolute): c for c in mib.read_submission(out)}
    assert set(cells) == {("ioi_gpt2", True), ("ioi_gpt2", False)}
    assert sorted(os.listdir(out)) == ["abs-False", "abs-True"]
    for (_, absolute), c in cells.items():
        assert len(c.circuits) == 9
        for circuit, pct in zip(c.circuits, mib.CIRCUIT_PERCENTAGES):
            cap = int(pct * spec.n_edges)
            expected = random_graph(spec, 2).apply_topn(cap, absolute=absolute, prune=True)
            np.testing.assert_array_equal(circuit.in_graph, expected.in_graph)
            assert circuit.count_included_edges() <= cap
    with pytest.raises(ValueError, match="not a cell of the MIB leaderboard"):
        mib.write_submission(out, {"ioi_llama2": g})
    with pytest.raises(ValueError, match="not a cell"):
        mib.cell_name("arc_easy", "gpt2")
    assert mib.cell_name("arc_easy", "llama3") == "arc-easy_llama3"


def test_submission_caps_are_checked_on_reading(tmp_path):
    spec = GraphSpec(12, 12, d_model=768)
    folder = tmp_path / "sub" / "ioi_gpt2"
    folder.mkdir(parents=True)
    for i in range(9):
        g = random_graph(spec)
        g.reset(empty=False)  # the full model: over every cap but none
        g.to_json(str(folder / f"c{i}.json"))
    with pytest.raises(ValueError, match="exceed the caps"):
        mib.read_submission(str(tmp_path / "sub"))


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_data_score_submit(mib_model, tmp_path, capsys):
    from jaxinterp.cli import main

    data = write_jsonl(tmp_path / "ioi.jsonl", ioi_rows())
    graph = random_graph(mib_model.graph_spec, 4)
    graph.to_json(str(tmp_path / "g.json"))
    pairs_csv = str(tmp_path / "pairs.csv")
    assert main(["mib", "data", "--data", data, "--task", "ioi", "--model", mib_model.path, "--out", pairs_csv]) == 0
    assert "1 rows dropped" in capsys.readouterr().out
    scores = []
    for args in (["--data", data, "--task", "ioi"], ["--data", pairs_csv]):
        out = str(tmp_path / f"s{len(scores)}.json")
        assert main(["mib", "score", "--model", mib_model.path, "--graph", str(tmp_path / "g.json"),
                     "--batch-size", "3", "--out", out, "--no-compile-cache", *args]) == 0
        scores.append(json.loads(open(out).read()))
    a, b = scores
    assert set(a) >= {"cpr", "cmd", "signed", "absolute"}
    assert len(a["signed"]["faithfulness"]) == len(a["absolute"]["edge_counts"]) == 10
    assert a["cpr"] == pytest.approx(b["cpr"], abs=1e-6) and a["cmd"] == pytest.approx(b["cmd"], abs=1e-6)
    expected = mib.score_graph(mib_model, graph, mib.load_task_data(mib_model, data, "ioi"), batch_size=5)
    assert a["cpr"] == pytest.approx(expected.cpr, abs=1e-5) and a["cmd"] == pytest.approx(expected.cmd, abs=1e-5)

    # refused before any work, exit status 2, naming the option
    for argv, message in (
            (["mib", "score", "--model", mib_model.path, "--graph", str(tmp_path / "g.json"), "--data", data],
             "give --task"),
            (["mib", "score", "--model", mib_model.path, "--graph", str(tmp_path / "g.json"), "--data",
              str(tmp_path / "nope.jsonl"), "--task", "ioi"], "--data"),
            (["mib", "data", "--data", data, "--model", mib_model.path, "--out", pairs_csv], "--task is required"),
            (["mib", "submit", "--cell", f"ioi_llama2={tmp_path / 'g.json'}", "--out", str(tmp_path / "sub")],
             "not a cell"),
            (["mib", "submit", "--cell", "ioi_gpt2", "--out", str(tmp_path / "sub")], "CELL=GRAPH.json")):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "sub")
    # a 2-layer graph is not GPT-2's: the leaderboard would refuse it after the upload
    assert main(["mib", "submit", "--cell", f"ioi_gpt2={tmp_path / 'g.json'}", "--out", str(tmp_path / "sub")]) == 2
    assert "but gpt2's graph has 32491" in capsys.readouterr().err
    gpt2 = random_graph(GraphSpec(12, 12, d_model=768))
    gpt2.to_json(str(tmp_path / "gpt2.json"))
    assert main(["mib", "submit", "--cell", f"ioi_gpt2={tmp_path / 'gpt2.json'}", "--circuits", "--ranking",
                 "absolute", "--out", str(tmp_path / "sub")]) == 0
    assert sorted(os.listdir(tmp_path / "sub" / "ioi_gpt2")) == sorted(mib.circuit_file(p)
                                                                        for p in mib.CIRCUIT_PERCENTAGES)

