"""Make ``tests/golden/ifr/``: information-flow-routes edge scores (Ferrando & Voita 2024)
computed by the reference, hannamw/EAP-IG's ``attribute(..., method='information-flow-routes')``,
and its greedy selection (``Graph.apply_greedy``, which MIB applies to these scores), for
``tests/test_routes.py``. Not run in CI (it needs the reference's PyTorch venv); its
outputs are committed.

Reference and venv as in tests/golden/make_golden.py (hannamw/EAP-IG at 795f560, its only
change ``device='cuda'`` replaced by the model's device; TransformerLens 2.18, torch 2.13).
From the repository root, in the reference's venv::

    /tmp/refvenv/bin/python tests/golden/make_golden_ifr.py reference

Checkpoint: ``demo``, the shipped GPT-2-like model (LayerNorm, learned positions,
sequential). A grouped-query RMSNorm model's routes are in tests/golden/make_golden_gemma2.py
(Gemma 2, rotary; jaxinterp's ``gemma2_heads="per-input"``). Data: the 12 IOI pairs of
tests/golden/ioi.csv (clean prompts only: the method reads nothing else), batch size 5
(batches 5, 5, 2).

The reference's scores are NaN on the edges ``input -> a0.*`` of ``demo``:
it divides 0 by 0 at tokens where no upstream node is close to the stream (zero pad
embeddings at padding tokens; a position embedding that outweighs the token's), and a NaN
times its padding mask stays NaN. Its greedy selection then compares NaNs. So the greedy
circuit is taken on the reference's scores with those NaNs replaced by their value
without the 0/0 (:func:`input_share`, jaxinterp's convention: such tokens count 0).

Files: ``<checkpoint>.json``, the reference's ``Graph.to_json`` of its scores;
``<checkpoint>_greedy.json``, the same after the NaN replacement and ``apply_greedy(n)``
(its pruned greedy circuit as ``in_graph``); ``ifr.json`` (settings, versions, the
TL-vs-HF logit check, per checkpoint ``n``, the number of NaN scores and their replacement).
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "ifr")
CSV = os.path.join(HERE, "ioi.csv")
CHECKPOINTS = {  # name: (model directory relative to the repository root, family, batch size, greedy n)
    "demo": ("jaxinterp/demo/model", "gpt2", 5, 30),
}
METHOD = "information-flow-routes"


def input_share(model, ds):
    """What the reference's NaN scores (``input -> a0.*``, 0/0 at tokens where the input,
    layer 0's only upstream node, is not close to its stream) are without that division:
    the mean over prompts of the fraction of real tokens where ``|x|_1 > |x - emb|_1``
    (x: the stream entering layer 0, emb: ``hook_embed``), from TransformerLens' tables."""
    from eap.utils import tokenize_plus

    tokens, mask, lengths, n_pos = tokenize_plus(model, list(ds.df["clean"]))
    emb = model.W_E[tokens]
    x = emb + model.W_pos[:n_pos][None] if model.cfg.positional_embedding_type == "standard" else emb
    hits = (x.abs().sum(-1) > (x - emb).abs().sum(-1)) & mask.bool()
    return float((hits.sum(1) / lengths).mean())


def reference(eap_ig_path):
    if eap_ig_path:
        sys.path.insert(0, os.path.join(eap_ig_path, "src"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from importlib.metadata import version

    import eap
    import torch
    from eap.attribute import attribute
    from eap.graph import Graph
    from reference_eapig import EAPDataset, check_against_hf, eap_ig_commit, load_model

    loaders = {"gpt2": load_model}
    out = {"reference": {"repository": "hannamw/EAP-IG", "commit": eap_ig_commit(eap),
                         "change": "device='cuda' replaced by device=model.cfg.device",
                         "torch": version("torch"), "transformer_lens": version("transformer-lens"),
                         "transformers": version("transformers")},
           "method": METHOD, "data": os.path.relpath(CSV, ROOT), "checkpoints": {}}
    ds = EAPDataset(CSV)
    os.makedirs(OUT, exist_ok=True)
    for name, (rel, family, batch_size, n_greedy) in CHECKPOINTS.items():
        model, hf = loaders[family](os.path.join(ROOT, rel), "cpu")
        logit_check = check_against_hf(model, hf, list(ds.df["clean"]))
        del hf
        dl = ds.to_dataloader(batch_size)
        graph = Graph.from_model(model)
        # the metric is not read by this method; the reference's signature asks for one
        attribute(model, graph, dl, lambda *a: None, method=METHOD, quiet=True)
        real = graph.scores[graph.real_edge_mask]
        fname = f"{name}.json"
        graph.to_json(os.path.join(OUT, fname))  # the scores as the reference leaves them
        nan = torch.isnan(graph.scores) & graph.real_edge_mask
        share = input_share(model, ds) if nan.any() else None
        graph.scores[nan] = share if nan.any() else 0.0
        graph.apply_greedy(n_greedy, absolute=True, prune=True)
        gname = f"{name}_greedy.json"
        graph.to_json(os.path.join(OUT, gname))
        out["checkpoints"][name] = {
            "model": rel, "family": family, "batch_size": batch_size, "n_examples": len(ds),
            "tl_hf_max_logit_diff": logit_check, "graph": f"ifr/{fname}", "nan_scores": int(nan.sum()),
            "nan_replaced_by": share, "greedy": f"ifr/{gname}", "greedy_n": n_greedy,
            "circuit_edges": graph.count_included_edges(), "max_abs_score": float(real[~torch.isnan(real)].abs().max())}
        print(name, out["checkpoints"][name], flush=True)
    with open(os.path.join(OUT, "ifr.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["reference"])
    ap.add_argument("--eap-ig-path", default=os.environ.get("EAP_IG_PATH", "/tmp/eapig"),
                    help="EAP-IG checkout if not pip-installed (PATH/src goes on sys.path)")
    args = ap.parse_args()
    reference(args.eap_ig_path)
