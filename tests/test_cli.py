"""The command line contract: attribute -> evaluate -> curve on a small checkpoint."""

import json
import os

import pytest

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


def test_evaluate_with_mean_ablation_over_other_prompts(tmp_path, gpt2_dir, ioi_csv, model, capsys):
    from jaxinterp.interventions import prepare_data
    from jaxinterp.evaluation import evaluate_empty, evaluate_graph

    from devtools.testing import write_ioi_csv

    other = write_ioi_csv(tmp_path / "other.csv", model.tokenizer, n=6, seed=5)
    out = str(tmp_path / "graph.json")
    assert main(["attribute", "--model", gpt2_dir, "--data", ioi_csv, "--method", "EAP", "--intervention", "mean",
                 "--intervention-data", other, "--batch-size", "8", "--out", out]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", gpt2_dir, "--data", ioi_csv, "--graph", out, "--top-n", "20",
                 "--intervention", "mean-positional", "--intervention-data", other, "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    pairs = prepare_data(model, ioi_csv, "logit_diff")[0]
    g = Graph.from_json(out)
    g.apply_topn(20)
    other_pairs = prepare_data(model, other, "logit_diff")[0]
    kw = dict(intervention="mean-positional", intervention_data=other_pairs, batch_size=8)
    # the CLI evaluates the circuit, the full model and the empty circuit in one pass (three masks
    # vectorised together, prompts padded to a length bucket), the library calls one mask each:
    # equal up to float rounding, relative to the scale of the metric values compared
    scale = max(abs(result["model"]), abs(result["circuit"]), abs(result["empty"]))
    assert result["circuit"] == pytest.approx(evaluate_graph(model, g, pairs, **kw), abs=1e-6 * scale)
    assert result["empty"] == pytest.approx(evaluate_empty(model, pairs, **kw), abs=1e-6 * scale)
    assert result["intervention"] == "mean-positional"


def test_prune_writes_a_circuit_of_the_requested_size(tmp_path, gpt2_dir, ioi_csv, capsys):
    out = str(tmp_path / "learned.json")
    assert main(["prune", "--model", gpt2_dir, "--data", ioi_csv, "--edges", "20", "--steps", "30",
                 "--batch-size", "8", "--out", out]) == 0
    g = Graph.from_json(out)
    assert g.count_included_edges() == 20
    assert os.path.getsize(str(tmp_path / "learned_training.png")) > 1000
    printed = capsys.readouterr().out
    assert "kept 20 edges" in printed and "edge pruning (kl_div, 30 steps" in printed  # --metric is the loss
    with pytest.raises(SystemExit):  # one option for the loss: --metric (the old --objective is gone)
        main(["prune", "--model", gpt2_dir, "--data", ioi_csv, "--edges", "20", "--objective", "kl_div", "--out", out])


def test_a_finished_command_exits_after_its_output_and_exit_hooks(tmp_path, gpt2_dir):
    """A real invocation that succeeded ends without the interpreter's teardown
    (``cli._exit_now``: it only destroys objects), but after everything is out: the
    output through a pipe, the exit hooks (jax.distributed's shutdown is one), status 0."""
    import subprocess
    import sys

    argv = ["lens", "--model", gpt2_dir, "--prompt", "When Mary", "--out", str(tmp_path / "lens.png")]
    code = ("import atexit, sys\n"
            "class Teardown:\n"
            "    def __del__(self): print('teardown ran', flush=True)\n"
            "kept = Teardown()\n"
            "atexit.register(lambda: print('exit hook ran', flush=True))\n"
            "from jaxinterp.cli import main\n"
            f"sys.argv[1:] = {argv!r}\n"
            "sys.exit(main())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "logit lens at the last token" in p.stdout and p.stdout.rstrip().endswith("exit hook ran"), p.stdout
    assert "teardown ran" not in p.stdout and (tmp_path / "lens.png").exists()
