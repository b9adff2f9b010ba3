"""Make ``tests/golden/``: edge scores and circuit metrics computed by the reference,
hannamw/EAP-IG, for ``tests/test_golden.py``. Not run in CI (it needs the reference's
PyTorch venv); its outputs are committed.

Reference: hannamw/EAP-IG at commit 795f5607b25638935aec89aee3c1cb4bd9ed72f1, its only
change the hard-coded ``device='cuda'`` replaced by the model's device, run on
TransformerLens 2.18.0 / transformers 4.57.6 / torch 2.13.0 (CPU) in its own venv::

    git clone https://github.com/hannamw/EAP-IG /tmp/eapig
    git -C /tmp/eapig checkout 795f5607b25638935aec89aee3c1cb4bd9ed72f1
    sed -i "s/device='cuda'/device=model.cfg.device/g" /tmp/eapig/src/eap/*.py
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 "transformer-lens<3" "transformers>=4.57,<4.58" \\
        "datasets<3" "pyarrow<17" einops pandas matplotlib
    /tmp/refvenv/bin/pip install --no-deps -e /tmp/eapig

Then, from the repository root, in two steps (the first in jaxinterp's venv: it builds
the random NeoX checkpoint, only if ``tests/golden/neox`` is missing, and the CSV; the
second in the reference's venv, which has no JAX)::

    JAX_PLATFORMS=cpu python tests/golden/make_golden.py prepare
    /tmp/refvenv/bin/python tests/golden/make_golden.py reference

Checkpoints: ``demo``, the shipped trained GPT-2-like demo model (sequential; effects up
to ~5 logits per edge), and ``neox``, a random-init 3-layer GPT-NeoX (parallel attention
and MLP, partial rotary) with ``initializer_range=0.3`` and random linear biases so that
edges matter; its weights are committed so that the test does not depend on torch's RNG.
Data: 12 IOI pairs of the task vocabulary both models share. Batch size 5 on ``demo``
(batches 5, 5, 2: a ragged last batch) and 4 on ``neox`` (3 equal batches).

For every method x intervention the reference offers (EAP and EAP-IG-activations and
exact with ``patching`` and ``zero``; EAP-IG-inputs and clean-corrupted with ``patching``),
``attribute`` is called exactly as the reference's notebooks do (batch-mean
``logit_diff`` with ``loss=True``, ``ig_steps=3``), then ``apply_topn(n)`` (n the
checkpoint's top-n, doubled until the pruned circuit keeps at least 5 edges) and
``evaluate_graph`` (which prunes) under the same intervention with the per-example metric;
the graph JSON (``Graph.to_json``: scores, and the pruned top-n circuit as ``in_graph``)
is saved as ``<checkpoint>_<method>_<intervention>.json``. ``golden.json`` holds the
circuit metric m(C), the clean and corrupted baselines (``evaluate_baseline``), and per
intervention the empty and full circuits through ``evaluate_graph``, plus the run's
settings and versions.

Two bugs of the reference that show on the parallel-attention, rotary NeoX are worked
around by wrapping (``WORK_AROUNDS`` below; no reference code is changed or copied): its
exact scores lose edges to an in-place prune, and its EAP-IG-activations loses the
input group's gradient into layer 0 when nothing before layer 0 requires grad. Neither
matters on the GPT-2-like demo model. ``raw/`` holds the NeoX EAP-IG-activations scores
without the work-around, for the record (tests/test_golden.py checks that they differ
from jaxinterp exactly on the input->layer-0 edges).
"""

import argparse
import json
import os
import sys
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSV = os.path.join(HERE, "ioi.csv")
N_EXAMPLES = 12
IG_STEPS = 3
CHECKPOINTS = {  # name: (model directory relative to the repository root, family, batch size, top-n)
    "demo": ("jaxinterp/demo/model", "gpt2", 5, 40),
    "neox": ("tests/golden/neox", "gpt_neox", 4, 30),
}
RUNS = [("EAP", "patching"), ("EAP", "zero"), ("EAP-IG-inputs", "patching"), ("EAP-IG-activations", "patching"),
        ("EAP-IG-activations", "zero"), ("clean-corrupted", "patching"), ("exact", "patching"), ("exact", "zero")]


