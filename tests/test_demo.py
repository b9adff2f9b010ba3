"""The main job (``jaxinterp demo``) end to end on a small subset of the shipped model's IOI data."""

import json
import os
import subprocess
import sys

import numpy as np

from jaxinterp.demo import demo_model_dir, run_demo


def test_demo_writes_pictures_report_and_graphs(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out_dir=str(out), n_examples=8, batch_size=8)
    for name in ("faithfulness.png", "circuit.png", "report.md", "results.json", "ioi.csv",
                 "graph_EAP.json", "graph_EAP-IG-inputs.json", "graph_exact.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_examples"] == 8 and set(saved["curves"]) == {"EAP", "EAP-IG-inputs", "exact"}
    for curve in saved["curves"].values():
        # the circuit of all edges is the model itself, the smallest is (nearly) the corrupted run
        sizes, faith = np.array(curve["sizes"]), np.array(curve["faithfulness"])
        assert abs(faith[np.argmax(sizes)] - 1) < 1e-4
    # the trained model solves IOI: the clean logit difference is far above the corrupted one
    assert saved["clean_logit_diff"] > saved["corrupted_logit_diff"] + 3
    agreement = saved["agreement_with_exact"]
    assert set(agreement) == {"EAP", "EAP-IG-inputs"}
    assert all(-1 <= a["pearson"] <= 1 for a in agreement.values())
    report = (out / "report.md").read_text()
    assert "| top-n edges | EAP | EAP-IG-inputs | exact |" in report
    assert "Is EAP-IG more faithful than EAP" in report
    assert results["circuit"]["edges"] == len(results["circuit"]["edge_names"]) > 0


def test_demo_model_option_rejects_unreachable_hub_id(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("JAXINTERP_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "jaxinterp", "demo", "--model", "no-such-org/no-such-model",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "no-such-org/no-such-model" in proc.stderr and "local checkpoint directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_model_is_shipped_inside_the_package():
    assert os.path.isfile(os.path.join(demo_model_dir(), "model.safetensors"))
