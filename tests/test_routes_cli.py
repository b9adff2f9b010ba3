"""``jaxinterp attribute --method information-flow-routes``: the graph it writes (scores
of the API, the greedy circuit MIB would take) and the options it refuses before any work."""

import pytest

from jaxinterp.attribution import attribute
from jaxinterp.cli import main
from jaxinterp.graph import Graph

METHOD = "information-flow-routes"


def test_writes_the_scores_and_the_greedy_circuit(tmp_path, gpt2_dir, ioi_csv, model, capsys):
    out = str(tmp_path / "routes.json")
    assert main(["attribute", "--model", gpt2_dir, "--data", ioi_csv, "--method", METHOD, "--batch-size", "5",
                 "--top-n", "12", "--out", out]) == 0
    g = Graph.from_json(out)
    api = attribute(model, ioi_csv, method=METHOD, batch_size=5, quiet=True)
    assert abs(g.scores - api.scores).max() <= 1e-6 * abs(api.scores).max()
    greedy = Graph(api.spec, api.scores).apply_greedy(12)
    assert (g.in_graph == greedy.in_graph).all() and g.count_included_edges() == greedy.count_included_edges() > 0
    assert not (g.in_graph == Graph(api.spec, api.scores).apply_topn(12).in_graph).all()  # greedy, not top-n
    capsys.readouterr()


@pytest.mark.parametrize("extra,flag", [(["--intervention", "zero"], "--intervention"),
                                        (["--level", "node"], "--level"), (["--remat"], "--remat"),
                                        (["--max-memory", "1GB"], "--max-memory")])
def test_refuses_options_it_does_not_read(tmp_path, gpt2_dir, ioi_csv, capsys, extra, flag):
    out = tmp_path / "routes.json"
    code = main(["attribute", "--model", gpt2_dir, "--data", ioi_csv, "--method", METHOD, "--out", str(out)] + extra)
    err = capsys.readouterr().err
    assert code == 2 and f"{flag} is not offered with --method {METHOD}" in err and "Traceback" not in err, err
    assert not out.exists()


def test_gemma2_heads_is_refused_for_a_model_without_sandwich_norms(tmp_path, gpt2_dir, ioi_csv, capsys):
    out = tmp_path / "g.json"
    code = main(["attribute", "--model", gpt2_dir, "--data", ioi_csv, "--method", "EAP", "--gemma2-heads",
                 "per-input", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "gemma2_heads 'per-input'" in err and "no sandwich norms" in err, err
    assert "Traceback" not in err and not out.exists()
