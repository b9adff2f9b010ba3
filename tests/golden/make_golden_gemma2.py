"""Make ``tests/golden/gemma2/``: the reference's edge scores and circuit metrics on a random
Gemma 2, for ``tests/test_gemma2_heads.py`` (``gemma2_heads="per-input"``: MIB's head
definition). Not run in CI (it needs the reference's PyTorch venv); its outputs are committed.

Reference and venv as in tests/golden/make_golden.py (hannamw/EAP-IG at 795f560, its only
change ``device='cuda'`` replaced by the model's device; TransformerLens 2.18, torch 2.13,
transformers 4.57). From the repository root, in two steps (the first in jaxinterp's venv:
it builds the checkpoint, only if ``tests/golden/gemma2`` is missing)::

    JAX_PLATFORMS=cpu python tests/golden/make_golden_gemma2.py prepare
    /tmp/refvenv/bin/python tests/golden/make_golden_gemma2.py reference

The checkpoint: devtools.testing's random 2-layer ``Gemma2ForCausalLM`` (d_model 32, 4
query heads over 2 key/value heads, head_dim 16, sliding window 3 in layer 0, attention
and final soft-caps, sandwich norms, tied embeddings) with ``initializer_range=0.3`` so
that edges matter, over the task vocabulary; weights committed. In TransformerLens through
a ``HookedTransformerConfig`` built from its config.json (:func:`load_gemma2`: Gemma-2's
settings as TransformerLens' own ``google/gemma-2-2b`` entry, with this model's sizes,
window, layer types and query scale) and TransformerLens' ``convert_gemma_weights``,
weights unprocessed; its logits are checked against transformers' (eager attention).

What the reference does on Gemma 2 (TransformerLens ``use_normalization_before_and_after``):
a head's node output is ``hook_result``, its raw ``z_h W_O[h]``, while the attention output
joining the residual stream is ``ln1_post(sum_h result_h + b_O)``. Its ``evaluate_graph``
therefore builds each downstream input from this run's inputs plus, per upstream layer,
``ln1_post(clean sum + sum of the input's corrupted-minus-clean heads) - ln1_post(clean
sum)`` (each input renormalises its own mix of heads); its gradient methods score a head
edge as ``(corrupted - clean result_h) . d metric / d input``, no ``ln1_post`` Jacobian.

Runs, as make_golden.py (the 12 IOI pairs of tests/golden/ioi.csv, batch size 4: three
equal batches, so the reference's gradient scores are jaxinterp's divided by 4; batch-mean
``logit_diff`` with ``loss=True``, ``ig_steps=3``): EAP (patching, zero), EAP-IG-inputs,
EAP-IG-activations and clean-corrupted (patching), each followed by ``apply_topn(n)`` and
``evaluate_graph`` (per-example ``logit_diff``); and information-flow-routes. With
make_golden.py's work-arounds of two reference bugs (``WORK_AROUNDS`` there): on this rotary
model its EAP-IG-activations would lose the input group's gradient into layer 0. Files:
``<method>_<intervention>.json`` (``Graph.to_json``: scores and the pruned top-n circuit)
and ``gemma2.json`` (settings, versions, the TL-vs-HF check, the circuit metrics, the
clean and corrupted baselines, the empty and full circuits per intervention).
"""

import argparse
import json
import os
import sys
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "gemma2")
MODEL = "tests/golden/gemma2/model"
CSV = os.path.join(HERE, "ioi.csv")
BATCH_SIZE = 4
IG_STEPS = 3
TOPN = 30
RUNS = [("EAP", "patching"), ("EAP", "zero"), ("EAP-IG-inputs", "patching"), ("EAP-IG-activations", "patching"),
        ("clean-corrupted", "patching"), ("information-flow-routes", "patching")]


def prepare():
    """jaxinterp's venv: the random Gemma 2 checkpoint (once)."""
    sys.path.insert(0, ROOT)
    from devtools.testing import save_random_gemma2
    from jaxinterp import tasks

    path = os.path.join(ROOT, MODEL)
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        save_random_gemma2(path, seed=0, words=tasks.task_vocabulary(), initializer_range=0.3)


