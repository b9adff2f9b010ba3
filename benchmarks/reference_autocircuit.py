"""Run auto-circuit's (UFO-101/auto-circuit) edge attribution on a local HF GPT-2 checkpoint.

The second baseline of ``compare_reference.py``, next to hannamw/EAP-IG
(``reference_eapig.py``): the same checkpoint, pairs CSV, logit-difference metric and batch
size, run by auto-circuit's own code from its own venv. It never imports jaxinterp.

The checkpoint is loaded into TransformerLens exactly as ``reference_eapig.py`` does (no
LayerNorm folding or centring, unlike auto-circuit's own ``load_tl_model``; split q/k/v
inputs, per-head results, MLP-input hooks; weights frozen, as ``load_tl_model`` does), then
``auto_circuit.utils.graph_utils.patchable_model(model, factorized=True,
slice_output="last_seq", separate_qkv=True)`` makes it patchable: its edges are then the
reference's (``Resid Start`` = ``input``, ``A2.1`` = ``a2.h1``, ``MLP 1`` = ``m1``,
``A2.1.Q`` = ``a2.h1<q>``, ``Resid End`` = ``logits``).

Methods (``--method``, jaxinterp's / the reference's names for the comparison rows):

* ``EAP``: ``mask_gradient_prune_scores(grad_function="logit", answer_function="avg_diff",
  mask_val=0.0)``, auto-circuit's "Edge Attribution Patching" (``LOGIT_DIFF_GRAD_PRUNE_ALGO``;
  its docstring: equal to ``edge_attribution_patching_prune_scores``). Same definition as
  EAP's: (corrupted - clean output of u) . d(-logit diff)/d(input of v) at the clean run.
* ``EAP-IG-inputs``: auto-circuit has no integrated gradients over the *inputs*. The nearest
  is ``mask_gradient_prune_scores(..., integrated_grad_samples=N)``, its "Integrated Edge
  Gradients" (``INTEGRATED_EDGE_GRADS_LOGIT_DIFF_PRUNE_ALGO``, there with N = 1000): the
  gradient w.r.t. the edge masks with *every* mask set to m = k/N, k = 0..N (N + 1 points,
  both ends included), each downstream input then being
  ``x_v + m * sum_u (corrupted_u - this run's u)``: all edges interpolated together, not
  the embeddings. A different definition: its scores need not equal EAP-IG-inputs'
  (see ``run_jaxinterp.py --method IG-edge-masks`` for the same quantity in jaxinterp).
  ``--ig-steps N`` is passed as ``integrated_grad_samples=N``.

Scale: auto-circuit sums over batches the gradient of a batch-mean loss (and over the IG
samples); the scores written here are divided by the number of examples (and by N + 1),
which is the reference's normalisation (jaxinterp's mean scores / batch size).

Data: auto-circuit runs prompts without an attention mask and left-pads prompts of
different lengths (``load_datasets_from_json``), so pads would be attended to and would
shift positions. This script therefore requires every clean and corrupted prompt to have
the same token length (BOS + tokens, as TransformerLens' ``to_tokens``), and the metric
reads the last position (``slice_output="last_seq"``): then there is no padding and the
last position is the last real token, as in the reference. ``--examples`` must be a
multiple of ``--batch-size`` (auto-circuit's loader drops a last partial batch; this
script refuses instead of dropping examples silently).

Faithfulness (``--evaluate-topn``): auto-circuit's ``run_circuits(...,
PatchType.TREE_PATCH, AblationType.RESAMPLE)``: the top-n edges by |score| keep their clean
values, every other edge carries the corrupted activation; no pruning of dangling nodes
(the reference's ``evaluate_graph`` prunes first), ties included (``n_edges`` can exceed n).

Setup (outside the repo; auto-circuit 1.0.1 is installed without its dependencies, since
its pins pull in tracr/jax, kaleido and word2word that none of this code imports)::

    python3.11 -m venv /tmp/acvenv
    /tmp/acvenv/bin/pip install torch==2.13.0 transformer-lens==2.18.0 transformers==4.57.6 \\
        "datasets<3" "pyarrow<17" einops ordered-set plotly blobfile vscode-tqdm pandas matplotlib
    /tmp/acvenv/bin/pip install --no-deps auto-circuit==1.0.1

Example::

    /tmp/acvenv/bin/python benchmarks/reference_autocircuit.py --model DIR --data pairs.csv \\
        --method EAP --batch-size 16 --evaluate-topn 50,200 --out /tmp/ac_out/eap

Outputs: ``PREFIX.npy`` (float32 scores ``[n_forward, n_backward]`` in the reference's
layout), ``PREFIX.names.json`` (the forward / backward node names of that layout) and
``PREFIX.json`` (timings, versions, faithfulness).
"""
import argparse
import json
import os
import sys
import time
from importlib.metadata import version

