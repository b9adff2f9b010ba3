"""Position-aware edges: one score and one circuit bit per (position, edge).

When every prompt of a task follows one template of one token length (as auto-circuit's
``seq_len`` graphs assume), an edge ``u->v`` at position ``p`` is the contribution of
``u``'s output at ``p`` to ``v``'s input at ``p``. The graph forward takes coefficients
``coef [pos, src, dst]`` (:mod:`jaxinterp.models`), so the gradient methods score every
(position, edge) in the same backward pass, and a circuit ablates each edge at the
positions outside it only. Because the position-free coefficient of an edge is the same
number at every position, the position-free gradient score is exactly the sum of the
per-position scores (tests/test_positional.py checks this for every gradient method).

Graph files: the reference's JSON has no positions, so a :class:`PositionalGraph` is
written as its own JSON (``"positions"`` plus per-edge lists); :meth:`PositionalGraph.summed`
gives an ordinary :class:`jaxinterp.graph.Graph` for everything position-free.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from .graph import Graph, GraphSpec, atomic_write_text, ranked_scores, topn_order


class PositionError(ValueError):
    """The data cannot have position-aware edges (the message says why)."""


def check_one_length(lengths: np.ndarray, n_pos: int, corrupted_lengths: Optional[np.ndarray] = None) -> int:
    """The common token length of every prompt; raises :class:`PositionError` if prompts
    (clean or corrupted) differ in length, since position ``p`` must be the same template
    slot in every prompt."""
    seen = sorted(set(np.asarray(lengths).tolist())
                  | set([] if corrupted_lengths is None else np.asarray(corrupted_lengths).tolist()))
    if len(seen) != 1:
        raise PositionError(f"position-aware edges need prompts of one token length (one template); this data has "
                            f"lengths {seen[:10]}{' ...' if len(seen) > 10 else ''}")
    if seen[0] != n_pos:
        raise PositionError(f"the prompts are {seen[0]} tokens long but padded to {n_pos}")
    return int(seen[0])


def position_labels(model, pairs) -> list[str]:
    """A label per position of ``pairs`` (:class:`jaxinterp.data.Pairs`):
    ``{index}:{first prompt's token}`` (indices only when ``model`` has no tokenizer)."""
    if model.tokenizer is None:
        return [str(p) for p in range(pairs.n_pos)]
    return [f"{p}:{model.tokenizer.convert_ids_to_tokens(int(t))}" for p, t in enumerate(pairs.clean[0])]


class PositionalGraph:
    """Scores and circuit membership per position: ``scores [pos, src, dst]`` float32,
    ``in_graph [pos, src, dst]`` bool; entries outside ``spec.real_edge_mask`` are zero.
    ``positions``: a label per position (e.g. the first prompt's tokens)."""

    def __init__(self, spec: GraphSpec, scores: Optional[np.ndarray] = None, n_pos: Optional[int] = None,
                 positions: Optional[Sequence[str]] = None):
        if scores is None and n_pos is None:
            raise ValueError("give scores [pos, src, dst] or n_pos")
        shape = ((n_pos if scores is None else np.shape(scores)[0]), spec.n_forward, spec.n_backward)
        scores = np.zeros(shape, np.float32) if scores is None else np.asarray(scores, np.float32)
        if scores.shape != shape:
            raise ValueError(f"scores have shape {scores.shape}, the graph needs [pos, src, dst] = {shape}")
        self.spec = spec
        self.scores = np.where(spec.real_edge_mask[None], scores, 0).astype(np.float32)
        self.in_graph = np.zeros(shape, bool)
        self.positions = [str(p) for p in positions] if positions is not None else [str(p) for p in range(shape[0])]
        if len(self.positions) != shape[0]:
            raise ValueError(f"{len(self.positions)} position labels for {shape[0]} positions")

    @property
    def n_pos(self) -> int:
        return self.scores.shape[0]

    @property
    def n_edges(self) -> int:
        """Number of (position, edge) entries."""
        return self.n_pos * self.spec.n_edges

    def count_included_edges(self) -> int:
        return int((self.in_graph & self.spec.real_edge_mask[None]).sum())

    def summed(self) -> Graph:
        """The position-free graph: scores summed over positions; an edge is in the circuit
        if it is at any position."""
        g = Graph(self.spec, self.scores.sum(0))
        g.in_graph[:] = self.in_graph.any(0) & self.spec.real_edge_mask
        g.nodes_from_edges()
        return g

    def apply_topn(self, n: int, absolute: bool = True, prune: bool = True) -> "PositionalGraph":
        """Keep the ``n`` highest-scoring (position, edge) entries. ``prune`` is accepted
        for the same call as :meth:`Graph.apply_topn` and does nothing: whether an edge at
        one position dangles depends on attention across positions."""
        if not 0 <= n <= self.n_edges:
            raise ValueError(f"n={n} is outside [0, {self.n_edges}] (position, edge) entries")
        self.in_graph[:] = False
        self.in_graph.reshape(-1)[topn_order(ranked_scores(self.scores, self.spec.real_edge_mask, absolute))[:n]] = True
        return self

    # --- files ----------------------------------------------------------------------------
    def to_json(self, path: str) -> None:
        """Write this graph atomically; non-finite scores are refused (ValueError naming them)."""
        from .graph import check_finite_scores

        check_finite_scores(self.scores, self.spec, path)
        edges = {name: {"scores": self.scores[:, s, d].tolist(), "in_graph": self.in_graph[:, s, d].tolist()}
                 for name, s, d in self.spec.edges}
        atomic_write_text(path, json.dumps({"cfg": self.spec.to_cfg(), "positions": self.positions,
                                            "edges": edges}))

    @classmethod
    def from_json(cls, path: str, spec: Optional[GraphSpec] = None) -> "PositionalGraph":
        """Read :meth:`to_json`'s file; ``spec``: the graph it must be (else ValueError)."""
        from .graph import spec_from_file
        from .io import read_json

        d = read_json(path)  # errors name the file
        if not isinstance(d, dict) or not {"cfg", "edges"} <= set(d):
            raise ValueError(f"{path}: not a circuit graph file (needs 'cfg' and 'edges')")
        if "positions" not in d:
            raise ValueError(f"{path}: not a position-aware graph (no 'positions'); read it with Graph.from_json")
        spec = spec_from_file(d["cfg"], path, spec)
        g = cls(spec, n_pos=len(d["positions"]), positions=d["positions"])
        missing = {name for name, _, _ in spec.edges} - set(d["edges"])
        if missing:
            raise ValueError(f"{path}: {len(missing)} edges missing, e.g. {sorted(missing)[:3]}")
        for name, s, d_ in spec.edges:
            e = d["edges"][name]
            try:
                g.scores[:, s, d_] = np.asarray(e["scores"], dtype=float)
                g.in_graph[:, s, d_] = e["in_graph"]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: edge {name!r} needs {g.n_pos} 'scores' and 'in_graph' values "
                                 f"({type(err).__name__}: {err})") from None
        bad = [name for name, s, d_ in spec.edges if not np.isfinite(g.scores[:, s, d_]).all()]
        if bad:
            raise ValueError(f"{path}: {len(bad)} edges have NaN or infinite scores, e.g. {bad[:3]}")
        return g