def load_gemma2(model_dir, device="cpu"):
    """A local HF Gemma 2 checkpoint in TransformerLens, as the reference needs it."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    hc = hf.config
    assert hc.model_type == "gemma2" and not hc.attention_bias
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    cfg = HookedTransformerConfig(
        d_model=hc.hidden_size, d_head=hc.head_dim, n_heads=hc.num_attention_heads, d_mlp=hc.intermediate_size,
        n_layers=hc.num_hidden_layers, n_ctx=hc.max_position_embeddings, eps=hc.rms_norm_eps,
        d_vocab=hc.vocab_size, act_fn=hc.hidden_activation, normalization_type="RMS", rotary_base=hc.rope_theta,
        positional_embedding_type="rotary", rotary_dim=hc.head_dim, rotary_adjacent_pairs=False,
        use_attn_scale=True, attn_scale=hc.query_pre_attn_scalar ** 0.5, n_key_value_heads=hc.num_key_value_heads,
        ungroup_grouped_query_attention=True, window_size=hc.sliding_window, use_local_attn=True,
        attn_types=[kinds[t] for t in hc.layer_types], attn_scores_soft_cap=hc.attn_logit_softcapping,
        output_logits_soft_cap=hc.final_logit_softcapping, gated_mlp=True, final_rms=True,
        use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM",
        default_prepend_bos=True, tokenizer_prepends_bos=False, dtype=torch.float32, device=device)
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model.load_and_process_state_dict(
        convert_gemma_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.eval()
    return model, hf


def reference(eap_ig_path):
    if eap_ig_path:
        sys.path.insert(0, os.path.join(eap_ig_path, "src"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from importlib.metadata import version

    import eap
    import torch
    from eap.attribute import attribute
    from eap.evaluate import evaluate_baseline, evaluate_graph
    from eap.graph import Graph
    from reference_eapig import EAPDataset, check_against_hf, eap_ig_commit, logit_diff

    sys.path.insert(0, HERE)
    from make_golden import WORK_AROUNDS, _work_around_reference_bugs

    torch.set_grad_enabled(True)
    _work_around_reference_bugs(eap)  # rotary: EAP-IG-activations would lose input -> layer-0 gradients
    model, hf = load_gemma2(os.path.join(ROOT, MODEL))
    ds = EAPDataset(CSV)
    logit_check = check_against_hf(model, hf, list(ds.df["clean"]))
    del hf
    dl = ds.to_dataloader(BATCH_SIZE)
    attr_metric = partial(logit_diff, loss=True, mean=True)
    eval_metric = partial(logit_diff, loss=False, mean=False)
    out = {"reference": {"repository": "hannamw/EAP-IG", "commit": eap_ig_commit(eap),
                         "change": "device='cuda' replaced by device=model.cfg.device",
                         "work_arounds": WORK_AROUNDS, "torch": version("torch"), "transformer_lens": version("transformer-lens"),
                         "transformers": version("transformers")},
           "model": MODEL, "data": os.path.relpath(CSV, ROOT), "metric": "logit_diff", "ig_steps": IG_STEPS,
           "batch_size": BATCH_SIZE, "n_examples": len(ds), "tl_hf_max_logit_diff": logit_check,
           "clean": evaluate_baseline(model, dl, eval_metric, quiet=True).mean().item(),
           "corrupted": evaluate_baseline(model, dl, eval_metric, run_corrupted=True, quiet=True).mean().item(),
           "interventions": {}, "runs": []}
    for intervention in ("patching", "zero"):
        graph = Graph.from_model(model)
        empty = evaluate_graph(model, graph, dl, eval_metric, intervention=intervention, quiet=True).mean().item()
        graph.in_graph |= graph.real_edge_mask
        graph.nodes_in_graph[:] = True
        full = evaluate_graph(model, graph, dl, eval_metric, intervention=intervention, quiet=True).mean().item()
        out["interventions"][intervention] = {"empty": empty, "full": full}
    os.makedirs(OUT, exist_ok=True)
    for method, intervention in RUNS:
        graph = Graph.from_model(model)
        attribute(model, graph, dl, attr_metric, method=method, intervention=intervention,
                  ig_steps=IG_STEPS if "IG" in method else None, quiet=True)
        max_abs = graph.scores[graph.real_edge_mask].abs().max().item()
        graph.apply_topn(TOPN, True)
        m = evaluate_graph(model, graph, dl, eval_metric, intervention=intervention, quiet=True).mean().item()
        fname = f"{method}_{intervention}.json"
        graph.to_json(os.path.join(OUT, fname))
        out["runs"].append({"method": method, "intervention": intervention, "graph": f"gemma2/{fname}",
                            "topn": TOPN, "circuit_edges": graph.count_included_edges(), "circuit_metric": m,
                            "max_abs_score": max_abs})
        print(out["runs"][-1], flush=True)
    with open(os.path.join(OUT, "gemma2.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "reference"])
    ap.add_argument("--eap-ig-path", default=os.environ.get("EAP_IG_PATH", "/tmp/eapig"),
                    help="EAP-IG checkout if not pip-installed (PATH/src goes on sys.path)")
    args = ap.parse_args()
    prepare() if args.step == "prepare" else reference(args.eap_ig_path)
