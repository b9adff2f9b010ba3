"""One MIB circuit-track cell, jaxinterp against MIB's own pipeline: time, peak memory, CPR/CMD.

A *cell* is MIB's unit (one model x task; here IOI) with its recommended method,
EAP-IG-inputs at the edge level: attribution, then the faithfulness curve over MIB's ten
sizes (0.1% .. 100% of the edges) under both rankings, signed (CPR: area under f) and
absolute (CMD: area under |1 - f|). On a random-init checkpoint at the real shape of
GPT-2 small (``--shape gpt2``: 12 layers, d 768, 12 heads, vocab 50,257, 32,491 edges) or
of Qwen2.5-0.5B (``--shape qwen2.5``: 24 layers, d 896, 14 query / 2 key-value heads,
d_mlp 4,864, vocab 151,936, tied embeddings, rope theta 1e6, 179,749 edges), and the same
IOI pairs CSV for both sides, this runs one after the other:

1. **MIB's pipeline** (this file's ``reference`` step, in ``--ref-python``, the venv with
   torch + TransformerLens): the model into TransformerLens, then what MIB's
   run_attribution.py does for the cell (``eap.attribute.attribute`` with MIB's
   ``get_metric('logit_diff', 'ioi')``, EAP-IG-inputs, ``patching``, ig_steps 5, its
   ``EAPDataset(task='ioi')`` data loader), the graph written with ``Graph.to_json``, then
   what run_evaluation.py does twice (``--absolute`` off and on): ``Graph.from_json`` and
   MIB's ``evaluate_area_under_curve``. Each phase is timed inside the process; the
   process is timed from outside (wall clock, peak RSS).
2. ``jaxinterp mib run --model NAME=DIR --task ioi=PAIRS.csv`` (EAP-IG-inputs, edge,
   ig_steps 5, the same batch size) as a fresh process with an empty compilation cache
   (**cold**; includes converting the HF checkpoint), then ``--warm`` more times in the
   same output directory with its results removed (**warm**: the conversion and the
   persistent compilation cache reused, which is what a second cell on the same model
   gets). Its result JSON gives attribution and scoring seconds inside the process.

The reference's model: hannamw/EAP-IG at the commit MIB pins (``--eap-ig-path``, with the
hard-coded ``device='cuda'`` replaced as tests/golden/make_golden_mib.py says) and
hannamw/MIB-circuit-track (``--mib-path``) on ``sys.path``; GPT-2 through
``reference_eapig.load_model``, Qwen2 through TransformerLens' own config and weight
conversion of the local directory (``convert_hf_model_config``, ``convert_qwen2_weights``).
Both in float32 with unprocessed weights, as jaxinterp computes: MIB's scripts load the
hub models with ``HookedTransformer.from_pretrained`` (LayerNorm folded, writing weights
centred) and Qwen2.5 in bfloat16, which changes the scores but not the work. The
reference checks its logits against transformers' and its tokens against jaxinterp's
before timing anything.

    . /work/venv/bin/activate
    nice -n 19 python benchmarks/bench_mib_cell.py --shape gpt2 --ref-python /tmp/refvenv/bin/python \\
        --eap-ig-path /tmp/eapig_mib --mib-path /tmp/mib_ct --out benchmarks/results/mib_cell_gpt2_cpu

Outputs ``OUT.json`` (every figure, the load before and after each run, the machine) and
``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IG_STEPS = 5
METHOD = "EAP-IG-inputs"
# the code the reference runs (as tests/golden/make_golden_mib.py exports it: git archive, so no .git)
MIB_COMMIT = "b759df34433c9e31043ba9e02908ce0bf20e894f"  # hannamw/MIB-circuit-track
EAP_IG_COMMIT = "7af394a5662de8b23ad6154716a0cd3993d447a3"  # hannamw/EAP-IG, MIB's submodule

# the checkpoints: (MIB model name, vocabulary size, what save_random_* gets)
SHAPES = {
    "gpt2": ("gpt2", 50257, dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)),
    "qwen2.5": ("qwen2.5", 151936, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                       rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                                       hidden_act="silu", initializer_range=0.02)),
}
ROPE_THETA = 1e6  # Qwen2.5-0.5B's


# ------------------------------------------------------------------ checkpoint and data (jaxinterp venv)
def words_for(vocab_size: int) -> list:
    """The test vocabulary (IOI names and words) padded with filler words up to
    ``vocab_size`` ids (the word tokenizer adds 4 special tokens)."""
    words = _test_words()
    return words + [f"w{i:06d}" for i in range(vocab_size - 4 - len(words))]


QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` ids built as Qwen2's is (NFC, Qwen2's
    split regex, byte-level, BPE without unknown token) over the test vocabulary: the
    special tokens of the word tokenizer, the 256 byte symbols, each word with and without
    a leading space (``Ġ``) and the merges that build them (the spaced forms first, so that
    they win), then filler ids. transformers 5 reads a checkpoint whose config says
    ``qwen2`` with ``Qwen2Tokenizer``, which rebuilds the tokenizer from the vocabulary and
    merges with exactly this pipeline (a word-level tokenizer.json would be mis-read there);
    transformers 4 (the reference's) reads tokenizer.json as it is."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxinterp.tokenizer import SPECIAL

    words = _test_words()
    vocab: dict = {}
    for w in ("<pad>", "<bos>", "<eos>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab.setdefault(w, len(vocab))
    merges = []
    for form in ["\u0120" + w for w in words] + words:
        for i in range(2, len(form) + 1):
            if (form[:i - 1], form[i - 1]) not in merges:
                merges.append((form[:i - 1], form[i - 1]))
            vocab.setdefault(form[:i], len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i:06d}", len(vocab))
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.add_special_tokens(dict(SPECIAL))
    assert len(fast) == vocab_size, len(fast)
    return fast


def _test_words() -> list:
    sys.path.insert(0, os.path.dirname(HERE))
    from devtools.testing import small_vocab

    return small_vocab()


def ensure_checkpoint(shape: str, path: str) -> str:
    """A random-init checkpoint of ``shape`` at ``path``, built once (seed 0)."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    sys.path.insert(0, os.path.dirname(HERE))
    from devtools.testing import save_random_causal_lm, save_random_gpt2
    from jaxinterp.tokenizer import save_tokenizer

    _, vocab, cfg = SHAPES[shape]
    if shape == "gpt2":
        save_random_gpt2(path, words=words_for(vocab), **cfg)
    else:
        save_random_causal_lm(path, "qwen2", words=words_for(vocab), rope_theta=ROPE_THETA, **cfg)
        save_tokenizer(byte_level_tokenizer(vocab), path)  # replaces the word tokenizer (see there)
        # transformers 5 writes rope_parameters only; the reference's transformers 4 (and with it
        # TransformerLens) reads rope_theta and would silently fall back to 10,000 without it
        cfg_path = os.path.join(path, "config.json")
        with open(cfg_path) as f:
            config = json.load(f)
        config["rope_theta"] = ROPE_THETA
        assert config.get("rope_parameters", {}).get("rope_theta", ROPE_THETA) == ROPE_THETA, config
        with open(cfg_path, "w") as f:
            json.dump(config, f, indent=2)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["vocab_size"] == vocab
    return path


