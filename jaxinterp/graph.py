"""The circuit graph: nodes, edges, dense score/mask arrays, pruning and graph files.

Layout and names follow the reference implementation (hannamw/EAP-IG ``eap/graph.py``)
exactly, so that graphs move between the two tools:

* upstream ("forward", ``src``) nodes, in order: ``input``, then for each layer
  ``a{l}.h0 .. a{l}.h{H-1}``, ``m{l}``. ``n_forward = 1 + L * (H + 1)``.
* downstream ("backward", ``dst``) inputs, in order: for each layer
  ``a{l}.h{h}<q>`` for every head, then ``<k>``, then ``<v>``, then ``m{l}``; finally
  ``logits``. ``n_backward = L * (3H + 1) + 1``.
* an edge ``u->v`` (``u->a{l}.h{h}<q>`` for attention inputs) exists when ``u`` comes
  before ``v`` in the residual stream. Scores and masks are dense ``[src, dst]`` arrays
  with a validity mask ``real_edge_mask``.

Grouped-query attention has two views. The default is the reference's
(``ungroup_grouped_query_attention=True``): every query head has its own ``<k>`` and
``<v>`` inputs, each a copy of the residual stream read by its key/value head's weights.
The *grouped* view (``GraphSpec.grouped_kv``; ``load_model(path, grouped_kv=True)``,
CLI ``--grouped-kv``) gives the ``<k>``/``<v>`` inputs to the key/value heads
(``n_kv_inputs`` is then the model's ``n_kv_heads``), which is how the model computes:

* downstream inputs per layer: ``a{l}.h{h}<q>`` for the ``H`` query heads, then
  ``a{l}.kv{g}<k>`` for the ``K`` key/value heads, then ``a{l}.kv{g}<v>``, then
  ``m{l}``: ``n_backward = L * (H + 2K + 1) + 1``. ``a{l}.kv{g}<k>`` feeds query heads
  ``g * H/K .. (g + 1) * H/K - 1`` (all of them own it, for pruning). The ``kv`` names
  never coincide with a query head's, so a file of one view cannot be misread as the
  other; its ``cfg`` block carries ``n_kv_heads`` (absent in the default view).
* upstream nodes are unchanged (heads are per query head in both views).
* the grouped view's score of ``u->a{l}.kv{g}<k>`` is, for the gradient methods, the
  sum of the default view's scores of ``u->a{l}.h{h}<k>`` over the query heads ``h``
  of group ``g``: the shared input's gradient is the sum of its copies' gradients.
  For multi-head attention (``K = H``) both views are the same graph, the reference's.

Files: the reference's JSON (``Graph.to_json``), or its ``.pt`` form (``Graph.to_pt``:
torch tensors in a ``torch.save`` dict, what MIB's run_evaluation.py also reads) through
the optional extra ``pip install jaxinterp[torch]``; torch is imported only to read or
write a ``.pt`` file, and :meth:`Graph.from_json` / :meth:`Graph.to_json` choose the
form by the file name, so every command that reads or writes graphs takes both.

Everything is numpy: the graph is host-side bookkeeping; the compiled forward in
:mod:`jaxinterp.models` only ever sees the dense arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import io as _io
import json
from typing import Iterator, Optional

import numpy as np

from .io import atomic_write_bytes, atomic_write_text, dumps, read_json  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """Index arithmetic of the circuit graph of one model shape and view.

    ``n_kv_inputs``: ``<k>`` inputs (and ``<v>`` inputs) per layer. Left out (None) it
    is ``n_heads``, one per query head: the default view, also the only view of
    multi-head attention; the grouped view of a grouped-query model has one per
    key/value head, its ``n_kv_heads`` (module docstring; :meth:`from_config`). Stored as
    the number, so both spellings of one graph are equal.
    """

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool = False
    d_model: int = 0
    n_kv_inputs: Optional[int] = None

    def __post_init__(self):
        if self.n_kv_inputs is None:
            object.__setattr__(self, "n_kv_inputs", self.n_heads)
        if not (1 <= self.n_kv_inputs <= self.n_heads and self.n_heads % self.n_kv_inputs == 0):
            raise ValueError(f"n_kv_inputs={self.n_kv_inputs} must divide n_heads={self.n_heads}")

    # --- sizes and indices ------------------------------------------------------------
    @property
    def grouped_kv(self) -> bool:
        """Whether ``<k>``/``<v>`` inputs belong to key/value heads (the grouped view of a
        grouped-query model)."""
        return self.n_kv_inputs != self.n_heads

    @property
    def n_attn_inputs(self) -> int:
        """Downstream inputs of one layer's attention: ``H`` q + ``n_kv_inputs`` k and v."""
        return self.n_heads + 2 * self.n_kv_inputs

    def kv_input(self, head: int) -> int:
        """The ``<k>``/``<v>`` input index that query head ``head`` reads (itself when ungrouped)."""
        return head // (self.n_heads // self.n_kv_inputs)

    @property
    def n_forward(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_backward(self) -> int:
        return self.n_layers * (self.n_attn_inputs + 1) + 1

    def head_index(self, layer: int, head: int = 0) -> int:
        """Forward index of ``a{layer}.h{head}``."""
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_index(self, layer: int) -> int:
        """Forward index of ``m{layer}``."""
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def qkv_index(self, layer: int, letter: str, head: int = 0) -> int:
        """Backward index of input ``letter`` of query head ``head`` (``<q>``), or of
        ``<k>``/``<v>`` input ``head`` (a key/value head in the grouped view, else a
        query head): ``a{layer}.h{head}<letter>`` / ``a{layer}.kv{head}<letter>``."""
        n = self.n_heads if letter == "q" else self.n_kv_inputs
        if not 0 <= head < n:
            raise ValueError(f"<{letter}> input {head} is outside 0..{n - 1}")
        offset = {"q": 0, "k": self.n_heads, "v": self.n_heads + self.n_kv_inputs}[letter]
        return layer * (self.n_attn_inputs + 1) + offset + head

    def mlp_in_index(self, layer: int) -> int:
        """Backward index of ``m{layer}``."""
        return layer * (self.n_attn_inputs + 1) + self.n_attn_inputs

    @property
    def logits_index(self) -> int:
        return self.n_backward - 1

    def attn_prev(self, layer: int) -> int:
        """Number of forward nodes that feed layer ``layer``'s attention inputs."""
        return 1 + layer * (self.n_heads + 1)

    def mlp_prev(self, layer: int) -> int:
        """Number of forward nodes that feed ``m{layer}``."""
        return self.attn_prev(layer) + (0 if self.parallel_attn_mlp else self.n_heads)

    # --- names ------------------------------------------------------------------------
    @functools.cached_property
    def forward_names(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    def attn_input_name(self, layer: int, letter: str, head: int) -> str:
        """``a{layer}.h{head}<letter>``, or ``a{layer}.kv{head}<letter>`` for the grouped
        view's ``<k>``/``<v>`` inputs (``head`` as in :meth:`qkv_index`)."""
        kind = "kv" if self.grouped_kv and letter != "q" else "h"
        return f"a{layer}.{kind}{head}<{letter}>"

    @functools.cached_property
    def backward_names(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            for letter in "qkv":
                n = self.n_heads if letter == "q" else self.n_kv_inputs
                names += [self.attn_input_name(layer, letter, h) for h in range(n)]
            names.append(f"m{layer}")
        return names + ["logits"]

    @functools.cached_property
    def backward_prev(self) -> np.ndarray:
        """``[dst]``: how many forward nodes (a prefix) feed each downstream input."""
        prev = np.empty(self.n_backward, dtype=np.int64)
        for layer in range(self.n_layers):
            a = self.qkv_index(layer, "q")
            prev[a:a + self.n_attn_inputs] = self.attn_prev(layer)
            prev[self.mlp_in_index(layer)] = self.mlp_prev(layer)
        prev[-1] = self.n_forward
        return prev

    @functools.cached_property
    def real_edge_mask(self) -> np.ndarray:
        """``[src, dst]`` bool: which entries of the dense arrays are edges."""
        return np.arange(self.n_forward)[:, None] < self.backward_prev[None, :]

    @functools.cached_property
    def forward_to_backward(self) -> np.ndarray:
        """``[src, dst]`` bool: the downstream inputs belonging to each forward node (in
        the grouped view a ``<k>``/``<v>`` input belongs to every query head reading it)."""
        f2b = np.zeros((self.n_forward, self.n_backward), dtype=bool)
        for layer in range(self.n_layers):
            for h in range(self.n_heads):
                f2b[self.head_index(layer, h), self.qkv_index(layer, "q", h)] = True
                for letter in "kv":
                    f2b[self.head_index(layer, h), self.qkv_index(layer, letter, self.kv_input(h))] = True
            f2b[self.mlp_index(layer), self.mlp_in_index(layer)] = True
        return f2b

    @functools.cached_property
    def edges(self) -> list[tuple[str, int, int]]:
        """``(name, src, dst)`` for every edge, in the reference's insertion order (per
        source: each head's q, k, v; grouped view: each key/value head's query heads' q,
        then its k and v, which is the reference's order when every group is one head)."""
        out = []
        stream: list[int] = [0]
        fn, bn = self.forward_names, self.backward_names
        group = self.n_heads // self.n_kv_inputs

        def add(src: int, dst: int):
            out.append((f"{fn[src]}->{bn[dst]}", src, dst))

        for layer in range(self.n_layers):
            heads = [self.head_index(layer, h) for h in range(self.n_heads)]
            for src in stream:
                for g in range(self.n_kv_inputs):
                    for h in range(g * group, (g + 1) * group):
                        add(src, self.qkv_index(layer, "q", h))
                    add(src, self.qkv_index(layer, "k", g))
                    add(src, self.qkv_index(layer, "v", g))
                if self.parallel_attn_mlp:
                    add(src, self.mlp_in_index(layer))
            stream = stream + heads
            if not self.parallel_attn_mlp:
                for src in stream:
                    add(src, self.mlp_in_index(layer))
            stream.append(self.mlp_index(layer))
        for src in stream:
            add(src, self.logits_index)
        return out

    @property
    def n_edges(self) -> int:
        return int(self.real_edge_mask.sum())

    def edge_index(self, name: str) -> tuple[int, int]:
        """``(src, dst)`` of an edge name such as ``a0.h3->m1`` or ``input->a1.h0<q>``."""
        return self._edge_lookup[name]

    @functools.cached_property
    def _edge_lookup(self) -> dict[str, tuple[int, int]]:
        return {name: (s, d) for name, s, d in self.edges}

    @property
    def _edge_columns(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(names, src [edge], dst [edge])``: :attr:`edges` as columns, built with array
        operations and cached per graph shape (a file's graph is a new ``GraphSpec``), so
        that graph files are written and read without one Python step per edge (1.6 M
        edges for Llama-3.1-8B; building :attr:`edges` alone takes seconds there)."""
        return _edge_columns(self)

    def to_cfg(self) -> dict:
        """The ``cfg`` block of the reference's JSON graph files (plus, in the grouped view,
        which the reference does not have, ``n_kv_heads``: the model's key/value heads,
        which are that view's ``n_kv_inputs``)."""
        cfg = {"n_layers": self.n_layers, "n_heads": self.n_heads,
               "parallel_attn_mlp": self.parallel_attn_mlp, "d_model": self.d_model}
        if self.grouped_kv:
            cfg["n_kv_heads"] = self.n_kv_inputs
        return cfg

    def describe(self) -> str:
        """One line for error messages: shape, view and edge count."""
        view = (f"grouped <k>/<v> view, {self.n_kv_inputs} key/value heads" if self.grouped_kv
                else "ungrouped view, <k>/<v> per query head")
        return (f"{self.n_layers} layers x {self.n_heads} heads ({view}"
                f"{', parallel attention + MLP' if self.parallel_attn_mlp else ''}), {self.n_edges} edges")

    def check_same(self, other: "GraphSpec", what: str = "graph") -> None:
        """Raise ValueError unless ``other`` (e.g. a graph file's) is this graph. A
        ``d_model`` of 0 (files that do not record it) matches any."""
        same = ((self.n_layers, self.n_heads, self.parallel_attn_mlp, self.n_kv_inputs)
                == (other.n_layers, other.n_heads, other.parallel_attn_mlp, other.n_kv_inputs)
                and (0 in (self.d_model, other.d_model) or self.d_model == other.d_model))
        if same:
            return
        msg = f"{what} is a graph of {other.describe()}, but the model's graph has {self.describe()}"
        shape = (self.n_layers, self.n_heads, self.parallel_attn_mlp)
        if shape == (other.n_layers, other.n_heads, other.parallel_attn_mlp) and self.grouped_kv != other.grouped_kv:
            flag = "--grouped-kv" if other.grouped_kv else "without --grouped-kv"
            msg += (f"; the {what} was made in the {'grouped' if other.grouped_kv else 'ungrouped'} view: load the "
                    f"model with grouped_kv={other.grouped_kv} (CLI: {flag})")
        raise ValueError(msg)

    @classmethod
    def from_file_cfg(cls, cfg: dict, path: str, expected: Optional["GraphSpec"] = None) -> "GraphSpec":
        """The graph of a graph file's ``cfg`` block (:meth:`to_cfg`); with ``expected``,
        ValueError unless the file is that graph."""
        n_kv = cfg.get("n_kv_heads")
        spec = cls(int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg.get("parallel_attn_mlp", False)),
                   int(cfg.get("d_model") or 0), None if n_kv is None else int(n_kv))
        if expected is not None:
            expected.check_same(spec, f"graph file {path}")
        return spec

    @classmethod
    def from_config(cls, cfg, grouped_kv: bool = False) -> "GraphSpec":
        """The graph of a :class:`jaxinterp.config.ModelConfig` in the default view, or
        with ``grouped_kv`` in the grouped view (``<k>``/``<v>`` inputs per key/value head)."""
        return cls(cfg.n_layers, cfg.n_heads, cfg.parallel_attn_mlp, cfg.d_model,
                   cfg.n_kv_heads if grouped_kv else None)

    @classmethod
    def for_coefficients(cls, cfg, n_backward: int) -> "GraphSpec":
        """The view of ``cfg``'s graph whose downstream axis has ``n_backward`` entries: an
        array laid out over the graph (edge coefficients, masks ``[..., src, dst]``)
        carries its view in its shape. ValueError when neither view has that many."""
        spec = cls.from_config(cfg)
        if n_backward == spec.n_backward:
            return spec
        grouped = cls.from_config(cfg, grouped_kv=True)
        if n_backward != grouped.n_backward:
            raise ValueError(f"{n_backward} downstream inputs: the model's graph has {spec.n_backward} (default "
                             f"view) or {grouped.n_backward} (grouped <k>/<v> view)")
        return grouped


class Graph:
    """Scores and circuit membership over a :class:`GraphSpec`.

    ``scores [src, dst]`` float32, ``in_graph [src, dst]`` bool, ``nodes_in_graph [src]``
    bool, optional ``nodes_scores [src]``, and for neuron-level graphs (MIB's neuron
    level) optional ``neurons_scores [src, d_model]`` (NaN: unscored) and
    ``neurons_in_graph [src, d_model]``. Entries outside ``spec.real_edge_mask`` are
    always zero/False.
    """

    def __init__(self, spec: GraphSpec, scores: Optional[np.ndarray] = None):
        self.spec = spec
        shape = (spec.n_forward, spec.n_backward)
        self.scores = np.zeros(shape, np.float32) if scores is None else np.asarray(scores, np.float32)
        if self.scores.shape != shape:
            raise ValueError(f"scores have shape {self.scores.shape}, the graph needs {shape}")
        self.scores = np.where(spec.real_edge_mask, self.scores, 0).astype(np.float32)
        self.in_graph = np.zeros(shape, bool)
        self.nodes_in_graph = np.zeros(spec.n_forward, bool)
        self.nodes_scores: Optional[np.ndarray] = None
        self.neurons_scores: Optional[np.ndarray] = None
        self.neurons_in_graph: Optional[np.ndarray] = None

    @classmethod
    def from_config(cls, cfg, scores=None, grouped_kv: bool = False) -> "Graph":
        return cls(GraphSpec.from_config(cfg, grouped_kv), scores)

    # --- counting ---------------------------------------------------------------------
    def count_included_edges(self) -> int:
        return int((self.in_graph & self.spec.real_edge_mask).sum())

    def count_included_nodes(self) -> int:
        return int(self.nodes_in_graph.sum())

    def edges_in_graph(self) -> Iterator[str]:
        for name, s, d in self.spec.edges:
            if self.in_graph[s, d]:
                yield name

    # --- selection (mirrors the reference's apply_topn / apply_threshold / apply_greedy)
    def reset(self, empty: bool = True) -> None:
        self.in_graph[:] = False if empty else self.spec.real_edge_mask
        self.nodes_in_graph[:] = not empty

    def _ranked(self, absolute: bool) -> np.ndarray:
        return ranked_scores(self.scores, self.spec.real_edge_mask, absolute)

    def nodes_from_edges(self) -> None:
        """Add to the circuit's nodes every node with an edge out and an edge in (the input
        node needs no edge in) among the circuit's edges."""
        self.nodes_in_graph |= _nodes_with_in_and_out(self.in_graph, self.spec.forward_to_backward)

    def apply_topn(self, n: int, absolute: bool = True, prune: bool = True) -> "Graph":
        """Keep the ``n`` highest-scoring edges (by ``|score|`` when ``absolute``)."""
        if not 0 <= n <= self.spec.n_edges:
            raise ValueError(f"n={n} is outside [0, {self.spec.n_edges}] edges")
        self.reset()
        flat = self.in_graph.reshape(-1)
        flat[topn_order(self._ranked(absolute))[:n]] = True
        self.nodes_from_edges()
        if prune:
            self.prune()
        return self

    def apply_topn_at_least(self, n: int, absolute: bool = True) -> "Graph":
        """The smallest top-m circuit (m >= n) that keeps at least ``n`` edges after pruning
        (or all edges): top-n alone loses its dangling edges, so circuits compared at equal
        size, or asked for by size, are grown this way."""
        for m in range(n, self.spec.n_edges + 1):
            if self.apply_topn(m, absolute=absolute).count_included_edges() >= n:
                break
        return self

    def apply_threshold(self, threshold: float, absolute: bool = True, prune: bool = True) -> "Graph":
        """Keep the edges whose (absolute) score is at least ``threshold``."""
        if not np.isfinite(threshold):
            raise ValueError(f"threshold {threshold} is not a finite number")
        self.reset()
        self.in_graph[:] = self._ranked(absolute) >= float(threshold)
        self.nodes_from_edges()
        if prune:
            self.prune()
        return self

    def apply_greedy(self, n_edges: int, absolute: bool = True, prune: bool = True) -> "Graph":
        """The reference's greedy selection: grow the circuit from the logits upwards.

        Candidate edges are those whose child is in the circuit (at first only the
        logits); taking an edge adds its parent, whose incoming edges become candidates.
        """
        spec = self.spec
        if n_edges > spec.n_edges:
            raise ValueError(f"n_edges={n_edges} exceeds the graph's {spec.n_edges} edges")
        self.reset()
        key = np.abs(self.scores) if absolute else self.scores
        incoming: dict[int, list[tuple[float, int, int]]] = {}
        for order, (_, s, d) in enumerate(spec.edges):
            for node in np.nonzero(spec.forward_to_backward[:, d])[0] if d != spec.logits_index else [-1]:
                incoming.setdefault(int(node), []).append((-float(key[s, d]), order, s, d))
        heap = list(incoming.get(-1, []))
        heapq.heapify(heap)
        while n_edges > 0 and heap:
            _, _, s, d = heapq.heappop(heap)
            if self.in_graph[s, d]:  # a grouped <k>/<v> input's edge is a candidate of each head it feeds
                continue
            n_edges -= 1
            self.in_graph[s, d] = True
            if not self.nodes_in_graph[s]:
                self.nodes_in_graph[s] = True
                for item in incoming.get(s, []):
                    heapq.heappush(heap, item)
        if prune:
            self.prune()
        return self

    def greedy_order(self, n_edges: int, absolute: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(src [pick], dst [pick])``: the first ``n_edges`` edges :meth:`apply_greedy`
        takes, in the order it takes them, computed in one vectorised pass.

        apply_greedy's state after ``n`` picks does not depend on how many it will take
        (its loop only stops earlier), so its circuit of ``n`` edges, before pruning, is the
        first ``n`` picks here, and every circuit size of one ranking needs one pass. Its
        heap pops the candidate edge (child's node in the circuit, or the logits) of highest
        key, ties to the earlier edge of :attr:`GraphSpec.edges`: a total order, the
        *rank*. The picks only change course when one reaches a new node, at most
        ``n_forward`` times: between two such events they are every untaken candidate up
        to the event's rank, in rank order (:func:`_greedy_ranks`). ValueError for NaN
        scores (the heap's order is then undefined) or ``n_edges`` outside the graph."""
        spec = self.spec
        if not 0 <= n_edges <= spec.n_edges:
            raise ValueError(f"n_edges={n_edges} is outside [0, {spec.n_edges}] edges")
        _, src, dst = spec._edge_columns
        key = np.abs(self.scores[src, dst]) if absolute else self.scores[src, dst]
        if np.isnan(key).any():
            raise ValueError(f"{int(np.isnan(key).sum())} edge scores are NaN: the greedy order is undefined")
        # stable: equal keys (-0.0 and 0.0 too, as in the heap's comparisons) keep edge order
        by_rank = np.argsort(-key, kind="stable")  # [rank] -> edge
        rank = np.empty_like(by_rank)
        rank[by_rank] = np.arange(len(by_rank))
        picks = by_rank[_greedy_ranks(spec, src, dst, rank, n_edges)]
        return src[picks], dst[picks]

    def prune(self) -> "Graph":
        """Remove nodes without incoming or outgoing edges, and edges whose parent or child
        is gone, until nothing changes (the reference's ``Graph.prune``)."""
        f2b = self.spec.forward_to_backward
        while True:
            old_nodes, old_edges = self.nodes_in_graph.copy(), self.in_graph.copy()
            self.nodes_in_graph &= _nodes_with_in_and_out(self.in_graph, f2b)
            dst_alive = (self.nodes_in_graph[:, None] & f2b).any(0)
            dst_alive[-1] = True
            self.in_graph &= self.nodes_in_graph[:, None] & dst_alive[None, :]
            if (old_nodes == self.nodes_in_graph).all() and (old_edges == self.in_graph).all():
                return self

    # --- files ------------------------------------------------------------------------
    def to_json(self, path: str) -> None:
        """Write the reference's JSON format (``cfg``, ``nodes``, ``edges``), atomically.
        Strict JSON (an undefined node score is ``null``, never a bare ``NaN``); a graph
        whose edge scores are not all finite is refused (ValueError naming the edges).
        A ``path`` ending in ``.pt`` is written as :meth:`to_pt` writes it."""
        if is_pt(path):
            return self.to_pt(path)
        spec = self.spec
        check_finite_scores(self.scores, spec, path)
        nodes = {}
        for i, name in enumerate(spec.forward_names):
            nodes[name] = {"in_graph": bool(self.nodes_in_graph[i])}
            if self.nodes_scores is not None:
                nodes[name]["score"] = float(self.nodes_scores[i])
        _write_neurons(self, nodes)
        nodes["logits"] = {"in_graph": True}
        if self.nodes_scores is not None:
            nodes["logits"]["score"] = None  # the reference writes NaN: no score
        # The edges block is formatted directly, byte for byte what ``json.dumps`` writes for
        # the dict {name: {"score": float, "in_graph": bool}} (names are plain ASCII, scores
        # finite, checked above, and json writes a float as its repr): dumping 1.6 M small
        # dicts took ~40 s, this takes ~2 s.
        names, src, dst = spec._edge_columns
        scores, members = self.scores[src, dst].tolist(), self.in_graph[src, dst].tolist()
        keys = _json_keys(spec)
        edges = ", ".join([f'{k}: {{"score": {v!r}, "in_graph": {"true" if m else "false"}}}'
                           for k, v, m in zip(keys, scores, members)])
        head = dumps({"cfg": spec.to_cfg(), "nodes": nodes})
        atomic_write_text(path, head[:-1] + ', "edges": {' + edges + "}}")

    @classmethod
    def from_json(cls, path: str, spec: Optional[GraphSpec] = None) -> "Graph":
        """Read a graph written by :meth:`to_json` or by the reference's ``Graph.to_json``
        (bare ``NaN`` tokens and ``null`` both read as "no score" for nodes).
        ``spec``: the graph the file must be (e.g. ``model.graph_spec``); a file of another
        shape or view raises ValueError saying which. Every edge must be present with a
        finite score (ValueError with counts and names otherwise): a missing or NaN score
        would silently count as 0 or never be selected. A ``path`` ending in ``.pt`` is read
        as :meth:`from_pt` reads it."""
        if is_pt(path):
            return cls.from_pt(path, spec)
        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a circuit graph file (a JSON {type(d).__name__}, not an object)")
        missing = {"cfg", "nodes", "edges"} - set(d)
        if missing:
            raise ValueError(f"{path}: not a circuit graph file, missing keys {sorted(missing)}")
        if not all(isinstance(d[k], dict) for k in ("cfg", "nodes", "edges")):
            raise ValueError(f"{path}: not a circuit graph file ('cfg', 'nodes' and 'edges' must be objects)")
        spec = spec_from_file(d["cfg"], path, spec)
        g = cls(spec)
        if not _read_edges_fast(g, d["edges"]):  # irregular: the per-edge checks below say what is wrong
            _read_edges_checked(g, d, path)
        _read_nodes(g, d, path)
        return g


    def to_pt(self, path: str) -> None:
        """Write the reference's ``.pt`` form (its ``Graph.to_pt``), atomically: a
        ``torch.save`` dict of ``cfg``, ``src_nodes`` / ``dst_nodes`` (the names of the rows
        and columns), ``edges_scores [src, dst]`` float32, ``edges_in_graph [src, dst]`` and
        ``nodes_in_graph [src]`` bool, and when present ``nodes_scores [src]`` and
        ``neurons_in_graph`` / ``neurons_scores [src, d_model]`` (NaN: unscored). Needs
        torch (:class:`~jaxinterp.errors.JaxinterpError` naming the file and the extra to
        install otherwise); edge scores must be finite, as for :meth:`to_json`."""
        torch = require_torch(path)
        spec = self.spec
        check_finite_scores(self.scores, spec, path)
        tensor = lambda a, dtype: torch.from_numpy(np.array(a, dtype))  # noqa: E731  (a copy, owned)
        d = {"cfg": spec.to_cfg(), "src_nodes": list(spec.forward_names), "dst_nodes": list(spec.backward_names),
             "edges_scores": tensor(self.scores, np.float32),
             "edges_in_graph": tensor(self.in_graph & spec.real_edge_mask, bool),
             "nodes_in_graph": tensor(self.nodes_in_graph, bool)}
        if self.nodes_scores is not None:
            d["nodes_scores"] = tensor(self.nodes_scores, np.float32)
        if self.neurons_in_graph is not None or self.neurons_scores is not None:
            shape = (self.neurons_in_graph if self.neurons_in_graph is not None else self.neurons_scores).shape
            d["neurons_in_graph"] = tensor(np.zeros(shape, bool) if self.neurons_in_graph is None
                                           else self.neurons_in_graph, bool)
            if self.neurons_scores is not None:
                d["neurons_scores"] = tensor(self.neurons_scores, np.float32)
        buf = _io.BytesIO()
        torch.save(d, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def from_pt(cls, path: str, spec: Optional[GraphSpec] = None) -> "Graph":
        """Read the reference's ``.pt`` form (its ``Graph.to_pt``; see :meth:`to_pt`).
        Its reader assigns the tensors by position, so ``src_nodes`` and ``dst_nodes`` must
        be the graph's names in the graph's order; ``spec`` and the checks on edge scores
        are :meth:`from_json`'s. Needs torch; loads tensors only (``weights_only``: no code
        in the file runs)."""
        torch = require_torch(path)
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # a zip or pickle error: not a torch.save file of tensors
            raise ValueError(f"{path}: not a readable .pt graph file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a .pt circuit graph (a {type(d).__name__}, not a dict)")
        missing = [k for k in _PT_KEYS if k not in d]
        if missing:
            raise ValueError(f"{path}: not a .pt circuit graph, missing keys {missing}")
        if not isinstance(d["cfg"], dict):
            raise ValueError(f"{path}: the graph's 'cfg' is a {type(d['cfg']).__name__}, not a dict")
        spec = spec_from_file(d["cfg"], path, spec)
        for key, names in (("src_nodes", spec.forward_names), ("dst_nodes", spec.backward_names)):
            if list(d[key]) != names:
                raise ValueError(f"{path}: its {key} are not the graph's names in the graph's order "
                                 f"({len(d[key])} names, expected {len(names)} from {names[0]!r})")

        def array(key: str, shape: tuple, dtype) -> np.ndarray:
            t = d[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: {key} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, the graph needs {shape}")
            t = t.detach().cpu()
            return (t.numpy() if t.dtype == torch.bool else t.double().numpy()).astype(dtype)

        shape = (spec.n_forward, spec.n_backward)
        scores = array("edges_scores", shape, np.float64)
        count, names = nonfinite_edges(scores, spec)
        if count:
            raise ValueError(f"{path}: {count} of {spec.n_edges} edges have a score that is NaN or infinite, "
                             f"e.g. {_some(names)}")
        g = cls(spec, scores)
        g.in_graph = array("edges_in_graph", shape, bool) & spec.real_edge_mask
        g.nodes_in_graph = array("nodes_in_graph", (spec.n_forward,), bool)
        if d.get("nodes_scores") is not None:
            g.nodes_scores = array("nodes_scores", (spec.n_forward,), np.float32)
        for key, attr, dtype in (("neurons_in_graph", "neurons_in_graph", bool),
                                 ("neurons_scores", "neurons_scores", np.float32)):
            if d.get(key) is not None:
                width = int(d[key].shape[-1]) if isinstance(d[key], torch.Tensor) and d[key].ndim == 2 else -1
                if spec.d_model and width != spec.d_model:
                    raise ValueError(f"{path}: {key} needs shape {(spec.n_forward, spec.d_model)}")
                setattr(g, attr, array(key, (spec.n_forward, width), dtype))
        return g


#: what the reference's ``Graph.from_pt`` requires
_PT_KEYS = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")
#: how to get torch for ``.pt`` files
TORCH_EXTRA = "pip install jaxinterp[torch]"


def is_pt(path) -> bool:
    """Whether ``path`` names a ``.pt`` graph file (the reference's ``to_pt`` form)."""
    return isinstance(path, str) and path.lower().endswith(".pt")


def require_torch(path: str):
    """The ``torch`` module, imported now (it is an optional extra); JaxinterpError naming
    ``path`` and the extra to install when it is not installed."""
    try:
        import torch
    except ImportError:
        from .errors import JaxinterpError

        raise JaxinterpError(f"{path}: .pt graph files need torch, an optional extra: {TORCH_EXTRA} "
                             f"(or use the JSON form)") from None
    return torch


@functools.lru_cache(maxsize=4)
def _edge_columns(spec: GraphSpec) -> tuple[list[str], np.ndarray, np.ndarray]:
    """:attr:`GraphSpec._edge_columns`: the order of :attr:`GraphSpec.edges` block by
    block. Layer ``l``'s attention inputs are read by the forward nodes ``0 ..
    attn_prev(l) - 1`` (the residual stream so far, in index order), each source's
    destinations in one fixed order (per key/value input: its query heads' ``<q>``, then
    ``<k>``, ``<v>``; plus ``m{l}`` with a parallel MLP); then ``m{l}``'s inputs from
    ``0 .. mlp_prev(l) - 1``; finally the logits' from every forward node."""
    group = spec.n_heads // spec.n_kv_inputs
    src_blocks, dst_blocks = [], []

    def block(n_src: int, dsts: list[int]) -> None:
        src_blocks.append(np.repeat(np.arange(n_src), len(dsts)))
        dst_blocks.append(np.tile(np.asarray(dsts, np.int64), n_src))

    for layer in range(spec.n_layers):
        order = []
        for g in range(spec.n_kv_inputs):
            order += [spec.qkv_index(layer, "q", h) for h in range(g * group, (g + 1) * group)]
            order += [spec.qkv_index(layer, "k", g), spec.qkv_index(layer, "v", g)]
        if spec.parallel_attn_mlp:
            order.append(spec.mlp_in_index(layer))
        block(spec.attn_prev(layer), order)
        if not spec.parallel_attn_mlp:
            block(spec.mlp_prev(layer), [spec.mlp_in_index(layer)])
    block(spec.n_forward, [spec.logits_index])
    src, dst = np.concatenate(src_blocks).astype(np.int64), np.concatenate(dst_blocks)
    fn, bn = [f + "->" for f in spec.forward_names], spec.backward_names
    names = [fn[s] + bn[d] for s, d in zip(src.tolist(), dst.tolist())]
    return names, src, dst


@functools.lru_cache(maxsize=2)
def _json_keys(spec: GraphSpec) -> list[str]:
    """The edge names as JSON strings (cached per graph shape)."""
    return [json.dumps(name) for name in spec._edge_columns[0]]


def _read_edges_fast(g: "Graph", edges: dict) -> bool:
    """Fill ``g``'s scores and membership from a file's ``edges`` object with array
    operations when it is regular (every edge exactly once, each ``{"score": finite
    number, "in_graph": bool}``), and return True; return False, changing nothing, on
    anything else, for :func:`_read_edges_checked` to name."""
    spec = g.spec
    names, src, dst = spec._edge_columns
    if len(edges) != len(names):
        return False
    if list(edges) == names:  # the order both tools write
        s, t = src, dst
    else:
        lookup = spec._edge_lookup
        try:
            at = np.array([lookup[name] for name in edges], np.int64).reshape(-1, 2)
        except KeyError:
            return False
        s, t = at[:, 0], at[:, 1]  # dict keys are unique, so len(edges) known names are all of them
    try:
        infos = list(edges.values())
        scores = [info["score"] for info in infos]
        members = [info.get("in_graph", False) for info in infos]
    except (TypeError, KeyError, AttributeError):
        return False
    if not set(map(type, scores)) <= {float, int} or not set(map(type, members)) <= {bool}:
        return False  # bool is not int here: type() is exact
    values = np.array(scores, np.float64)
    if not np.isfinite(values).all():
        return False
    g.scores[s, t] = values
    g.in_graph[s, t] = np.array(members, bool)
    return True


def _read_edges_checked(g: "Graph", d: dict, path: str) -> None:
    """The edges one by one, with errors that name them (see :meth:`Graph.from_json`)."""
    spec = g.spec
    lookup = spec._edge_lookup
    unknown = [name for name in d["edges"] if name not in lookup]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} edges {_some(unknown)} do not exist in a graph with cfg "
                         f"{d['cfg']}")
    absent = [name for name, _, _ in spec.edges if name not in d["edges"]]
    if absent:
        raise ValueError(f"{path}: {len(absent)} of {spec.n_edges} edges are missing, e.g. {_some(absent)} "
                         f"(a truncated or filtered file? every edge needs a score)")
    no_score, bad, not_finite = [], [], []
    for name, info in d["edges"].items():
        if not isinstance(info, dict) or info.get("score") is None:
            no_score.append(name)
            continue
        score, member = info["score"], info.get("in_graph", False)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not isinstance(member, bool):
            bad.append(name)
        elif not np.isfinite(score):
            not_finite.append(name)
        else:
            s, t = lookup[name]
            g.scores[s, t] = score
            g.in_graph[s, t] = member
    for names, why in ((no_score, "have no score"), (bad, "have a score or in_graph that is not a number "
                                                             "or a boolean"),
                       (not_finite, "have a score that is NaN or infinite")):
        if names:
            raise ValueError(f"{path}: {len(names)} of {spec.n_edges} edges {why}, e.g. {_some(names)}")


def _read_nodes(g: "Graph", d: dict, path: str) -> None:
    """The nodes' membership and scores (a few thousand at most: no fast path needed)."""
    spec = g.spec
    index = {n: i for i, n in enumerate(spec.forward_names)}
    strange = [name for name in d["nodes"] if name != "logits" and name not in index]
    if strange:
        raise ValueError(f"{path}: {len(strange)} nodes {_some(strange)} do not exist in a graph with cfg "
                         f"{d['cfg']}")
    any_scores = False
    node_scores = np.full(spec.n_forward, np.nan, np.float32)
    for name, info in d["nodes"].items():
        if name == "logits":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"{path}: node {name!r} is {info!r}, not an object with 'in_graph'")
        g.nodes_in_graph[index[name]] = bool(info.get("in_graph", False))
        score = info.get("score")
        if isinstance(score, (int, float)) and not isinstance(score, bool) and np.isfinite(score):
            any_scores = True
            node_scores[index[name]] = score
    g.nodes_scores = node_scores if any_scores else None
    _read_neurons(g, d, path)


def _head_of(name: str) -> Optional[int]:
    """The head number of an attention node's name (``a3.h7`` -> 7), else None."""
    return int(name.split(".h")[1]) if name.startswith("a") and ".h" in name else None


def _write_neurons(g: "Graph", nodes: dict) -> None:
    """``neurons`` / ``neurons_scores`` per node as the reference's ``to_json`` writes them:
    for an attention head the whole layer's block ``[n_heads][d_model]`` (its writer indexes
    by the layer's head slice, and its reader assigns the block back to that slice), else
    ``[d_model]``; an unscored neuron (NaN) is ``null``."""
    if g.neurons_scores is None and g.neurons_in_graph is None:
        return
    spec = g.spec
    d_model = (g.neurons_scores if g.neurons_scores is not None else g.neurons_in_graph).shape[1]
    members = np.zeros((spec.n_forward, d_model), bool) if g.neurons_in_graph is None else g.neurons_in_graph
    scores = None if g.neurons_scores is None else np.where(np.isfinite(g.neurons_scores), g.neurons_scores, np.nan)
    for i, name in enumerate(spec.forward_names):
        head = _head_of(name)
        rows = slice(i - head, i - head + spec.n_heads) if head is not None else i
        nodes[name]["neurons"] = members[rows].tolist()
        if scores is not None:
            block = scores[rows].astype(np.float64)
            nodes[name]["neurons_scores"] = np.where(np.isnan(block), None, block).tolist()


def _read_neurons(g: "Graph", d: dict, path: str) -> None:
    """``neurons`` / ``neurons_scores`` of the reference's format (an attention head's
    entry may be its layer's ``[n_heads][d_model]`` block: its own row is taken)."""
    spec = g.spec
    found = {"neurons": {}, "neurons_scores": {}}
    for name, info in d["nodes"].items():
        if name == "logits" or not isinstance(info, dict):
            continue
        for key in found:
            value = info.get(key)
            if value is None:
                continue
            try:  # null (the reference's NaN) reads as NaN: unscored
                arr = np.asarray(value, bool if key == "neurons" else np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: node {name!r} has malformed {key}") from None
            head = _head_of(name)
            if arr.ndim == 2 and head is not None and arr.shape[0] == spec.n_heads:
                arr = arr[head]
            if arr.ndim != 1:
                raise ValueError(f"{path}: node {name!r} has {key} of shape {arr.shape}, expected one value per "
                                 f"output dimension")
            found[key][name] = arr
    index = {n: i for i, n in enumerate(spec.forward_names)}
    for key, attr, dtype, fill in (("neurons", "neurons_in_graph", bool, False),
                                   ("neurons_scores", "neurons_scores", np.float32, np.nan)):
        if not found[key]:
            continue
        widths = {a.shape[0] for a in found[key].values()}
        if len(widths) != 1 or (spec.d_model and widths != {spec.d_model}):
            raise ValueError(f"{path}: the nodes' {key} have lengths {sorted(widths)}, expected d_model "
                             f"{spec.d_model or 'the same for every node'}")
        out = np.full((spec.n_forward, widths.pop()), fill, dtype)
        for name, arr in found[key].items():
            out[index[name]] = arr
        setattr(g, attr, out)


def _some(names, k: int = 3) -> str:
    return ", ".join(map(repr, list(names)[:k])) + (", ..." if len(names) > k else "")


def spec_from_file(cfg: dict, path: str, expected: Optional[GraphSpec]) -> GraphSpec:
    """:meth:`GraphSpec.from_file_cfg`, with a malformed ``cfg`` block named as such."""
    try:
        return GraphSpec.from_file_cfg(cfg, path, expected)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: the graph's 'cfg' block {cfg} is unusable ({type(e).__name__}: {e}); it needs "
                         f"n_layers and n_heads") from None


def nonfinite_edges(scores: np.ndarray, spec: GraphSpec) -> tuple[int, list[str]]:
    """``(how many, names)`` of the real edges whose score is NaN or infinite in
    ``scores [..., src, dst]`` (the count over every leading index)."""
    bad = ~np.isfinite(scores) & spec.real_edge_mask
    if not bad.any():
        return 0, []
    flat = bad.reshape((-1,) + bad.shape[-2:]).any(0)
    return int(bad.sum()), [name for name, s, d in spec.edges if flat[s, d]]


def check_finite_scores(scores: np.ndarray, spec: GraphSpec, path: str) -> None:
    """ValueError naming the edges whose score is NaN or infinite (``scores [..., src, dst]``)."""
    count, names = nonfinite_edges(scores, spec)
    if count:
        raise ValueError(f"not writing {path}: {count} edge scores are NaN or infinite, e.g. {_some(names)}")


def ranked_scores(scores: np.ndarray, real: np.ndarray, absolute: bool) -> np.ndarray:
    """``scores [..., src, dst]`` as ranking keys: ``|score|`` (or the score) on the edges
    ``real [src, dst]``, ``-inf`` elsewhere so that no non-edge is ever chosen."""
    return np.where(real, np.abs(scores) if absolute else scores, -np.inf)


def topn_order(ranked: np.ndarray) -> np.ndarray:
    """Flat indices of ``ranked`` from highest to lowest; ties keep index order (stable)."""
    return np.argsort(-ranked.reshape(-1), kind="stable")


def _greedy_ranks(spec: GraphSpec, src: np.ndarray, dst: np.ndarray, rank: np.ndarray, n_picks: int) -> np.ndarray:
    """``[pick]``: the ranks of the first ``n_picks`` edges the greedy search takes
    (:meth:`Graph.greedy_order`), given each edge's ``src``, ``dst`` and ``rank [edge]``
    (0 = taken first when a candidate).

    Per downstream input, its edges sorted by rank (``keyed``: ``dst * E + rank``, one
    sorted array, so one ``searchsorted`` serves every input) and ``taken``, how many of
    them are in the circuit: always a prefix, as every pick takes all of an active input's
    edges up to one rank. ``best [src]``: each node's lowest-ranked edge into an active
    input, so the next pick that reaches a new node is the lowest ``best`` of a node not
    yet reached; every active edge ranked before it has a reached parent and is taken
    first. Every node reaches the logits directly, so all edges are eventually taken."""
    n_edges, n_fwd, n_bwd = len(rank), spec.n_forward, spec.n_backward
    keyed = np.sort(dst * n_edges + rank)
    first = np.searchsorted(keyed, np.arange(n_bwd) * n_edges)  # [dst] start of each input's edges
    dense = np.full((n_fwd, n_bwd), n_edges, np.int64)  # [src, dst] rank, n_edges off the graph
    dense[src, dst] = rank
    active, reached = np.zeros(n_bwd, bool), np.zeros(n_fwd, bool)
    taken = first.copy()  # [dst] end of the taken prefix of each input's edges
    best = np.full(n_fwd, n_edges, np.int64)
    owned = spec.forward_to_backward
    out, count = [], 0

    def activate(inputs: np.ndarray) -> None:
        inputs = inputs[~active[inputs]]
        active[inputs] = True
        np.minimum(best, dense[:, inputs].min(1, initial=n_edges), out=best)

    activate(np.array([spec.logits_index]))
    while count < n_picks:
        node = int(np.argmin(np.where(reached, n_edges, best)))
        last = reached[node] or best[node] == n_edges  # no node left to reach: take everything active
        limit = n_edges if last else int(best[node]) + 1
        inputs = np.nonzero(active)[0]
        start = taken[inputs]
        stop = np.maximum(np.searchsorted(keyed, inputs * n_edges + limit), start)
        out.append(np.sort(_gather_ranges(keyed, start, stop) % n_edges))
        count += len(out[-1])
        taken[inputs] = stop
        if last:
            break
        reached[node] = True
        activate(np.nonzero(owned[node])[0])
    return np.concatenate(out)[:n_picks] if out else np.zeros(0, np.int64)


def _gather_ranges(values: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``values[start[0]:stop[0]], values[start[1]:stop[1]], ...`` concatenated, without a
    Python step per range."""
    lengths = stop - start
    offsets = np.repeat(start - np.cumsum(lengths) + lengths, lengths)
    return values[offsets + np.arange(int(lengths.sum()))]


def _nodes_with_in_and_out(in_graph: np.ndarray, f2b: np.ndarray) -> np.ndarray:
    has_out = in_graph.any(1)
    has_in = (in_graph.any(0)[None, :] & f2b).any(1)
    has_in[0] = True  # the input node needs no incoming edge
    return has_out & has_in