import numpy as np
import pandas as pd
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from reference_eapig import load_model, write_info  # noqa: E402  (the same TransformerLens loading and output)

METHODS = {'EAP': 'Edge Attribution Patching (mask_val=0)',
           'EAP-IG-inputs': 'Integrated Edge Gradients (integrated_grad_samples=N)'}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', required=True, help='HF GPT-2 checkpoint dir (config, safetensors, tokenizer)')
    p.add_argument('--data', required=True, help='CSV: clean,corrupted,correct_idx,incorrect_idx')
    p.add_argument('--method', required=True, choices=list(METHODS))
    p.add_argument('--ig-steps', type=int, default=5)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--metric', default='logit_diff', choices=['logit_diff'])
    p.add_argument('--evaluate-topn', default=None, help='comma-separated edge counts, e.g. 100,500')
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', required=True, help='output prefix')
    return p.parse_args()


# ---- the reference's node layout (as eap.graph / jaxinterp.graph.GraphSpec) ----
def forward_names(n_layers, n_heads):
    names = ['input']
    for l in range(n_layers):
        names += [f'a{l}.h{h}' for h in range(n_heads)] + [f'm{l}']
    return names


def backward_names(n_layers, n_heads):
    names = []
    for l in range(n_layers):
        names += [f'a{l}.h{h}<{x}>' for x in 'qkv' for h in range(n_heads)] + [f'm{l}']
    return names + ['logits']


def src_name(name):
    """auto-circuit source node name -> the reference's: 'Resid Start', 'A0.3', 'MLP 1'."""
    if name == 'Resid Start':
        return 'input'
    if name.startswith('MLP '):
        return f'm{int(name[4:])}'
    layer, head = name[1:].split('.')
    return f'a{int(layer)}.h{int(head)}'


def dest_name(name):
    """'A2.1.Q' -> 'a2.h1<q>', 'MLP 1' -> 'm1', 'Resid End' -> 'logits'."""
    if name == 'Resid End':
        return 'logits'
    if name.startswith('MLP '):
        return f'm{int(name[4:])}'
    layer, head, letter = name[1:].split('.')
    return f'a{int(layer)}.h{int(head)}<{letter.lower()}>'


def load_pairs(model, path, batch_size, device):
    """Token tensors for auto-circuit's ``PromptDataset``; refuses unequal lengths."""
    from auto_circuit.data import PromptDataLoader, PromptDataset

    df = pd.read_csv(path)
    if 'label' in df.columns:
        raise SystemExit('auto-circuit baseline: only correct_idx/incorrect_idx (logit difference) data')
    clean = [model.to_tokens(p, prepend_bos=True)[0] for p in df['clean']]
    corrupt = [model.to_tokens(p, prepend_bos=True)[0] for p in df['corrupted']]
    lengths = {len(x) for x in clean + corrupt}
    if len(lengths) != 1:
        raise SystemExit(f'auto-circuit runs without an attention mask and left-pads, so this baseline needs '
                         f'prompts of one token length; got lengths {sorted(lengths)}')
    if len(df) % batch_size:
        raise SystemExit(f'{len(df)} examples do not divide into batches of {batch_size} '
                         '(auto-circuit drops the last partial batch)')
    answers = [torch.tensor([int(a)], device=device) for a in df['correct_idx']]
    wrong = [torch.tensor([int(a)], device=device) for a in df['incorrect_idx']]
    ds = PromptDataset(torch.stack(clean).to(device), torch.stack(corrupt).to(device), answers, wrong)
    loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=batch_size, shuffle=False)
    return loader, len(df), lengths.pop()


def dense_scores(pmodel, prune_scores, n_layers, n_heads):
    """auto-circuit's ``{dest module: mask-shaped scores}`` -> ``[n_forward, n_backward]``."""
    fwd, bwd = forward_names(n_layers, n_heads), backward_names(n_layers, n_heads)
    fi, bi = {n: i for i, n in enumerate(fwd)}, {n: i for i, n in enumerate(bwd)}
    out = np.zeros((len(fwd), len(bwd)), np.float64)
    seen = set()
    for edge in pmodel.edges:
        s, d = fi[src_name(edge.src.name)], bi[dest_name(edge.dest.name)]
        if (s, d) in seen:
            raise SystemExit(f'two auto-circuit edges map onto {fwd[s]}->{bwd[d]}')
        seen.add((s, d))
        out[s, d] = edge.prune_score(prune_scores).item()
    return out, fwd, bwd, len(seen)


