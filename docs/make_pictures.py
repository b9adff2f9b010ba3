"""The README's pictures of causal tracing, the logit lens and an ACDC circuit, from the
shipped demo model (no download; about a minute on a laptop CPU):

    python docs/make_pictures.py
"""

import os
import tempfile

import numpy as np

from jaxinterp import load_model, tasks
from jaxinterp.acdc import acdc
from jaxinterp.demo import DEMO_SEED, demo_model_dir
from jaxinterp.lens import lens_report, plot_logit_lens
from jaxinterp.plots import draw_circuit
from jaxinterp.tracing import causal_trace, plot_trace

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "When Mary and John went to the store , John gave a drink to"


def main():
    model = load_model(demo_model_dir())
    traces = [causal_trace(model, PROMPT, subject="Mary", kind=kind) for kind in ("resid", "mlp", "attn")]
    plot_trace(traces, os.path.join(HERE, "causal_trace.png"),
               title="Causal trace on the demo model: noise on 'Mary', restore one state at a time")
    print("causal trace, p(Mary):", {t.kind: np.round(t.scores, 2).max() for t in traces},
          f"clean {traces[0].p_clean:.3f}, corrupted {traces[0].p_corrupted:.3f}")

    report = lens_report(model, PROMPT)
    plot_logit_lens(report["lens"], report["tokens"], lambda t: model.tokenizer.decode([t]),
                    os.path.join(HERE, "logit_lens.png"), title=f"Logit lens on the demo model: {PROMPT!r}")

    csv = os.path.join(tempfile.mkdtemp(), "ioi.csv")
    tasks.write_pairs_csv("ioi", 64, csv, model.tokenizer, seed=DEMO_SEED)
    graph = acdc(model, csv, threshold=0.01)
    draw_circuit(graph, os.path.join(HERE, "acdc_circuit.png"),
                 title=f"ACDC circuit of the demo model on IOI (KL threshold 0.01): "
                       f"{graph.count_included_edges()} of {graph.spec.n_edges} edges")
    os.remove(os.path.join(HERE, "acdc_circuit.dot"))


if __name__ == "__main__":
    main()
