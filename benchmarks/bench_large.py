"""EAP-IG on a large Llama-architecture random-init model: params, tokens, peak memory, time.

    python benchmarks/bench_large.py --shape llama-3.2-1b --batch-size 4 --pos 32 \
        --method EAP-IG-inputs --out benchmarks/results/large_llama1b_cpu.json

The checkpoint (config.json from ``transformers.LlamaConfig`` + random ``model.safetensors``
written with numpy, so neither torch nor a download is needed) is built once in the temp
directory; ``--init device`` instead draws the weights on the device with ``jax.random``
(no checkpoint: an 8B model's 32 GB of float32 would take minutes to write and read). Data are random token sequences with a few corrupted positions: the timing and
memory of attribution do not depend on what the tokens mean. Reports parameters, tokens per
batch, compilation and steady-state seconds per batch, examples/s, model FLOPs per second
(XLA's cost analysis of the compiled program / time; on a GPU also as a fraction of the
device's dense peak, ``--peak-tflops``), peak RSS and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from common import gpu_peak_mb, machine, peak_rss_mb, write_json

from jaxinterp.shapes import HF_SHAPES

# the shapes of the public models (vocabulary included), random weights: the Llama-architecture
# entries of the one shape table, jaxinterp.shapes, in the LlamaConfig fields this script writes
_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "vocab_size", "head_dim", "tie_word_embeddings")
SHAPES = {name: {k: hf[k] for k in _KEYS} for name, hf in HF_SHAPES.items()
          if hf["model_type"] == "llama" and name != "llama-3-70b"}


def build_checkpoint(path: str, shape: dict, dtype: str, seed: int = 0) -> str:
    """Write ``config.json`` + ``model.safetensors`` with Hugging Face's Llama names."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(path, exist_ok=True)
    cfg = LlamaConfig(**shape, rope_theta=500000.0, max_position_embeddings=8192, torch_dtype=dtype)
    rng = np.random.default_rng(seed)
    np_dtype = np.float32 if dtype == "float32" else np.float16  # bfloat16 has no numpy type; upcast on load
    d, f, h, kv, dh = (shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"],
                       shape["num_key_value_heads"], shape["head_dim"])

    def w(*s):
        return (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np_dtype)

    tensors = {"model.embed_tokens.weight": w(shape["vocab_size"], d), "model.norm.weight": np.ones(d, np_dtype)}
    if not shape["tie_word_embeddings"]:
        tensors["lm_head.weight"] = w(shape["vocab_size"], d)
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(h * dh, d), p + "self_attn.k_proj.weight": w(kv * dh, d),
            p + "self_attn.v_proj.weight": w(kv * dh, d), p + "self_attn.o_proj.weight": w(d, h * dh),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": np.ones(d, np_dtype), p + "post_attention_layernorm.weight": np.ones(d, np_dtype),
        })
    save_file(tensors, os.path.join(path, "model.safetensors"))
    cfg.save_pretrained(path)
    return path


def device_model(shape: str, dtype, seed: int = 0):
    """A :class:`jaxinterp.Model` of the named shape (:mod:`jaxinterp.shapes`) whose weights
    are drawn on the default device (norm weights 1, the rest N(0, 0.02)), no checkpoint."""
    import jax
    import jax.numpy as jnp

    from jaxinterp.layout import abstract_params
    from jaxinterp.model import Model
    from jaxinterp.shapes import model_config

    cfg = model_config(shape)
    leaves, tree = jax.tree_util.tree_flatten_with_path(abstract_params(cfg, dtype))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))

    def draw(path, leaf, key):
        if any(str(getattr(k, "key", k)).startswith("ln") for k in path):
            return jnp.ones(leaf.shape, leaf.dtype)
        return (0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)

    params = [jax.jit(draw, static_argnums=(0, 1))(tuple(path), leaf, key) for (path, leaf), key in zip(leaves, keys)]
    return Model(cfg, jax.tree_util.tree_unflatten(tree, params))


