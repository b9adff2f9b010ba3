"""``.pt`` graph files, the reference's ``Graph.to_pt`` / ``from_pt`` form (MIB's
run_evaluation.py reads it), through the optional extra ``jaxinterp[torch]``.

Against the reference: ``.pt`` files written by its own ``Graph.to_pt`` (an edge graph with
a circuit, a node-scored and a neuron-scored graph of the demo model;
tests/golden/make_golden_mib_extras.py) read by jaxinterp equal, array for array, what
jaxinterp reads from the reference's JSON of the same graph; the file jaxinterp writes
holds the reference's keys, names, tensor dtypes and shapes. Round trips (edge, node,
neuron, the grouped view); ``mib submit --format pt`` and reading ``.pt`` cells back;
without torch, one clear error naming the file and the extra (exit 2, checked in a child
process where torch cannot be imported)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxinterp import mib
from jaxinterp.graph import Graph, GraphSpec

torch = pytest.importorskip("torch")

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
EXTRAS = os.path.join(GOLDEN, "mib_extras")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "jaxinterp", "demo", "model")
CSV = os.path.join(GOLDEN, "ioi.csv")
with open(os.path.join(EXTRAS, "extras.json")) as _f:
    INFO = json.load(_f)


def assert_same_graph(a: Graph, b: Graph):
    assert a.spec == b.spec
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.in_graph, b.in_graph)
    np.testing.assert_array_equal(a.nodes_in_graph, b.nodes_in_graph)
    for attr in ("nodes_scores", "neurons_scores", "neurons_in_graph"):
        x, y = getattr(a, attr), getattr(b, attr)
        assert (x is None) == (y is None), attr
        if x is not None:
            np.testing.assert_array_equal(x, y)  # NaN (unscored) in the same places


@pytest.mark.parametrize("entry", INFO["pt"], ids=lambda e: e["pt"])
def test_reference_pt_files_read_as_its_json(entry):
    got = Graph.from_json(os.path.join(EXTRAS, entry["pt"]))  # the name chooses the form
    want = Graph.from_json(os.path.join(EXTRAS, entry["json"]))
    assert_same_graph(got, want)
    # something to compare: the scores the graph's level has
    scored = [a for a in (got.nodes_scores, got.neurons_scores) if a is not None] or [got.scores]
    assert np.nanmax(np.abs(scored[0])) > 0.1
    if "edges_in_graph" in entry:
        assert got.count_included_edges() == entry["edges_in_graph"] > 0


def _graphs():
    spec = GraphSpec(2, 3, d_model=5)
    rng = np.random.default_rng(0)
    edge = Graph(spec, rng.standard_normal((spec.n_forward, spec.n_backward)))
    edge.apply_topn(30, absolute=True)
    assert 0 < edge.count_included_edges() < spec.n_edges
    node = Graph(spec, edge.scores)
    node.nodes_scores = rng.standard_normal(spec.n_forward).astype(np.float32)
    node.nodes_scores[0] = np.nan  # unscored
    neuron = Graph(spec, edge.scores)
    neuron.neurons_scores = rng.standard_normal((spec.n_forward, 5)).astype(np.float32)
    neuron.neurons_scores[1, 2] = np.nan
    neuron.neurons_in_graph = rng.random((spec.n_forward, 5)) > 0.5
    grouped = Graph(GraphSpec(2, 4, d_model=8, n_kv_inputs=2), None)
    grouped.scores[grouped.spec.real_edge_mask] = rng.standard_normal(grouped.spec.n_edges)
    grouped.apply_topn(20, absolute=False)
    assert grouped.in_graph.any()
    return {"edge": edge, "node": node, "neuron": neuron, "grouped": grouped}


@pytest.mark.parametrize("kind", ["edge", "node", "neuron", "grouped"])
def test_round_trip(tmp_path, kind):
    g = _graphs()[kind]
    path = str(tmp_path / "g.pt")
    g.to_json(path)  # the name chooses the form
    with open(path, "rb") as f:
        assert f.read(2) == b"PK"  # torch.save's zip, not JSON
    back = Graph.from_pt(path, spec=g.spec)
    assert_same_graph(back, g)
    g.to_pt(str(tmp_path / "h.pt"))
    assert_same_graph(Graph.from_json(str(tmp_path / "h.pt")), g)


def test_written_file_has_the_references_form(tmp_path):
    """Keys, row/column names, tensor dtypes and shapes as the reference's own to_pt
    writes them (its from_pt assigns the tensors by position)."""
    ours_path = str(tmp_path / "ours.pt")
    for entry in INFO["pt"]:
        theirs = torch.load(os.path.join(EXTRAS, entry["pt"]), weights_only=True)
        Graph.from_json(os.path.join(EXTRAS, entry["pt"])).to_pt(ours_path)
        ours = torch.load(ours_path, weights_only=True)
        assert set(ours) == set(theirs), entry["pt"]
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
                assert torch.equal(torch.nan_to_num(ours[key].float(), 7.0), torch.nan_to_num(value.float(), 7.0)), key
            else:
                assert ours[key] == value, key


def test_submission_in_pt_form(tmp_path):
    spec = GraphSpec(12, 12, d_model=768)  # GPT-2 small: MIB's 32,491 edges
    rng = np.random.default_rng(1)
    g = Graph(spec, rng.standard_normal((spec.n_forward, spec.n_backward)))
    out = str(tmp_path / "sub")
    mib.write_submission(out, {"ioi_gpt2": g}, fmt="pt")
    assert os.listdir(os.path.join(out, "ioi_gpt2")) == ["importances.pt"]
    (cell,) = mib.read_submission(out)
    np.testing.assert_array_equal(cell.importances.scores, g.scores)
    mib.write_submission(out, {"ioi_gpt2": g}, circuits=True, ranking="absolute", fmt="pt")
    assert sorted(os.listdir(os.path.join(out, "ioi_gpt2"))) == sorted(mib.circuit_file(p, "pt")
                                                                       for p in mib.CIRCUIT_PERCENTAGES)
    (cell,) = mib.read_submission(out)
    for circuit, pct in zip(cell.circuits, mib.CIRCUIT_PERCENTAGES):
        want = Graph(spec, g.scores).apply_topn(int(pct * spec.n_edges), absolute=True)
        np.testing.assert_array_equal(circuit.in_graph, want.in_graph)


def test_cli_reads_and_writes_pt(tmp_path, capsys):
    """``mib submit`` takes a ``.pt`` cell and writes ``--format pt``; a file that is not a
    ``.pt`` graph and a ``.pt`` of another shape are refused in one line, exit 2."""
    from jaxinterp.cli import main

    spec = GraphSpec(12, 12, d_model=768)
    g = Graph(spec, np.random.default_rng(2).standard_normal((spec.n_forward, spec.n_backward)))
    g.to_pt(str(tmp_path / "g.pt"))
    out = str(tmp_path / "sub")
    assert main(["mib", "submit", "--cell", f"ioi_gpt2={tmp_path / 'g.pt'}", "--format", "pt", "--out", out]) == 0
    np.testing.assert_array_equal(Graph.from_pt(os.path.join(out, "ioi_gpt2", "importances.pt")).scores, g.scores)
    capsys.readouterr()
    (tmp_path / "bad.pt").write_text("not a torch file")
    torch.save({"cfg": {"n_layers": 1}}, str(tmp_path / "keys.pt"))
    for bad, message in [("bad.pt", "not a readable .pt graph file"), ("keys.pt", "missing keys")]:
        assert main(["mib", "submit", "--cell", f"ioi_gpt2={tmp_path / bad}", "--out", str(tmp_path / "s2")]) == 2
        err = capsys.readouterr().err.strip()
        assert bad in err and message in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "s2")


NO_TORCH = """
import contextlib, io, json, sys
sys.modules["torch"] = None  # import torch raises ImportError, as where it is not installed
from jaxinterp.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append((main(argv), err.getvalue()))
print(json.dumps(results))
"""


def test_without_torch_one_clear_error(tmp_path):
    """Where torch is not installed, reading a ``.pt`` graph (``mib auroc --graph x.pt``,
    ``mib submit --cell ...=x.pt``, ``ensemble --graph x.pt``) or writing one (``mib
    submit --format pt``, ``attribute --out x.pt``) stops before any work with one line
    naming the file or option and ``pip install jaxinterp[torch]``, exit 2; the JSON form
    works as before (one child process for all)."""
    g = _graphs()["edge"]
    g.to_pt(str(tmp_path / "g.pt"))
    g.to_json(str(tmp_path / "g.json"))
    runs = [(["mib", "auroc", "--graph", str(tmp_path / "g.pt"), "--reference", str(tmp_path / "g.json")], "g.pt"),
            (["mib", "submit", "--cell", f"ioi_gpt2={tmp_path / 'g.pt'}", "--out", str(tmp_path / "s")], "g.pt"),
            (["mib", "submit", "--cell", f"ioi_gpt2={tmp_path / 'g.json'}", "--format", "pt",
              "--out", str(tmp_path / "s")], "--format pt"),
            (["ensemble", "--graph", str(tmp_path / "g.json"), "--graph", str(tmp_path / "g.pt"),
              "--out", str(tmp_path / "s")], "--graph"),
            (["attribute", "--model", DEMO, "--data", CSV, "--out", str(tmp_path / "s.pt")], "--out")]
    ok = ["mib", "auroc", "--graph", str(tmp_path / "g.json"), "--reference", str(tmp_path / "g.json")]
    res = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps([argv for argv, _ in runs] + [ok])],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for (argv, named), (code, err) in zip(runs, results):
        err = err.strip()
        assert code == 2, err
        assert named in err and "pip install jaxinterp[torch]" in err and len(err.splitlines()) == 1, err
        assert "Traceback" not in err and not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "s.pt")
    assert results[-1][0] == 0, results[-1][1]  # a JSON graph needs no torch
