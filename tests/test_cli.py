"""The command line contract: attribute -> evaluate -> curve on a small checkpoint."""

import json
import os

from jaxinterp.cli import main
from jaxinterp.graph import Graph


def test_attribute_evaluate_curve(tmp_path, gpt2_dir, ioi_csv, capsys):
    out = str(tmp_path / "graph.json")
    assert main(["attribute", "--model", gpt2_dir, "--data", ioi_csv, "--method", "EAP-IG-inputs",
                 "--ig-steps", "3", "--batch-size", "8", "--out", out]) == 0
    g = Graph.from_json(out)
    assert g.spec.n_layers == 2 and g.spec.n_heads == 4 and abs(g.scores).sum() > 0
    capsys.readouterr()

    assert main(["evaluate", "--model", gpt2_dir, "--data", ioi_csv, "--graph", out, "--top-n", "20",
                 "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["edges"] <= 20 and result["faithfulness"] is not None

    png = str(tmp_path / "curve.png")
    assert main(["curve", "--model", gpt2_dir, "--data", ioi_csv, "--graph", out, "--sizes", "5,20,100,1000",
                 "--batch-size", "8", "--out", png]) == 0
    assert os.path.getsize(png) > 1000


def test_help_explains_options(capsys):
    try:
        main(["attribute", "--help"])
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    for option in ["--method", "--ig-steps", "--metric", "--batch-size", "--out", "--intervention"]:
        assert option in text