def prepare():
    """jaxinterp's venv: the NeoX checkpoint (once) and the IOI CSV."""
    sys.path.insert(0, ROOT)
    from jaxinterp import tasks
    from devtools.testing import save_random_gpt_neox
    from jaxinterp.tokenizer import build_word_tokenizer

    neox = os.path.join(ROOT, CHECKPOINTS["neox"][0])
    if not os.path.exists(os.path.join(neox, "model.safetensors")):
        import torch
        from safetensors.torch import load_file, save_file

        save_random_gpt_neox(neox, seed=0, words=tasks.task_vocabulary(), initializer_range=0.3,
                             num_hidden_layers=3)
        # HF initialises every linear bias to 0: then a zero-ablated residual is pure float
        # rounding noise, which the final LayerNorm amplifies. Random biases make it real.
        path = os.path.join(neox, "model.safetensors")
        weights = load_file(path)
        gen = torch.Generator().manual_seed(1)
        for name, w in weights.items():
            if name.endswith(".bias") and "layernorm" not in name:
                weights[name] = w + 0.3 * torch.randn(w.shape, generator=gen)
        save_file(weights, path, metadata={"format": "pt"})
    tasks.write_pairs_csv("ioi", N_EXAMPLES, CSV, build_word_tokenizer(tasks.task_vocabulary()), seed=1)


def _process(model):
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.eval()
    return model