def main():
    args = parse_args()
    from auto_circuit.prune import run_circuits
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.types import AblationType, PatchType
    from auto_circuit.utils.graph_utils import patchable_model
    from auto_circuit.utils.tensor_ops import batch_answer_diffs

    t0 = time.perf_counter()
    model, hf = load_model(args.model, args.device)
    loader, n_examples, n_pos = load_pairs(model, args.data, args.batch_size, args.device)
    first = next(iter(loader))
    with torch.inference_mode():  # TransformerLens against HF on the (unpadded) clean prompts
        tl_hf = (model(first.clean) - hf(first.clean).logits).abs().max().item()
    del hf
    if not tl_hf < 1e-3:
        raise SystemExit(f'TransformerLens logits do not match HF logits (max abs diff {tl_hf})')
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for param in model.parameters():  # as auto-circuit's own experiment_utils.load_tl_model: only masks get gradients
        param.requires_grad = False
    pmodel = patchable_model(model, factorized=True, slice_output='last_seq', separate_qkv=True,
                             device=torch.device(args.device))
    seconds_setup = time.perf_counter() - t0

    ig = args.method == 'EAP-IG-inputs'
    t0 = time.perf_counter()
    prune_scores = mask_gradient_prune_scores(
        pmodel, loader, None, grad_function='logit', answer_function='avg_diff',
        mask_val=None if ig else 0.0, integrated_grad_samples=args.ig_steps if ig else None,
        ablation_type=AblationType.RESAMPLE, clean_corrupt='corrupt')
    seconds = time.perf_counter() - t0

    raw, fwd, bwd, n_edges = dense_scores(pmodel, prune_scores, n_layers, n_heads)
    divisor = n_examples * ((args.ig_steps + 1) if ig else 1)
    scores = (raw / divisor).astype(np.float32)
    if not np.isfinite(scores).all():
        print('WARNING: non-finite scores', file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.save(args.out + '.npy', scores)
    with open(args.out + '.names.json', 'w') as f:
        json.dump({'forward': fwd, 'backward': bwd}, f)

    info = {
        'implementation': 'auto-circuit', 'method': args.method, 'algorithm': METHODS[args.method],
        'ig_steps': args.ig_steps if ig else None, 'ig_points': args.ig_steps + 1 if ig else None,
        'batch_size': args.batch_size, 'metric': args.metric, 'n_examples': n_examples, 'n_pos': n_pos,
        'n_edges': n_edges, 'model': os.path.abspath(args.model), 'data': os.path.abspath(args.data),
        'seconds': seconds, 'seconds_setup': seconds_setup, 'examples_per_s': n_examples / seconds,
        'score_divisor': divisor, 'tl_hf_max_logit_diff': tl_hf, 'device': args.device,
        'torch': version('torch'), 'transformer_lens': version('transformer-lens'),
        'transformers': version('transformers'), 'auto_circuit': version('auto-circuit'),
        'torch_threads': torch.get_num_threads(),
    }
    if args.evaluate_topn:
        def mean_logit_diff(outputs):  # {batch key: last-position logits} -> mean over examples
            return float(torch.cat([batch_answer_diffs(outputs[b.key], b) for b in loader]).mean())

        with torch.inference_mode():
            clean = {b.key: pmodel(b.clean)[pmodel.out_slice] for b in loader}
            corrupt = {b.key: pmodel(b.corrupt)[pmodel.out_slice] for b in loader}
        baseline, corrupted = mean_logit_diff(clean), mean_logit_diff(corrupt)
        info['faithfulness'] = []
        t1 = time.perf_counter()
        for n in (int(x) for x in args.evaluate_topn.split(',')):
            outs = run_circuits(pmodel, loader, [n], prune_scores, patch_type=PatchType.TREE_PATCH,
                                ablation_type=AblationType.RESAMPLE)
            (count, circuit_outs), = outs.items()  # count: edges kept (ties included)
            info['faithfulness'].append({'topn': n, 'graph': mean_logit_diff(circuit_outs), 'baseline': baseline,
                                         'corrupted_baseline': corrupted, 'n_edges': count})
        info['seconds_evaluate'] = time.perf_counter() - t1
    write_info(info, args.out + '.json')


if __name__ == '__main__':
    main()