def write_ioi_pairs(path: str, tokenizer, n: int, seed: int = 0) -> str:
    """``n`` IOI pairs as devtools.testing.write_ioi_csv makes them (15 tokens with BOS),
    labelled as MIB's HFEAPDataset labels IOI: the first token of `` <name>``. Every word
    must be one token (checked)."""
    import numpy as np

    from devtools.testing import NAMES
    from jaxinterp.data import write_pairs_csv

    def one(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (text, ids)
        return ids[0]

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.choice(NAMES, 3, replace=False)
        rows.append({"clean": f"When {a} and {b} went to the store , {b} gave a drink to",
                     "corrupted": f"When {a} and {b} went to the store , {c} gave a drink to",
                     "correct_idx": one(f" {a}"), "incorrect_idx": one(f" {b}")})
    for text in (rows[0]["clean"], rows[0]["corrupted"]):
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 14, text
    return write_pairs_csv(rows, path)


# ------------------------------------------------------------------ measuring a child process
_MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; w = time.perf_counter() - t; "
            "print('MEASURED', rc, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measured(cmd: list, log: str, env=None, may_fail: bool = False) -> dict:
    """Wall seconds, peak RSS (GB) and the 1-minute load before and after of ``cmd``
    (its output to ``log``); with ``may_fail``, a failed command's figures with its exit
    status under ``rc`` instead of an exit."""
    print("$", " ".join(cmd), flush=True)
    before = os.getloadavg()
    with open(log, "w") as f:
        out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], env=env, stdout=subprocess.PIPE,
                             stderr=f, text=True)
    lines = out.stdout.splitlines()
    with open(log, "a") as f:
        f.write("\n".join(lines) + "\n")
    line = [x for x in lines if x.startswith("MEASURED")]
    if out.returncode or not line or (line[-1].split()[1] != "0" and not may_fail):
        sys.exit(f"failed: {' '.join(cmd)} (see {log})")
    _, rc, wall, rss = line[-1].split()
    after = os.getloadavg()
    r = {"rc": int(rc), "seconds": float(wall), "peak_rss_gb": int(rss) / 2 ** 20, "loadavg_before": before,
         "loadavg_after": after}
    print(f"  {r['seconds']:.1f} s, {r['peak_rss_gb']:.2f} GB, load {before[0]:.1f} -> {after[0]:.1f}", flush=True)
    return r


