"""Run the PyTorch reference EAP / EAP-IG (hannamw/EAP-IG) on a local HF GPT-2 checkpoint.

This is a *reference* harness for jaxinterp: it loads a Hugging Face ``GPT2LMHeadModel``
checkpoint into TransformerLens (no model hub needed, so random-init checkpoints work),
builds the data loader and metrics exactly as the reference notebooks do (``ioi.ipynb`` /
``greater_than.ipynb``), calls ``eap.attribute.attribute`` and saves ``Graph.scores`` so
that jaxinterp's scores can be compared against them. It never imports jaxinterp.

Setup (CPU only; the EAP-IG checkout must have its hard-coded ``device='cuda'`` replaced by
``device=model.cfg.device`` in attribute.py, attribute_node.py, evaluate.py and utils.py)::

    # a checkout of hannamw/EAP-IG at /tmp/eapig (e.g. from git), then:
    sed -i "s/device='cuda'/device=model.cfg.device/g" /tmp/eapig/src/eap/*.py
    python3.11 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 "transformer-lens<3" "datasets<3" "pyarrow<17" einops pandas matplotlib
    /tmp/refvenv/bin/pip install --no-deps -e /tmp/eapig   # optional if --eap-ig-path is given

Example::

    /tmp/refvenv/bin/python benchmarks/reference_eapig.py --model /tmp/reftest/tiny \\
        --data /tmp/reftest/tiny/ioi.csv --method EAP-IG-inputs --ig-steps 5 --batch-size 8 \\
        --eap-ig-path /tmp/eapig --evaluate-topn 10,50 --out /tmp/ref_out/tiny_eapig

The CSV has columns ``clean, corrupted, correct_idx, incorrect_idx`` (token ids), or
``clean, corrupted, label`` (greater-than: ``label`` is the start year's last two digits;
the metric is then ``prob_diff`` over the tokens ``'00'..'99'``).

Outputs: ``PREFIX.npy`` (float32 ``Graph.scores`` [n_forward, n_backward]), ``PREFIX.json``
(timings, versions, optional faithfulness) and ``PREFIX.graph.json`` (``Graph.to_json``).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from importlib.metadata import version

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

METHODS = ['EAP', 'EAP-IG-inputs', 'EAP-IG-activations', 'clean-corrupted', 'exact']


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', required=True, help='HF GPT-2 checkpoint dir (config, safetensors, tokenizer)')
    p.add_argument('--data', required=True, help='CSV: clean,corrupted,correct_idx,incorrect_idx (or label)')
    p.add_argument('--method', required=True, choices=METHODS)
    p.add_argument('--ig-steps', type=int, default=5)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--metric', default='logit_diff', choices=['logit_diff', 'prob_diff', 'kl_div'])
    p.add_argument('--eap-ig-path', default=os.environ.get('EAP_IG_PATH'),
                   help='EAP-IG checkout; PATH/src is put on sys.path (default: $EAP_IG_PATH)')
    p.add_argument('--evaluate-topn', default=None, help='comma-separated edge counts, e.g. 100,500')
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', required=True, help='output prefix')
    return p.parse_args()


# ---- data and metrics, as in the reference notebooks (ioi.ipynb / greater_than.ipynb) ----
class EAPDataset(Dataset):
    def __init__(self, filepath):
        self.df = pd.read_csv(filepath)
        self.greater_than = 'label' in self.df.columns

    def __len__(self):
        return len(self.df)

    def __getitem__(self, index):
        row = self.df.iloc[index]
        if self.greater_than:
            return row['clean'], row['corrupted'], row['label']
        return row['clean'], row['corrupted'], [row['correct_idx'], row['incorrect_idx']]

    def to_dataloader(self, batch_size):
        collate = collate_greater_than if self.greater_than else collate_ioi
        return DataLoader(self, batch_size=batch_size, collate_fn=collate)


def collate_ioi(xs):
    clean, corrupted, labels = zip(*xs)
    return list(clean), list(corrupted), torch.tensor(labels)


def collate_greater_than(xs):
    clean, corrupted, labels = zip(*xs)
    return list(clean), list(corrupted), labels


def get_logit_positions(logits, input_length):
    idx = torch.arange(logits.size(0), device=logits.device)
    return logits[idx, input_length - 1]


def logit_diff(logits, clean_logits, input_length, labels, mean=True, loss=False):
    logits = get_logit_positions(logits, input_length)
    good_bad = torch.gather(logits, -1, labels.to(logits.device))
    results = good_bad[:, 0] - good_bad[:, 1]
    if loss:
        results = -results
    return results.mean() if mean else results


def get_prob_diff(tokenizer):
    year_indices = torch.tensor([tokenizer(f'{year:02d}', add_special_tokens=False).input_ids[0]
                                 for year in range(100)])

    def prob_diff(logits, clean_logits, input_length, labels, mean=True, loss=False):
        probs = torch.softmax(get_logit_positions(logits, input_length), dim=-1)[:, year_indices]
        results = torch.stack([prob[year + 1:].sum() - prob[:year + 1].sum()
                               for prob, year in zip(probs, labels)])
        if loss:
            results = -results
        return results.mean() if mean else results
    return prob_diff


def kl_div(logits, clean_logits, input_length, labels, mean=True, loss=True):
    # greater_than.ipynb's kl_div (which shadows torch's kl_div there); `loss` is ignored as in the notebook
    probs = torch.softmax(get_logit_positions(logits, input_length), dim=-1)
    clean_probs = torch.softmax(get_logit_positions(clean_logits, input_length), dim=-1)
    results = torch.nn.functional.kl_div(probs.log(), clean_probs.log(), log_target=True,
                                         reduction='none').mean(-1)
    return results.mean() if mean else results


# ---- model loading ----
def load_model(model_dir, device):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    hc = hf.config
    if hc.scale_attn_by_inverse_layer_idx or hc.reorder_and_upcast_attn or not hc.scale_attn_weights:
        raise SystemExit('unsupported GPT-2 attention options in config.json')
    cfg = HookedTransformerConfig(
        d_model=hc.n_embd, d_head=hc.n_embd // hc.n_head, n_heads=hc.n_head, n_layers=hc.n_layer,
        n_ctx=hc.n_positions, d_vocab=hc.vocab_size, d_mlp=hc.n_inner or 4 * hc.n_embd,
        act_fn=hc.activation_function, normalization_type='LN', eps=hc.layer_norm_epsilon,
        positional_embedding_type='standard', default_prepend_bos=True,
        original_architecture='GPT2LMHeadModel', tokenizer_prepends_bos=False,
        dtype=torch.float32, device=device)
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.eval()
    return model, hf


def check_against_hf(model, hf, prompts):
    """Abort unless TL logits match HF logits on the (bos-prefixed, right-padded) prompts."""
    from eap.utils import tokenize_plus
    tokens, mask, lengths, _ = tokenize_plus(model, prompts)
    if not bool((tokens[:, 0] == model.tokenizer.bos_token_id).all()):
        raise SystemExit(f'tokens do not start with bos: {tokens.tolist()}')
    unk = model.tokenizer.unk_token_id
    if unk is not None and any(unk in t[:n] for t, n in zip(tokens.tolist(), lengths.tolist())):
        print(f'WARNING: <unk> in tokenized prompts: {tokens.tolist()}', file=sys.stderr)
    with torch.inference_mode():
        tl_logits = model(tokens, attention_mask=mask)
        hf_logits = hf(tokens.to(hf.device), attention_mask=mask.to(hf.device)).logits.to(tl_logits.device)
    valid = mask.bool()
    diff = (tl_logits[valid] - hf_logits[valid]).abs().max().item()
    print(f'TL vs HF max |logit diff| = {diff:.2e}', file=sys.stderr)
    if not diff < 1e-3:
        raise SystemExit(f'TransformerLens logits do not match HF logits (max abs diff {diff})')
    return diff


def eap_ig_commit(eap_module):
    src = os.path.dirname(os.path.abspath(eap_module.__file__))
    try:
        run = partial(subprocess.run, cwd=src, capture_output=True, text=True, check=True)
        commit = run(['git', 'rev-parse', 'HEAD']).stdout.strip()
        dirty = bool(run(['git', 'status', '--porcelain', '--untracked-files=no']).stdout.strip())
        return commit + ('+dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    args = parse_args()
    if args.eap_ig_path:
        sys.path.insert(0, os.path.join(args.eap_ig_path, 'src'))
    import eap
    from eap.attribute import attribute
    from eap.evaluate import evaluate_baseline, evaluate_graph
    from eap.graph import Graph

    t0 = time.perf_counter()
    model, hf = load_model(args.model, args.device)
    ds = EAPDataset(args.data)
    dataloader = ds.to_dataloader(args.batch_size)
    logit_check = check_against_hf(model, hf, list(ds.df['clean'][:args.batch_size]))
    del hf
    if ds.greater_than and args.metric == 'logit_diff':
        args.metric = 'prob_diff'  # a `label` column implies the greater-than metric
    if args.metric == 'prob_diff':
        if not ds.greater_than:
            raise SystemExit('prob_diff needs a `label` column')
        metric_fn = get_prob_diff(model.tokenizer)
    else:
        metric_fn = {'logit_diff': logit_diff, 'kl_div': kl_div}[args.metric]
    graph = Graph.from_model(model)
    seconds_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    attribute(model, graph, dataloader, partial(metric_fn, loss=True, mean=True),
              method=args.method, ig_steps=args.ig_steps if 'IG' in args.method else None, quiet=True)
    seconds = time.perf_counter() - t0

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    scores = graph.scores.detach().cpu().numpy().astype(np.float32)
    if not np.isfinite(scores).all():
        print('WARNING: non-finite scores', file=sys.stderr)
    np.save(args.out + '.npy', scores)
    graph.to_json(args.out + '.graph.json')

    info = {
        'method': args.method, 'ig_steps': args.ig_steps if 'IG' in args.method else None,
        'batch_size': args.batch_size, 'metric': args.metric, 'n_examples': len(ds),
        'model': os.path.abspath(args.model), 'data': os.path.abspath(args.data),
        'seconds': seconds, 'seconds_load': seconds_load, 'tl_hf_max_logit_diff': logit_check,
        'scores_shape': list(scores.shape), 'device': args.device,
        'torch': version('torch'), 'transformer_lens': version('transformer-lens'),
        'transformers': version('transformers'), 'torch_threads': torch.get_num_threads(),
        'eap_ig_commit': eap_ig_commit(eap),
    }
    if args.evaluate_topn:
        eval_metric = partial(metric_fn, loss=False, mean=False)
        baseline = evaluate_baseline(model, dataloader, eval_metric, quiet=True).mean().item()
        corrupted = evaluate_baseline(model, dataloader, eval_metric, run_corrupted=True, quiet=True).mean().item()
        info['faithfulness'] = []
        for n in (int(x) for x in args.evaluate_topn.split(',')):
            graph.apply_topn(n, True)
            perf = evaluate_graph(model, graph, dataloader, eval_metric, quiet=True,
                                  skip_clean=args.metric != 'kl_div').mean().item()
            info['faithfulness'].append({
                'topn': n, 'graph': perf, 'baseline': baseline, 'corrupted_baseline': corrupted,
                'n_edges': graph.count_included_edges(), 'n_nodes': graph.count_included_nodes()})
    write_info(info, args.out + '.json')


def write_info(info: dict, path: str) -> None:
    """``info`` plus this process's peak RSS, written to ``path`` and printed (the
    comparison harness reads the JSON)."""
    info['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(path, 'w') as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == '__main__':
    main()