def load_neox(model_dir, device="cpu"):
    """A local HF GPT-NeoX checkpoint in TransformerLens, through TransformerLens' own
    config and weight conversion (``convert_hf_model_config``, ``convert_neox_weights``),
    weights unprocessed as ``reference_eapig.load_model`` does for GPT-2."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXForCausalLM
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_neox_weights

    hf = GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    if not raw.get("use_parallel_residual", True):
        raise SystemExit("TransformerLens' NeoX conversion assumes use_parallel_residual=true")
    cfg_dict = convert_hf_model_config(model_dir)
    cfg_dict.pop("tokenizer_name", None)
    cfg = HookedTransformerConfig(**cfg_dict, default_prepend_bos=True, tokenizer_prepends_bos=False,
                                  dtype=torch.float32, device=device)
    want_rotary = round(raw.get("rope_parameters", {}).get("partial_rotary_factor", raw.get("rotary_pct", 0.25))
                        * cfg.d_head)
    if cfg.rotary_dim != want_rotary:
        raise SystemExit(f"rotary_dim {cfg.rotary_dim} != {want_rotary} from config.json")
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model.load_and_process_state_dict(
        convert_neox_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return _process(model), hf


WORK_AROUNDS = [
    "exact: get_scores_exact calls evaluate_graph, which prunes the graph in place; the edge is put back "
    "afterwards but edges and nodes the prune removed are not, so on a graph where removing one edge leaves a "
    "node without parents or children (parallel attention: m0's only parent is the input, a last-layer head's "
    "only child the logits) every later edge is scored with those edges missing too. Here evaluate_graph, as "
    "get_scores_exact calls it, restores in_graph and nodes_in_graph after each call.",
    "EAP-IG-activations: the hook that overwrites the input group's output (hook_embed) returns a tensor that "
    "does not require grad; without learned position embeddings (rotary) nothing upstream of layer 0 then "
    "requires grad and TransformerLens' backward hooks on layer 0's inputs never fire in those runs, so their "
    "contribution to the input->layer-0 edges is silently lost. Here that tensor is made to require grad, as "
    "the reference's own EAP-IG-inputs hook does (no effect on models with learned position embeddings).",
]


_EMBED_REQUIRES_GRAD = [True]  # switched off to record the raw output


def _work_around_reference_bugs(eap):
    """The two documented in WORK_AROUNDS, by wrapping (no reference code is changed or copied)."""
    import contextlib

    import eap.attribute as attribute_module
    import torch
    from transformer_lens import HookedTransformer

    original_evaluate_graph = attribute_module.evaluate_graph

    def evaluate_graph_keeping_the_graph(model, graph, *args, **kwargs):
        in_graph, nodes_in_graph = graph.in_graph.clone(), graph.nodes_in_graph.clone()
        try:
            return original_evaluate_graph(model, graph, *args, **kwargs)
        finally:
            graph.in_graph[:], graph.nodes_in_graph[:] = in_graph, nodes_in_graph

    attribute_module.evaluate_graph = evaluate_graph_keeping_the_graph  # the name get_scores_exact calls

    original_hooks = HookedTransformer.hooks

    def requiring_grad(fn):
        def hook(activations, hook):
            out = fn(activations, hook)
            if (_EMBED_REQUIRES_GRAD[0] and isinstance(out, torch.Tensor) and torch.is_grad_enabled()
                    and not out.requires_grad):
                out.requires_grad_(True)
            return out
        return hook

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=[], bwd_hooks=[], reset_hooks_end=True, clear_contexts=False):
        fwd_hooks = [(name, requiring_grad(fn) if name == "hook_embed" else fn) for name, fn in fwd_hooks]
        with original_hooks(self, fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as model:
            yield model

    HookedTransformer.hooks = hooks


def reference(eap_ig_path, only=None):
    """The reference's venv: scores, circuits and metric values (``only``: regenerate one
    checkpoint, keeping the others' entries in golden.json)."""
    if eap_ig_path:
        sys.path.insert(0, os.path.join(eap_ig_path, "src"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from importlib.metadata import version

    import eap
    import torch
    from eap.attribute import attribute
    from eap.evaluate import evaluate_baseline, evaluate_graph
    from eap.graph import Graph
    from reference_eapig import EAPDataset, check_against_hf, eap_ig_commit, load_model, logit_diff

    torch.set_grad_enabled(True)
    _work_around_reference_bugs(eap)
    commit = eap_ig_commit(eap)
    out = {"reference": {"repository": "hannamw/EAP-IG", "commit": commit,
                         "change": "device='cuda' replaced by device=model.cfg.device",
                         "work_arounds": WORK_AROUNDS,
                         "torch": version("torch"), "transformer_lens": version("transformer-lens"),
                         "transformers": version("transformers")},
           "metric": "logit_diff", "ig_steps": IG_STEPS, "data": os.path.relpath(CSV, ROOT), "checkpoints": {}}
    attr_metric = partial(logit_diff, loss=True, mean=True)
    eval_metric = partial(logit_diff, loss=False, mean=False)
    ds = EAPDataset(CSV)
    if only:
        with open(os.path.join(HERE, "golden.json")) as f:
            out["checkpoints"] = json.load(f)["checkpoints"]
    for name, (rel, family, batch_size, topn) in CHECKPOINTS.items():
        if only and name != only:
            continue
        model_dir = os.path.join(ROOT, rel)
        model, hf = (load_model if family == "gpt2" else load_neox)(model_dir, "cpu")
        logit_check = check_against_hf(model, hf, list(ds.df["clean"]))
        del hf
        dl = ds.to_dataloader(batch_size)
        clean = evaluate_baseline(model, dl, eval_metric, quiet=True).mean().item()
        corrupted = evaluate_baseline(model, dl, eval_metric, run_corrupted=True, quiet=True).mean().item()
        entry = {"model": rel, "family": family, "batch_size": batch_size, "n_examples": len(ds),
                 "batch_lengths": [len(b[0]) for b in dl], "tl_hf_max_logit_diff": logit_check,
                 "clean": clean, "corrupted": corrupted, "interventions": {}, "runs": []}
        for intervention in ("patching", "zero"):
            graph = Graph.from_model(model)
            empty = evaluate_graph(model, graph, dl, eval_metric, intervention=intervention, quiet=True).mean().item()
            graph.in_graph |= graph.real_edge_mask
            graph.nodes_in_graph[:] = True
            full = evaluate_graph(model, graph, dl, eval_metric, intervention=intervention, quiet=True).mean().item()
            entry["interventions"][intervention] = {"empty": empty, "full": full}
        for method, intervention in RUNS:
            graph = Graph.from_model(model)
            attribute(model, graph, dl, attr_metric, method=method, intervention=intervention,
                      ig_steps=IG_STEPS if "IG" in method else None, quiet=True)
            for n in (topn, 2 * topn, 4 * topn):  # a circuit of a few edges after pruning
                graph.apply_topn(n, True)
                if graph.count_included_edges() >= 5:
                    break
            m_circuit = evaluate_graph(model, graph, dl, eval_metric, intervention=intervention,
                                       quiet=True).mean().item()
            fname = f"{name}_{method}_{intervention}.json"
            graph.to_json(os.path.join(HERE, fname))
            entry["runs"].append({"method": method, "intervention": intervention, "graph": fname, "topn": n,
                                  "circuit_edges": graph.count_included_edges(), "circuit_metric": m_circuit,
                                  "max_abs_score": graph.scores[graph.real_edge_mask].abs().max().item()})
            print(f"{name} {method} {intervention}: max |score| {entry['runs'][-1]['max_abs_score']:.4g}, "
                  f"m(top-{n}) = {m_circuit:.6g} ({entry['runs'][-1]['circuit_edges']} edges)", flush=True)
        if family == "gpt_neox":  # the input->layer-0 edges without the work-around, for the record
            os.makedirs(os.path.join(HERE, "raw"), exist_ok=True)
            _EMBED_REQUIRES_GRAD[0] = False
            graph = Graph.from_model(model)
            attribute(model, graph, dl, attr_metric, method="EAP-IG-activations", ig_steps=IG_STEPS, quiet=True)
            _EMBED_REQUIRES_GRAD[0] = True
            fname = f"raw/{name}_EAP-IG-activations_patching.json"
            graph.to_json(os.path.join(HERE, fname))
            entry["raw"] = [{"method": "EAP-IG-activations", "intervention": "patching", "graph": fname}]
        out["checkpoints"][name] = entry
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "reference"])
    ap.add_argument("--only", choices=sorted(CHECKPOINTS), help="regenerate one checkpoint's files only")
    ap.add_argument("--eap-ig-path", default=os.environ.get("EAP_IG_PATH"),
                    help="EAP-IG checkout if not pip-installed (PATH/src goes on sys.path)")
    args = ap.parse_args()
    prepare() if args.step == "prepare" else reference(args.eap_ig_path, args.only)
