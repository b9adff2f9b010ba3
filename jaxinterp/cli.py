"""``jaxinterp`` command line: convert, attribute, evaluate, curve, acdc, lens, sweep, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory or a `jaxinterp convert` output")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the model (scores are accumulated in float32; default: float32)")
    if data:
        p.add_argument("--data", required=True,
                       help="pairs CSV: columns clean, corrupted and correct_idx, incorrect_idx (token ids) or label")
        p.add_argument("--metric", default="logit_diff", choices=["logit_diff", "prob_diff", "kl_div"],
                       help="task metric, read at each prompt's last real token (default: logit_diff)")
        p.add_argument("--batch-size", type=int, default=16, help="examples per compiled batch (default: 16)")
        p.add_argument("--intervention", default="patching", choices=["patching", "zero", "mean", "mean-positional"],
                       help="what an edge outside the circuit carries: the corrupted activation, zero, or the "
                            "node's mean output over --intervention-data (over all tokens, or per position)")
        p.add_argument("--intervention-data", default=None, metavar="CSV",
                       help="pairs CSV whose clean prompts the mean interventions average over (default: --data)")
        p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
        p.add_argument("--grouped-kv", action="store_true",
                       help="grouped-query attention: one <k>/<v> input per key/value head (a{l}.kv{g}<k>, fewer "
                            "edges) instead of one per query head (the reference's view, the default); a graph "
                            "file must be used with the view it was made in")


def _load(args, mesh=None):
    from .attribution import prepare_data
    from .loading import load_model

    import jax.numpy as jnp

    model = load_model(args.model, dtype=jnp.dtype(args.dtype), grouped_kv=args.grouped_kv, mesh=mesh)
    pairs, _ = prepare_data(model, args.data, args.metric)
    if args.limit:
        pairs = pairs.head(args.limit)
    return model, pairs


def _sizes(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants comma-separated integers, got {text!r}") from None


def cmd_convert(args) -> int:
    from .conversion import convert_hf

    t = time.perf_counter()
    convert_hf(args.hf_dir, args.out_dir)
    print(f"converted {args.hf_dir} -> {args.out_dir} in {time.perf_counter() - t:.1f}s")
    return 0


def _mesh(args):
    """The ``--mesh DxM`` mesh (after ``--distributed`` set-up), or None."""
    if getattr(args, "distributed", False):
        from .distributed import initialize

        initialize()  # before anything touches jax's devices
    if not getattr(args, "mesh", None):
        return None
    from .sharding import make_mesh, parse_mesh

    return make_mesh(*parse_mesh(args.mesh))


def cmd_attribute(args) -> int:
    from .attribution import attribute

    mesh = _mesh(args)
    model, pairs = _load(args, mesh)  # each device receives only its shards
    t = time.perf_counter()
    graph = attribute(model, pairs, method=args.method, metric=args.metric, ig_steps=args.ig_steps,
                      batch_size=args.batch_size, intervention=args.intervention, remat=args.remat,
                      mesh=mesh, max_memory=args.max_memory, intervention_data=args.intervention_data)
    seconds = time.perf_counter() - t
    if args.top_n:
        graph.apply_topn(args.top_n, absolute=not args.signed)
    import jax

    if jax.process_index() != 0:  # every process holds the same scores; one writes them
        return 0
    graph.to_json(args.out)
    print(f"{args.method}: scored {graph.spec.n_edges} edges on {len(pairs)} examples in {seconds:.1f}s "
          f"-> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_baseline, evaluate_empty, evaluate_graph, normalized_faithfulness
    from .graph import Graph

    model, pairs = _load(args)
    graph = Graph.from_json(args.graph, spec=model.graph_spec)  # refuses the other view's files
    if args.top_n is not None:
        graph.apply_topn(args.top_n, absolute=not args.signed)
    elif args.threshold is not None:
        graph.apply_threshold(args.threshold, absolute=not args.signed)
    kw = dict(metric=args.metric, batch_size=args.batch_size)
    iv = dict(intervention=args.intervention, intervention_data=args.intervention_data)
    value = evaluate_graph(model, graph, pairs, **iv, **kw)
    clean = evaluate_baseline(model, pairs, **kw)
    empty = evaluate_empty(model, pairs, **iv, **kw)
    result = {"edges": graph.count_included_edges(), "nodes": graph.count_included_nodes(),
              "metric": args.metric, "intervention": args.intervention, "circuit": value, "model": clean,
              "empty": empty, "faithfulness": float(normalized_faithfulness(value, clean, empty))}
    print(json.dumps(result, indent=2))
    return 0


def cmd_curve(args) -> int:
    from .evaluation import faithfulness_curve
    from .graph import Graph
    from .plots import plot_curves

    model, pairs = _load(args)
    graph = Graph.from_json(args.graph, spec=model.graph_spec)  # refuses the other view's files
    sizes = [s for s in args.sizes if s <= graph.spec.n_edges]
    curve = faithfulness_curve(model, graph, pairs, sizes, metric=args.metric, intervention=args.intervention,
                               intervention_data=args.intervention_data, batch_size=args.batch_size, absolute=not args.signed, label=args.graph, quiet=False)
    plot_curves([curve], args.out)
    for n, kept, f in zip(curve.sizes, curve.n_edges, curve.faithfulness):
        print(f"top {n:>6}  ({kept:>6} edges after pruning)  faithfulness {f:.4f}")
    print(f"-> {args.out}")
    return 0


def cmd_acdc(args) -> int:
    from .acdc import acdc

    model, pairs = _load(args)
    t = time.perf_counter()
    graph = acdc(model, pairs, args.threshold, metric=args.metric, batch_size=args.batch_size,
                 absolute=args.absolute, intervention=args.intervention, intervention_data=args.intervention_data)
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
    result = learn_circuit(model, pairs, args.edges, objective=args.objective, intervention=args.intervention,
                           intervention_data=args.intervention_data, steps=args.steps, lr=args.lr,
                           batch_size=args.batch_size, init_scores=init, positional=args.positional,
                           seed=args.seed, mesh=mesh)
    seconds = time.perf_counter() - t
    import jax

    if jax.process_index() != 0:
        return 0
    result.graph.to_json(args.out)
    history_png = os.path.splitext(args.out)[0] + "_training.png"
    plot_pruning_history(result.history, history_png)
    h = result.history
    print(f"edge pruning ({args.objective}, {args.steps} steps, {seconds:.1f}s): kept "
          f"{result.graph.count_included_edges()} {'(position, edge) entries' if args.positional else 'edges'}; "
          f"final loss {h['faithfulness_loss'][-1]:.4f} of the empty circuit's, expected density "
          f"{h['density'][-1]:.4f} (target {h['target'][-1]:.4f}) -> {args.out}, {history_png}")
    return 0


def cmd_lens(args) -> int:
    from .lens import lens_report, plot_logit_lens
    from .loading import load_model

    model = load_model(args.model)
    report = lens_report(model, args.prompt, k=args.top_k)
    plot_logit_lens(report["lens"][:, -args.last:] if args.last else report["lens"],
                    report["tokens"][-args.last:] if args.last else report["tokens"],
                    lambda t: model.tokenizer.decode([t]), args.out, title=f"logit lens: {args.prompt}")
    print(f"logit lens at the last token {report['tokens'][-1]!r} (top {args.top_k}, probability):")
    for row in report["per_layer"]:
        print(f"  {row['layer']:>15}: " + "  ".join(f"{t.strip()!r} {p:.3f}" for t, p in row["top"]))
    if "direct" in report:
        d = report["direct"]
        print(f"direct logit attribution to {d['token'].strip()!r} (logit {d['logit']:.3f}; "
              f"constants and biases {d['rest']:.3f}):")
        for name, value in d["nodes"]:
            print(f"  {name:>10}: {value:+.3f}")
    print(f"-> {args.out}")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    run_sweep(args.toml, out_dir=args.out, quiet=args.quiet)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(model=args.model, out_dir=args.out, n_examples=args.n, batch_size=args.batch_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinterp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to an orbax checkpoint")
    p.add_argument("hf_dir", help="directory with config.json and model.safetensors (or a sharded index)")
    p.add_argument("out_dir", help="where to write the converted model")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("attribute", help="score every edge of the circuit graph")
    _add_common(p)
    p.add_argument("--method", default="EAP-IG-inputs",
                   choices=["EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted", "exact"])
    p.add_argument("--ig-steps", type=int, default=5, help="integration steps for the EAP-IG methods (default: 5)")
    p.add_argument("--remat", action="store_true",
                   help="recompute each layer in the backward pass (less memory, about one more forward)")
    p.add_argument("--mesh", default=None, metavar="DxM",
                   help="shard over a DATAxMODEL device mesh, e.g. 2x4: examples over 2, heads/MLP units over 4")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="device memory to fit in, e.g. 70GB or 512MiB: picks the largest batch size that fits "
                        "(overrides --batch-size)")
    p.add_argument("--distributed", action="store_true",
                   help="join other processes first (jax.distributed; JAXINTERP_COORDINATOR, "
                        "JAXINTERP_NUM_PROCESSES, JAXINTERP_PROCESS_ID or the cluster's own variables)")
    p.add_argument("--top-n", type=int, default=None, help="mark the top-N edges as the circuit in the output")
    p.add_argument("--signed", action="store_true", help="rank by signed score instead of absolute value")
    p.add_argument("--out", required=True, help="graph JSON to write (the reference's Graph.to_json format)")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("evaluate", help="faithfulness of a circuit")
    _add_common(p)
    p.add_argument("--graph", required=True, help="graph JSON (from `attribute` or the reference)")
    p.add_argument("--top-n", type=int, default=None, help="circuit = top-N edges by |score|")
    p.add_argument("--threshold", type=float, default=None, help="circuit = edges with |score| >= T")
    p.add_argument("--signed", action="store_true", help="rank by signed score")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("curve", help="faithfulness over many circuit sizes, in one compiled call")
    _add_common(p)
    p.add_argument("--graph", required=True, help="graph JSON with scores")
    p.add_argument("--sizes", type=_sizes, default=_sizes("10,20,50,100,200,500,1000,2000,5000,10000"),
                   help="comma-separated circuit sizes (edges)")
    p.add_argument("--signed", action="store_true", help="rank by signed score")
    p.add_argument("--out", default="curve.png", help="PNG of the curve")
    p.set_defaults(func=cmd_curve)

    p = sub.add_parser("acdc", help="ACDC: prune edges one at a time from the logits backwards (exact patching)")
    _add_common(p)
    p.set_defaults(metric="kl_div")
    p.description = ("ACDC (Conmy et al. 2023) with exact patching. Here --metric defaults to kl_div (KL from "
                     "the clean model, ACDC's choice).")
    p.add_argument("--threshold", type=float, required=True,
                   help="remove an edge when its removal raises the loss (KL, or minus the task metric) by less")
    p.add_argument("--absolute", action="store_true", help="compare |change| with the threshold")
    p.add_argument("--out", required=True, help="graph JSON to write (the reference's Graph.to_json format)")
    p.set_defaults(func=cmd_acdc)

    p = sub.add_parser("prune", help="learn a circuit of N edges with optimised edge masks (Edge Pruning)")
    _add_common(p)
    p.set_defaults(metric="kl_div")
    p.description = ("Edge Pruning (Bhaskar et al. 2024): hard-concrete masks on every edge, trained with Adam to "
                     "keep the output close to the full model while a Lagrangian drives the expected edge count to "
                     "--edges. Edges outside the circuit carry what --intervention says, as in evaluation.")
    p.add_argument("--edges", type=int, required=True, help="edges in the circuit ((position, edge) entries with "
                                                            "--positional)")
    p.add_argument("--objective", default="kl_div", choices=["kl_div", "logit_diff", "prob_diff"],
                   help="KL from the full model (default) or the squared difference of a task metric from it")
    p.add_argument("--steps", type=int, default=500, help="optimisation steps, one batch each (default: 500)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the mask logits (default: 0.1)")
    p.add_argument("--init-graph", default=None, help="graph JSON with attribution scores to start from")
    p.add_argument("--positional", action="store_true",
                   help="one mask per (position, edge); all prompts must have one token length")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask noise")
    p.add_argument("--mesh", default=None, metavar="DxM", help="shard over a DATAxMODEL device mesh, e.g. 2x4")
    p.add_argument("--out", required=True, help="graph JSON to write (position-aware: its own JSON format); a "
                                                "picture of the training goes next to it")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("lens", help="logit lens picture and top tokens of a prompt")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory or a `jaxinterp convert` output")
    p.add_argument("--prompt", required=True, help="text to read (BOS is prepended)")
    p.add_argument("--top-k", type=int, default=5, help="tokens to print per layer (default: 5)")
    p.add_argument("--last", type=int, default=None, help="draw only the last N positions")
    p.add_argument("--out", default="lens.png", help="PNG of the logit lens")
    p.set_defaults(func=cmd_lens)

    p = sub.add_parser("sweep", help="every model x task x method x ig_steps cell of a TOML file (restartable)")
    p.add_argument("toml", help="sweep file: [sweep] settings, [models] name = dir, [tasks.NAME] csv or generate")
    p.add_argument("--out", default=None, help="output directory (default: [sweep].out, relative to the file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="EAP, EAP-IG and exact patching on the shipped demo model and IOI task")
    p.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    p.add_argument("--out", default="jaxinterp-demo", help="output directory for the pictures and the report")
    p.add_argument("--n", type=int, default=64, help="number of IOI prompt pairs")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, NotImplementedError, MemoryError) as e:
        if os.environ.get("JAXINTERP_DEBUG"):
            raise
        # bad input: the message names the problem; a traceback would bury it
        print(f"jaxinterp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