def random_pairs(n: int, n_pos: int, vocab: int, seed: int = 0):
    from jaxinterp.data import Pairs

    rng = np.random.default_rng(seed)
    clean = rng.integers(1, vocab, size=(n, n_pos)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, n_pos // 2] = rng.integers(1, vocab, size=n)  # one corrupted position, as IOI's subject
    return Pairs(clean=clean, corrupted=corrupted, attention_mask=np.ones((n, n_pos), np.int32),
                 lengths=np.full(n, n_pos, np.int32), labels=rng.integers(1, vocab, size=(n, 2)).astype(np.int32))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pos", type=int, default=32, help="tokens per prompt")
    ap.add_argument("--batches", type=int, default=2, help="batches timed after the first (compiling) one")
    ap.add_argument("--method", default="EAP-IG-inputs")
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device's dense peak for this dtype (e.g. 989 for H100 SXM bf16) to report MFU")
    ap.add_argument("--checkpoint-dir", default=None, help="where to build the checkpoint (default: temp dir)")
    ap.add_argument("--init", default="checkpoint", choices=["checkpoint", "device"],
                    help="weights from a written random checkpoint, or drawn on the device")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxinterp import load_model
    from jaxinterp.attribution import batch_scores
    from jaxinterp.interventions import TaskMetric

    shape = SHAPES[args.shape]
    path = args.checkpoint_dir or os.path.join(tempfile.gettempdir(), f"jaxinterp-{args.shape}-random")
    t = time.perf_counter()
    if args.init == "checkpoint":
        build_checkpoint(path, shape, "float32")
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    if args.init == "checkpoint":
        model = load_model(path, dtype=jnp.dtype(args.dtype))
    else:
        model = device_model(args.shape, jnp.dtype(args.dtype))
        jax.block_until_ready(model.params)
    t_load = time.perf_counter() - t
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(model.params))
    spec = model.graph_spec
    pairs = random_pairs(args.batch_size * (args.batches + 1), args.pos, shape["vocab_size"])
    batches = list(pairs.batches(args.batch_size))
    kw = dict(cfg=model.cfg, method=args.method, metric=TaskMetric("logit_diff"), ig_steps=args.ig_steps,
              remat=args.remat)
    t = time.perf_counter()
    compiled = batch_scores.lower(model.params, batches[0], **kw).compile()
    t_compile = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    times = []
    for b in batches:
        t = time.perf_counter()
        scores = jax.block_until_ready(compiled(model.params, b))
        times.append(time.perf_counter() - t)
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    finite = bool(np.isfinite(np.asarray(scores)).all())
    result = {
        "benchmark": "large", "shape": args.shape, "config": shape, "dtype": args.dtype, "n_params": n_params,
        "n_edges": spec.n_edges, "n_forward": spec.n_forward, "n_backward": spec.n_backward,
        "method": args.method, "ig_steps": args.ig_steps if "IG" in args.method else None, "remat": args.remat,
        "batch_size": args.batch_size, "n_pos": args.pos, "tokens_per_batch": args.batch_size * args.pos,
        "build_s": t_build, "load_s": t_load, "compile_s": t_compile, "batch_seconds": times,
        "seconds_per_batch": steady, "examples_per_s": args.batch_size / steady,
        # XLA counts a scan body once: the IG steps' loop is multiplied out here
        "xla_flops_per_batch": flops, "scores_finite": finite,
        "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu_peak_mb(), "machine": machine(),
        "command": "python benchmarks/bench_large.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v not in (None, False) and k not in ("out", "checkpoint_dir")),
    }
    # Model FLOPs: 2 * (non-embedding params) * tokens per forward pass (the unembedding runs
    # at one position per prompt only). The backward pass differentiates w.r.t. activations,
    # not weights, so it costs about one forward: EAP = corrupted forward + clean forward +
    # backward = 3 passes; EAP-IG-inputs = 2 + 2 * steps; clean-corrupted = 2 + 2 * 2.
    n_passes = {"EAP": 3, "clean-corrupted": 6, "EAP-IG-inputs": 2 + 2 * args.ig_steps}.get(args.method)
    if n_passes:
        non_embedding = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(model.params["blocks"]))
        result["n_params_non_embedding"] = non_embedding
        model_flops = 2 * non_embedding * args.batch_size * args.pos * n_passes
        result["model_flops_per_batch"] = model_flops
        result["model_tflops_per_s"] = model_flops / steady / 1e12
        if args.peak_tflops:
            result["mfu"] = result["model_tflops_per_s"] / args.peak_tflops
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("shape", "n_params", "tokens_per_batch", "compile_s",
                                               "seconds_per_batch", "examples_per_s", "peak_rss_mb",
                                               "peak_gpu_mb", "scores_finite")}, indent=1))
    if "model_tflops_per_s" in result:
        print(f"model TFLOP/s {result['model_tflops_per_s']:.3f}" +
              (f", MFU {result['mfu']:.1%}" if "mfu" in result else ""))


if __name__ == "__main__":
    main()
