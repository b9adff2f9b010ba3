"""``jaxinterp mib run --gemma2-heads``: the gemma2 model's cells are computed with the head
definition asked for (``shared``, the default, or MIB's ``per-input``), which is recorded
in their settings, so that changing it computes them again and keeping it does not. On the
committed random Gemma 2 of tests/golden/gemma2 (information-flow routes: one clean forward
pass per batch), 4 of the golden IOI pairs."""

import json
import os

import numpy as np

from jaxinterp import load_model
from jaxinterp.attribution import attribute
from jaxinterp.graph import Graph
from jaxinterp.mib import load_task_data
from jaxinterp.sweep import read_runlog
from devtools.testing import slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEMMA2 = os.path.join(ROOT, "tests", "golden", "gemma2", "model")
DATA = os.path.join(ROOT, "tests", "golden", "ioi.csv")
ROUTES = "information-flow-routes"
LIMIT = 4


def _cell(out):
    with open(os.path.join(out, "results", f"ioi_gemma2__{ROUTES}__edge.json")) as f:
        result = json.load(f)
    graph = Graph.from_json(os.path.join(out, "circuits", f"{ROUTES}_patching_edge", "ioi_gemma2", "importances.json"))
    return result, graph


@slow("two Gemma 2 grids, ~25 s of CPU: the per-input head definition itself is checked by value against the "
      "reference in test_gemma2_heads.py; the option's refusals run by default")
def test_gemma2_heads_is_a_setting_of_the_gemma2_cells(tmp_path):
    from jaxinterp.cli import main

    out = str(tmp_path / "run")
    argv = ["mib", "run", "--model", f"gemma2={GEMMA2}", "--task", f"ioi={DATA}", "--method", ROUTES,
            "--batch-size", str(LIMIT), "--limit", str(LIMIT), "--out", out]
    done = lambda: [e["event"] for e in read_runlog(out)].count("done")  # noqa: E731

    assert main(argv) == 0
    shared_result, shared = _cell(out)
    assert shared_result["settings"]["gemma2_heads"] == "shared" and done() == 1
    assert main(argv + ["--gemma2-heads", "shared"]) == 0  # the default, named: nothing to compute
    assert done() == 1
    assert main(argv + ["--gemma2-heads", "per-input"]) == 0
    result, graph = _cell(out)
    assert result["settings"]["gemma2_heads"] == "per-input" and done() == 2
    assert main(argv + ["--gemma2-heads", "per-input"]) == 0
    assert done() == 2

    # the cell's routes are those of the model loaded with MIB's head definition, not shared ones
    model = load_model(GEMMA2, gemma2_heads="per-input")
    want = attribute(model, load_task_data(model, DATA, limit=LIMIT), ROUTES, batch_size=LIMIT, quiet=True).scores
    real = model.graph_spec.real_edge_mask
    scale = np.abs(want[real]).max()
    assert np.abs(graph.scores - want)[real].max() <= 1e-5 * scale
    assert np.abs(shared.scores - want)[real].max() > 1e-2 * scale


def test_gemma2_heads_refusals(tmp_path, capsys):
    """Refused before any work, one line each, exit 2: the option without a gemma2 model
    in the grid, and per-input heads with exact patching (not offered with them)."""
    from jaxinterp.cli import main

    demo = os.path.join(ROOT, "jaxinterp", "demo", "model")
    for models, extra, message in [([f"gpt2={demo}"], [], "no gemma2 model"),
                                   ([f"gemma2={GEMMA2}"], ["--method", "exact"], "--method exact")]:
        out = str(tmp_path / "r")
        argv = ["mib", "run", "--task", f"ioi={DATA}", "--gemma2-heads", "per-input", "--out", out, *extra]
        for m in models:
            argv += ["--model", m]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "--gemma2-heads" in err and len(err.splitlines()) == 1
        assert not os.path.exists(out)
