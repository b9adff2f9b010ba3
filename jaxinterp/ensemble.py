"""Score ensembles: several methods' edge scores combined into one ranking.

Combining the normalised edge scores of several attribution methods (EAP, EAP-IG,
learned masks, ...) and ranking edges by the combination was the recipe at the top of
the 2025 MIB circuit-track shared task. Methods' scores live on different scales (a
gradient estimate, a mask logit, a KL change), so each graph is normalised first and the
normalised scores are then combined edge by edge.

**Normalisation** (:func:`normalise_scores`), chosen so that a combination means the same
whatever the methods' units:

* global (default): every real edge's score divided by the largest ``|score|`` over the
  graph's real edges, so the strongest edge of every method is ``+-1``;
* per destination (``per_destination=True``): each downstream input ``v`` (a column
  ``[:, v]``) divided by the largest ``|score|`` over ``v``'s own real edges, so every
  input's strongest incoming edge is ``+-1`` (inputs with weak effects are not drowned
  by the few strong ones);
* the sign is kept (a signed ranking, MIB's CPR, still sees which edges help and which
  hurt); a graph (or a destination) whose real scores are all zero has nothing to rank
  and stays all zero (instead of 0/0 = NaN); entries that are not edges are 0 before and
  after.

**Combination** (:func:`combine_scores`), per edge over the ``K`` normalised graphs
``s_k``: ``mean`` ``sum_k s_k / K``; ``weighted`` ``sum_k w_k s_k / sum_k w_k`` (weights
> 0); ``min`` ``min_k s_k``; ``max`` ``max_k s_k``. With ``absolute=True`` the ``|s_k|``
are combined instead (for rankings by ``|score|``, where methods may disagree about an
edge's sign but agree that it matters). The result is a :class:`Graph` of scores only
(no edge in the circuit): rank it like any method's graph (``evaluate --top-n``,
``curve``, ``mib score``), or start Edge Pruning from it (``prune --init-graph``, which
sets the initial mask logits by the ensemble's rank: see
:func:`jaxinterp.edge_pruning.learn_circuit`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .graph import Graph, GraphSpec

HOWS = ("mean", "weighted", "min", "max")


def normalise_scores(scores: np.ndarray, real: np.ndarray, per_destination: bool = False) -> np.ndarray:
    """``scores [src, dst]`` divided by the largest ``|score|`` over the real edges
    ``real [src, dst]`` (of the whole graph, or of each destination column); sign kept,
    all-zero graphs / columns stay zero, non-edges are 0 (module docstring)."""
    s = np.where(real, np.asarray(scores, np.float64), 0.0)
    scale = np.abs(s).max(axis=0, keepdims=True) if per_destination else np.abs(s).max(keepdims=True)
    return s / np.where(scale > 0, scale, 1.0)


def combine_scores(normalised: Sequence[np.ndarray], how: str = "mean", weights: Optional[Sequence[float]] = None,
                   absolute: bool = False) -> np.ndarray:
    """Edge-wise combination ``[src, dst]`` of ``K`` normalised score arrays (module
    docstring); ``weights`` (``K`` numbers > 0) only with ``how="weighted"``, where they
    are required."""
    if how not in HOWS:
        raise ValueError(f"unknown ensemble {how!r}; choose from {HOWS}")
    stack = np.stack([np.asarray(s, np.float64) for s in normalised])
    if absolute:
        stack = np.abs(stack)
    if (weights is not None) != (how == "weighted"):
        raise ValueError("weights go with how='weighted' (one per graph), and it needs them")
    if how == "weighted":
        w = np.asarray(weights, np.float64)
        if w.shape != (len(stack),) or not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"weights must be {len(stack)} finite numbers > 0 (one per graph), got {list(weights)}")
        return np.tensordot(w / w.sum(), stack, axes=1)
    return {"mean": np.mean, "min": np.min, "max": np.max}[how](stack, axis=0)


def check_same_graphs(specs: Sequence[GraphSpec], names: Sequence[str]) -> None:
    """ValueError unless every graph is of one model shape and view (naming the first
    that is not). A ``d_model`` of 0 (files that do not record it) matches any."""
    first = specs[0]
    for spec, name in zip(specs[1:], names[1:]):
        same = ((first.n_layers, first.n_heads, first.parallel_attn_mlp, first.n_kv_inputs)
                == (spec.n_layers, spec.n_heads, spec.parallel_attn_mlp, spec.n_kv_inputs)
                and (0 in (first.d_model, spec.d_model) or first.d_model == spec.d_model))
        if not same:
            raise ValueError(f"{name} is a graph of {_describe(spec)}, but {names[0]} is a graph of "
                             f"{_describe(first)}: an ensemble combines graphs of one model (and one view)")


def _describe(spec: GraphSpec) -> str:
    return spec.describe() + (f", d_model {spec.d_model}" if spec.d_model else "")


def ensemble_graphs(graphs: Sequence[Graph], how: str = "mean", weights: Optional[Sequence[float]] = None,
                    per_destination: bool = False, absolute: bool = False,
                    names: Optional[Sequence[str]] = None) -> Graph:
    """One :class:`Graph` whose edge scores combine ``graphs``' normalised edge scores
    (module docstring); ``names`` (e.g. the files) name the graphs in errors."""
    if len(graphs) < 1:
        raise ValueError("an ensemble needs at least one graph")
    names = list(names) if names is not None else [f"graph {i}" for i in range(len(graphs))]
    check_same_graphs([g.spec for g in graphs], names)
    spec = graphs[0].spec
    if spec.d_model == 0:  # keep the width a file records, whichever graph has it
        spec = next((g.spec for g in graphs if g.spec.d_model), spec)
    normalised = [normalise_scores(g.scores, spec.real_edge_mask, per_destination) for g in graphs]
    return Graph(spec, combine_scores(normalised, how, weights, absolute).astype(np.float32))


# --- command line ---------------------------------------------------------------------------
def cmd_ensemble(args) -> int:
    """``jaxinterp ensemble``: combine graph files into one (options checked before any work)."""
    from .errors import JaxinterpError
    from .io import check_input_file, check_writable_file

    for path in args.graphs:
        check_input_file(path, "--graph")
    if len(set(map(str, args.graphs))) != len(args.graphs):
        raise JaxinterpError("--graph: a file is given twice")
    if args.how == "weighted":
        if args.weights is None or len(args.weights) != len(args.graphs):
            raise JaxinterpError(f"--how weighted needs one --weight per --graph ({len(args.graphs)} graphs, "
                                 f"{0 if args.weights is None else len(args.weights)} weights)")
    elif args.weights is not None:
        raise JaxinterpError(f"--weight is for --how weighted, not --how {args.how}")
    check_writable_file(args.out, "--out", [("--graph", g) for g in args.graphs])
    graphs = [Graph.from_json(path) for path in args.graphs]
    graph = ensemble_graphs(graphs, args.how, args.weights, args.per_destination, args.absolute, args.graphs)
    graph.to_json(args.out)
    norm = "per destination" if args.per_destination else "per graph"
    print(f"ensemble ({args.how}{' of |score|' if args.absolute else ''}, normalised {norm}) of "
          f"{len(graphs)} graphs, {graph.spec.n_edges} edges -> {args.out}")
    return 0


def add_parser(sub, positive_float) -> None:
    """The ``ensemble`` command (called by :func:`jaxinterp.cli.build_parser`)."""
    p = sub.add_parser("ensemble", help="combine several methods' graph files into one ranking (normalised scores: "
                                        "mean, weighted, min or max)")
    p.description = " ".join(__doc__.split("\n\n")[1].split())
    p.add_argument("--graph", dest="graphs", action="append", required=True, metavar="JSON",
                   help="a graph JSON with edge scores (the reference's format), repeatable")
    p.add_argument("--how", default="mean", choices=HOWS, help="how to combine the normalised scores (default: mean)")
    p.add_argument("--weight", dest="weights", action="append", type=positive_float, default=None, metavar="W",
                   help="with --how weighted: one weight > 0 per --graph, in the same order")
    p.add_argument("--per-destination", action="store_true",
                   help="normalise each downstream input's incoming scores separately (default: each graph by its "
                        "largest |score|)")
    p.add_argument("--absolute", action="store_true", help="combine |normalised score| (for rankings by |score|)")
    p.add_argument("--out", required=True, help="graph JSON to write")
    p.set_defaults(func=cmd_ensemble)
