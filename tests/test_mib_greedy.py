"""Greedy circuits in one pass: :meth:`jaxinterp.graph.Graph.greedy_order` and
:func:`jaxinterp.mib.greedy_masks` against :meth:`Graph.apply_greedy`, the reference's
per-size heap search (kept as the specification).

Greedy circuits are nested: apply_greedy's first ``n`` picks do not depend on how many
it goes on to take. So the one-pass order must be, for every ``n``, exactly the edges (and
nodes) of ``apply_greedy(n, prune=False)``, and the pruned masks at MIB's sizes exactly
``apply_greedy(n)``'s. Graphs: sequential multi-head attention, grouped key/value inputs
(an input shared by several heads), parallel attention + MLP; scores random, tied
(both signs, -0.0 among the zeros: ties are broken by edge order) and route-like
(non-negative, mostly tied). The masks at MIB's sizes are compared on a graph of 1,072
edges so that the small sizes are not all empty."""

import numpy as np
import pytest

from jaxinterp import mib
from jaxinterp.evaluation import topn_masks
from jaxinterp.graph import Graph, GraphSpec

SPECS = {"mha": GraphSpec(2, 3), "grouped": GraphSpec(2, 4, n_kv_inputs=2), "parallel": GraphSpec(2, 3, True)}


def _scores(spec: GraphSpec, kind: str, seed: int = 0) -> np.ndarray:
    """``[src, dst]`` scores: ``random`` (no ties), ``tied`` (few values, both signs, many
    zeros of either sign) or ``routes`` (non-negative, mostly zero)."""
    rng = np.random.default_rng(seed)
    shape = (spec.n_forward, spec.n_backward)
    if kind == "random":
        return rng.normal(size=shape)
    values = [-1, -.5, -0.0, 0, 0, 0, .5, 1] if kind == "tied" else [0, 0, 0, 0, .25, .5, 1]
    return rng.choice(values, size=shape)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("kind", ["random", "tied", "routes"])
@pytest.mark.parametrize("view", list(SPECS))
def test_order_is_apply_greedys_picks_for_every_size(view, kind, absolute):
    spec = SPECS[view]
    scores = _scores(spec, kind)
    src, dst = Graph(spec, scores).greedy_order(spec.n_edges, absolute=absolute)
    assert len(src) == spec.n_edges  # every node reaches the logits: all edges are taken in the end
    assert spec.real_edge_mask[src, dst].all()
    assert len(set(zip(src.tolist(), dst.tolist()))) == spec.n_edges  # each edge once
    for n in range(spec.n_edges + 1):
        want = Graph(spec, scores).apply_greedy(n, absolute=absolute, prune=False)
        got = np.zeros_like(want.in_graph)
        got[src[:n], dst[:n]] = True
        np.testing.assert_array_equal(got, want.in_graph, err_msg=f"first {n} picks")
        nodes = np.zeros_like(want.nodes_in_graph)
        nodes[src[:n]] = True
        np.testing.assert_array_equal(nodes, want.nodes_in_graph, err_msg=f"nodes after {n} picks")
    # a shorter order is a prefix of the full one
    short = Graph(spec, scores).greedy_order(spec.n_edges // 3, absolute=absolute)
    np.testing.assert_array_equal(short[0], src[:spec.n_edges // 3])
    np.testing.assert_array_equal(short[1], dst[:spec.n_edges // 3])


@pytest.mark.parametrize("kind", ["random", "tied", "routes"])
def test_one_pass_masks_equal_per_size_greedy_at_mib_sizes(kind):
    spec = GraphSpec(7, 4, n_kv_inputs=2)
    scores = _scores(spec, kind, seed=1)
    sizes = mib.mib_sizes(spec.n_edges)
    assert spec.n_edges == 1072 and sizes[0] == 1 and len(set(sizes)) == len(sizes)
    graph = Graph(spec, scores)
    for absolute in (False, True):
        masks, kept = mib.greedy_masks(graph, sizes, absolute=absolute)
        assert masks.shape == (len(sizes), spec.n_forward, spec.n_backward)
        for n, mask, k in zip(sizes, masks, kept):
            want = Graph(spec, scores).apply_greedy(n, absolute=absolute)
            np.testing.assert_array_equal(mask, want.in_graph, err_msg=f"size {n}, absolute={absolute}")
            assert k == want.count_included_edges()
        topn, _ = topn_masks(graph, sizes, absolute=absolute)
        assert (topn != masks).any()  # greedy is not top-n here, so the comparison can fail
    assert not graph.in_graph.any()  # the scored graph is left as it was


def test_greedy_circuit_is_not_top_n():
    """The best edge feeds a head that never reaches the logits: top-2 keeps it (then prunes
    both edges, neither connects), greedy grows from the logits instead."""
    spec = GraphSpec(2, 2)
    scores = np.zeros((spec.n_forward, spec.n_backward))
    for name, value in [("input->a0.h0<q>", 10.0), ("a1.h0->logits", 5.0), ("input->a1.h0<v>", 3.0)]:
        scores[spec.edge_index(name)] = value
    graph = Graph(spec, scores)
    (greedy,), kept = mib.greedy_masks(graph, [2], absolute=True)
    assert kept == [2]
    assert {name for name, s, d in spec.edges if greedy[s, d]} == {"a1.h0->logits", "input->a1.h0<v>"}
    topn, _ = topn_masks(graph, [2], absolute=True)
    assert not topn[0].any()


def test_refuses_nan_scores_and_sizes_outside_the_graph():
    spec = SPECS["mha"]
    scores = _scores(spec, "random")
    scores[spec.edge_index("m1->logits")] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mib.greedy_masks(Graph(spec, scores), [3], absolute=True)
    graph = Graph(spec, _scores(spec, "random"))
    for bad in (-1, spec.n_edges + 1):
        with pytest.raises(ValueError, match="outside"):
            mib.greedy_masks(graph, [1, bad], absolute=False)