# ------------------------------------------------------------------ the reference (its venv)
def load_qwen2_tl(model_dir: str):
    """A local HF Qwen2 checkpoint in TransformerLens through its own config and weight
    conversion, unprocessed, configured as MIB's scripts configure every model."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_qwen2_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    if getattr(hf.config, "rope_theta", None) != ROPE_THETA:
        raise SystemExit(f"transformers read rope_theta {getattr(hf.config, 'rope_theta', None)}, not {ROPE_THETA}")
    cfg_dict = convert_hf_model_config(model_dir)
    cfg_dict.pop("tokenizer_name", None)
    cfg = HookedTransformerConfig(**cfg_dict, dtype=torch.float32, device="cpu")
    if cfg.rotary_base != ROPE_THETA:
        raise SystemExit(f"TransformerLens' rotary_base {cfg.rotary_base} != {ROPE_THETA}")
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model.load_and_process_state_dict(
        convert_qwen2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    # as MIB's run_attribution.py / run_evaluation.py set them
    model.cfg.use_split_qkv_input = True
    model.cfg.use_attn_result = True
    model.cfg.use_hook_mlp_in = True
    model.cfg.ungroup_grouped_query_attention = True
    model.eval()
    return model, hf


def reference(args) -> None:
    """MIB's pipeline for one cell, each phase timed; writes ``--out``.json/.npy/.graph.json."""
    import resource
    from functools import partial

    sys.path.insert(0, os.path.join(args.eap_ig_path, "src"))
    sys.path.insert(0, args.mib_path)
    sys.path.insert(0, HERE)
    from importlib.metadata import version

    import numpy as np
    import torch
    import eap
    from eap.attribute import attribute
    from eap.graph import Graph
    from eap.utils import tokenize_plus
    from MIB_circuit_track.dataset import EAPDataset
    from MIB_circuit_track.evaluation import evaluate_area_under_curve
    from MIB_circuit_track.metrics import get_metric
    from reference_eapig import check_against_hf, eap_ig_commit, load_model

    assert os.path.dirname(eap.__file__).startswith(os.path.abspath(args.eap_ig_path)), eap.__file__
    times = {}
    t = time.perf_counter()
    model, hf = load_model(args.model, "cpu") if args.family == "gpt2" else load_qwen2_tl(args.model)
    times["load_model"] = time.perf_counter() - t
    ds = EAPDataset(args.data, task="ioi")
    dl = ds.to_dataloader(args.batch_size)
    prompts = list(ds.df["clean"]) + list(ds.df["corrupted"])
    with open(args.tokens) as f:
        theirs = json.load(f)  # jaxinterp's tokens of the same prompts
    tokens, _, lengths, _ = tokenize_plus(model, prompts)
    for i, want in enumerate(theirs["clean"] + theirs["corrupted"]):
        got = tokens[i, :lengths[i]].tolist()
        if got != want:
            raise SystemExit(f"prompt {i}: TransformerLens tokens {got} != jaxinterp's {want}")
    logit_check = check_against_hf(model, hf, prompts[:args.batch_size])
    del hf
    times["peak_rss_gb_after_load"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

    metric = get_metric("logit_diff", "ioi", model.tokenizer, model)
    graph = Graph.from_model(model)
    t = time.perf_counter()
    attribute(model, graph, dl, partial(metric, mean=True, loss=True), METHOD, "patching", ig_steps=IG_STEPS,
              intervention_dataloader=dl, quiet=True)
    times["attribute"] = time.perf_counter() - t
    progress = {"times": times, "curves": {}, "n_examples": len(ds), "batch_size": args.batch_size,
                "torch": version("torch"), "transformer_lens": version("transformer-lens"),
                "transformers": version("transformers"), "torch_threads": torch.get_num_threads(),
                "eap_ig_commit": eap_ig_commit(eap) or f"{EAP_IG_COMMIT} (archive, per --eap-ig-path)",
                "mib_commit": f"{MIB_COMMIT} (archive, per --mib-path)", "tl_hf_max_logit_diff": logit_check}

    def dump():  # what is done so far, for a run that does not finish
        with open(args.out + ".partial.json", "w") as f:
            json.dump(progress, f, indent=1)
    t = time.perf_counter()
    graph.to_json(args.out + ".graph.json")
    times["to_json"] = time.perf_counter() - t
    np.save(args.out + ".npy", graph.scores.detach().cpu().numpy().astype(np.float32))
    n_edges = progress["n_edges"] = len(graph.edges)
    dump()
    del graph

    curves = {}
    for absolute in (False, True):
        key = "absolute" if absolute else "signed"
        t = time.perf_counter()
        g = Graph.from_json(args.out + ".graph.json")
        times[f"from_json_{key}"] = time.perf_counter() - t
        t = time.perf_counter()
        counts, area_under, area_from_1, average, faith = evaluate_area_under_curve(
            model, g, dl, partial(metric, mean=False, loss=False), quiet=True, level="edge", absolute=absolute)
        times[f"evaluate_{key}"] = time.perf_counter() - t
        curves[key] = {"edge_counts": [float(c) for c in counts], "area_under": area_under,
                       "area_from_1": area_from_1, "average": average, "faithfulness": faith}
        progress["curves"] = curves
        dump()
        print(f"{key}: area_under {area_under:.6f} area_from_1 {area_from_1:.6f}", flush=True)
    info = {"cpr": curves["signed"]["area_under"], "cmd": curves["absolute"]["area_from_1"], "curves": curves,
            "times": times, "n_edges": n_edges, "n_examples": len(ds), "batch_size": args.batch_size,
            "tl_hf_max_logit_diff": logit_check, "torch": version("torch"),
            "transformer_lens": version("transformer-lens"), "transformers": version("transformers"),
            "torch_threads": torch.get_num_threads(),
            "eap_ig_commit": eap_ig_commit(eap) or f"{EAP_IG_COMMIT} (archive, per --eap-ig-path)",
            "mib_commit": f"{MIB_COMMIT} (archive, per --mib-path)",
            "peak_rss_gb_inside": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    with open(args.out + ".json", "w") as f:
        json.dump(info, f, indent=1)


# ------------------------------------------------------------------ the driver (jaxinterp venv)
def jax_runs(args, name: str, model: str, data: str, work: str) -> list:
    """The cold run and ``args.warm`` warm ones of ``jaxinterp mib run``; each run's
    process figures plus its result JSON."""
    out_dir = os.path.join(work, "jax_run")
    cache = os.path.join(work, "jax_cache")
    for d in (out_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(cache)
    cmd = [args.jax_python, "-m", "jaxinterp", "mib", "--compile-cache", cache, "run", "--model", f"{name}={model}",
           "--task", f"ioi={data}", "--method", METHOD, "--level", "edge", "--ig-steps", str(IG_STEPS),
           "--batch-size", str(args.batch_size), "--out", out_dir]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    runs = []
    for i in range(1 + args.warm):
        for d in ("results", "circuits", "summary.csv"):  # the conversion under models/ stays
            p = os.path.join(out_dir, d)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
        r = measured(cmd, os.path.join(work, f"jax_{i}.log"), env=env)
        r["kind"] = "cold" if i == 0 else "warm"
        result_path = os.path.join(out_dir, "results", f"ioi_{name}__{METHOD}__edge.json")
        with open(result_path) as f:
            result = json.load(f)
        r["result"] = {k: result[k] for k in ("cpr", "cmd", "score", "timing")}
        graph = os.path.join(work, f"jax_{i}.graph.json")
        shutil.copy(os.path.join(out_dir, result["graph"]), graph)
        r["graph"] = graph
        with open(os.path.join(out_dir, "runlog.jsonl")) as f:
            events = [json.loads(x) for x in f if x.strip()]
        r["convert_seconds"] = sum(e.get("seconds", 0) for e in events if e.get("event") == "convert")
        runs.append(r)
        # the conversion events accumulate in runlog.jsonl: only this run's count
        r["convert_seconds"] -= sum(x["convert_seconds"] for x in runs[:-1])
    return runs


def compare(ref: dict, ref_scores_path: str, jax_run: dict) -> dict:
    """CPR/CMD and the curves of both sides, and the agreement of their edge scores (as
    far as the reference got)."""
    import numpy as np

    from jaxinterp.compare import score_agreement
    from jaxinterp.graph import Graph

    out = {}
    if os.path.exists(ref_scores_path):
        ours = Graph.from_json(jax_run["graph"])
        out["scores"] = score_agreement(ours.scores, np.load(ref_scores_path), ours.spec.real_edge_mask,
                                        ks=(100, 1000))
    s = jax_run["result"]["score"]
    for key, area, name in (("signed", "area_under", "cpr"), ("absolute", "area_from_1", "cmd")):
        c = ref.get("curves", {}).get(key)
        out[name] = [c[area] if c else None, jax_run["result"][name]]
        if c:
            out[f"{name}_abs_diff"] = abs(out[name][0] - out[name][1])
            out[f"{key}_faithfulness_max_abs_diff"] = float(np.max(np.abs(np.subtract(c["faithfulness"],
                                                                                      s[key]["faithfulness"]))))
            out[f"{key}_edge_counts_equal"] = [float(x) for x in c["edge_counts"]] == \
                [float(x) for x in s[key]["edge_counts"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step")
    r = sub.add_parser("reference", help="(internal) MIB's pipeline, in the reference's venv")
    r.add_argument("--model", required=True)
    r.add_argument("--family", choices=("gpt2", "qwen2"), required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--tokens", required=True, help="JSON of jaxinterp's tokens of the clean and corrupted prompts")
    r.add_argument("--batch-size", type=int, required=True)
    r.add_argument("--eap-ig-path", required=True)
    r.add_argument("--mib-path", required=True)
    r.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="gpt2")
    ap.add_argument("--ref-python", default="/tmp/refvenv/bin/python")
    ap.add_argument("--eap-ig-path", default="/tmp/eapig_mib", help="hannamw/EAP-IG at the commit MIB pins")
    ap.add_argument("--mib-path", default="/tmp/mib_ct", help="hannamw/MIB-circuit-track")
    ap.add_argument("--jax-python", default=sys.executable, help="interpreter of the jaxinterp runs")
    ap.add_argument("--n", type=int, default=16, help="IOI pairs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warm", type=int, default=1, help="warm jaxinterp runs after the cold one")
    ap.add_argument("--skip-reference", help="reuse the reference's JSON prefix of an earlier run")
    ap.add_argument("--jax-first", action="store_true", help="run jaxinterp before the reference (not after)")
    ap.add_argument("--ref-timeout", type=int, help="stop the reference after this many seconds and report "
                    "the phases it finished (then its whole-process time is a lower bound)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "jaxinterp_mib_cell"))
    ap.add_argument("--out", help="output prefix: OUT.json and OUT.md")
    ap.add_argument("--report-only", action="store_true", help="write OUT.md again from OUT.json")
    ap.add_argument("--summary", nargs="+", metavar="PREFIX", help="write OUT.md: one table of these results")
    args = ap.parse_args()
    if args.step == "reference":
        return reference(args)
    if args.summary:
        from common import write_report

        results = []
        for prefix in args.summary:
            with open(prefix + ".json") as f:
                results.append(json.load(f))
        return write_report(args.out + ".md", summary_lines(args.summary, results))
    if args.report_only:
        from common import write_report

        with open(args.out + ".json") as f:
            res = json.load(f)
        res.setdefault("order", "reference first")
        res["reference"].setdefault("finished", True)
        return write_report(args.out + ".md", report_lines(res))
    if not args.out:
        ap.error("--out is required")

    name = SHAPES[args.shape][0]
    work = os.path.join(args.work, args.shape)
    os.makedirs(work, exist_ok=True)
    model = ensure_checkpoint(args.shape, os.path.join(args.work, f"ckpt_{args.shape}"))
    sys.path.insert(0, os.path.dirname(HERE))
    from transformers import AutoTokenizer

    from jaxinterp.data import read_pairs_csv, tokenize

    tok = AutoTokenizer.from_pretrained(model)
    data = write_ioi_pairs(os.path.join(work, f"ioi_{args.n}.csv"), tok, n=args.n, seed=0)
    rows = read_pairs_csv(data)
    tokens_path = os.path.join(work, "tokens.json")
    with open(tokens_path, "w") as f:
        json.dump({k: tokenize(tok, [row[k] for row in rows]) for k in ("clean", "corrupted")}, f)

    ref_prefix = args.skip_reference or os.path.join(work, "ref")
    for old in (".json", ".partial.json", ".npy"):
        if not args.skip_reference and os.path.exists(ref_prefix + old):
            os.remove(ref_prefix + old)
    ref_run = None
    runs = jax_runs(args, name, model, data, work) if args.jax_first else None
    if not args.skip_reference:
        limit = ["timeout", "-s", "INT", str(args.ref_timeout)] if args.ref_timeout else []
        ref_run = measured([*limit, args.ref_python, os.path.join(HERE, "bench_mib_cell.py"), "reference",
                            "--model", model,
                            "--family", "gpt2" if args.shape == "gpt2" else "qwen2", "--data", data, "--tokens",
                            tokens_path, "--batch-size", str(args.batch_size), "--eap-ig-path", args.eap_ig_path,
                            "--mib-path", args.mib_path, "--out", ref_prefix], os.path.join(work, "ref.log"),
                           may_fail=bool(args.ref_timeout))
    finished = os.path.exists(ref_prefix + ".json") and (ref_run is None or ref_run["rc"] == 0)
    with open(ref_prefix + (".json" if finished else ".partial.json")) as f:
        ref = json.load(f)
    ref["finished"] = finished
    runs = runs or jax_runs(args, name, model, data, work)
    agreement = compare(ref, ref_prefix + ".npy", runs[0])
    for r in runs:
        if ref_run:
            r["ratio_time"] = ref_run["seconds"] / r["seconds"]
            r["ratio_rss"] = ref_run["peak_rss_gb"] / r["peak_rss_gb"]
    from common import machine, write_json, write_report

    result = {"command": " ".join(sys.argv), "machine": machine(), "shape": args.shape, "mib_model": name,
              "n_pairs": args.n, "batch_size": args.batch_size, "ig_steps": IG_STEPS, "method": METHOD,
              "reference": {"process": ref_run, **ref}, "jaxinterp": runs, "agreement": agreement,
              "order": "jaxinterp first" if args.jax_first else "reference first", "niceness": os.nice(0),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_json(args.out + ".json", result)
    write_report(args.out + ".md", report_lines(result))


def summary_lines(prefixes: list, results: list) -> list:
    """One row per pipeline per cell: whole-process time and peak RSS, the ratios, CPR/CMD."""
    lines = ["# MIB circuit-track cells: jaxinterp against MIB's own pipeline (CPU)", "",
             "Each cell: IOI, EAP-IG-inputs (ig_steps 5) at the edge level, then the faithfulness curve over MIB's "
             "ten sizes under both rankings (CPR, CMD); random-init checkpoints at the real shapes; both sides on "
             "the same checkpoint, pairs and batch size, one after the other, under `nice -n 19` on a shared "
             "2-core machine (the load is that of the other engineers' jobs). Details per cell: "
             + ", ".join(f"`{os.path.basename(p)}.md`" for p in prefixes) + ".", "",
             "| cell | pairs / batch | pipeline | whole process | peak RSS | load | time ratio | RSS ratio | CPR "
             "| CMD |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        ref, p, ag = res["reference"], res["reference"].get("process"), res["agreement"]
        cell = f"ioi_{res['mib_model']} ({ref.get('n_edges', '?')} edges)"
        size = f"{res['n_pairs']} / {res['batch_size']}"
        bound = "" if ref.get("finished", True) else " (stopped)"
        fmt = (lambda x: "-" if x is None else f"{x:.4f}")
        if p:
            lines.append(f"| {cell} | {size} | MIB | {p['seconds']:.0f} s{bound} | {p['peak_rss_gb']:.2f} GB | "
                         f"{p['loadavg_before'][0]:.1f}-{p['loadavg_after'][0]:.1f} | 1 | 1 | {fmt(ag['cpr'][0])} | "
                         f"{fmt(ag['cmd'][0])} |")
        for r in res["jaxinterp"]:
            lt = ">" if not ref.get("finished", True) else ""
            ratio = (f"{lt}{r['ratio_time']:.1f}x", f"{r['ratio_rss']:.2f}x") if "ratio_time" in r else ("-", "-")
            lines.append(f"| {cell} | {size} | jaxinterp ({r['kind']}) | {r['seconds']:.0f} s | "
                         f"{r['peak_rss_gb']:.2f} GB | {r['loadavg_before'][0]:.1f}-{r['loadavg_after'][0]:.1f} | "
                         f"{ratio[0]} | {ratio[1]} | {r['result']['cpr']:.4f} | {r['result']['cmd']:.4f} |")
    lines += ["", "Ratios: the reference's whole process over jaxinterp's (above 1: jaxinterp faster / smaller)."]
    return lines


def report_lines(res: dict) -> list:
    ref, runs, ag = res["reference"], res["jaxinterp"], res["agreement"]
    rt, p = ref["times"], ref.get("process")
    lines = [f"# MIB cell ioi_{res['mib_model']}, {res['shape']}-shaped random init, {res['method']} (edge), "
             f"{res['n_pairs']} IOI pairs, batch {res['batch_size']}, ig_steps {res['ig_steps']}", "",
             f"`{res['command']}`" + (f" (niceness {res['niceness']}; jaxinterp and the reference one after the "
                                      f"other)" if res.get("niceness") is not None else ""), "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores (shared); {res['date']}; "
             f"{res['order']}. {ref.get('n_edges', '?')} edges. Reference: torch {ref['torch']}, TransformerLens "
             f"{ref['transformer_lens']}, EAP-IG {ref['eap_ig_commit']}, MIB-circuit-track {ref.get('mib_commit')}, "
             f"{ref['torch_threads']} torch threads; its peak RSS after loading (TransformerLens + transformers "
             f"copies, as from_pretrained has them) {rt.get('peak_rss_gb_after_load', float('nan')):.2f} GB.", "",
             "| pipeline | whole process | peak RSS | inside the process | load before / after | "
             "reference / it (time, RSS) |", "|---|---|---|---|---|---|"]
    if p:
        inside = [f"load {rt['load_model']:.0f} s"]
        if "attribute" in rt:
            inside.append(f"attribute {rt['attribute']:.0f} s")
        for key in ("signed", "absolute"):
            if f"evaluate_{key}" in rt:
                inside.append(f"curve {key} {rt[f'evaluate_{key}']:.0f} s")
        io = sum(v for k, v in rt.items() if "json" in k)
        inside.append(f"graph JSON {io:.1f} s")
        done = "" if ref["finished"] else " (stopped: a lower bound)"
        lines.append(f"| MIB (EAP-IG attribute + evaluate_area_under_curve x2) | {p['seconds']:.0f} s{done} | "
                     f"{p['peak_rss_gb']:.2f} GB | {', '.join(inside)} | {p['loadavg_before'][0]:.1f} / "
                     f"{p['loadavg_after'][0]:.1f} | 1 |")
    for r in runs:
        t = r["result"]["timing"]
        ratio = f"{r['ratio_time']:.1f}x, {r['ratio_rss']:.2f}x" if "ratio_time" in r else "-"
        if "ratio_time" in r and not ref["finished"]:
            ratio = f"> {r['ratio_time']:.1f}x, {r['ratio_rss']:.2f}x"
        lines.append(f"| jaxinterp mib run ({r['kind']}) | {r['seconds']:.0f} s | {r['peak_rss_gb']:.2f} GB | "
                     f"convert {r['convert_seconds']:.0f} s, attribute {t['attribute_s']:.0f} s, curves "
                     f"{t['score_s']:.0f} s | {r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} | {ratio} |")
    lines.append("")
    for name, key in (("CPR", "signed"), ("CMD", "absolute")):
        mib, jx = ag[name.lower()]
        if mib is None:
            lines.append(f"{name}: jaxinterp {jx:.6f}; the reference did not get to its curve.")
        else:
            lines.append(f"{name}: MIB {mib:.6f}, jaxinterp {jx:.6f} (|diff| {ag[name.lower() + '_abs_diff']:.1e}); "
                         f"faithfulness at the ten sizes: max |diff| {ag[key + '_faithfulness_max_abs_diff']:.1e}; "
                         f"edge counts equal: {ag[key + '_edge_counts_equal']}.")
        lines.append("")
    if "scores" in ag:
        sc = ag["scores"]
        lines.append(f"Edge scores: Pearson {sc['pearson']:.7f}, Spearman {sc['spearman']:.7f}, top-100 overlap "
                     f"{sc['top100_overlap']:.2f}, top-1000 {sc['top1000_overlap']:.3f} (the reference's scores are "
                     f"per-batch means summed, jaxinterp's per-example means: a constant factor).")
    return lines


if __name__ == "__main__":
    main()
