"""The circuit graph: the reference's node/edge names, order and counts; pruning; JSON."""

import json

import numpy as np
import pytest

from jaxinterp.graph import Graph, GraphSpec

GPT2_SMALL = GraphSpec(n_layers=12, n_heads=12, d_model=768)


def test_gpt2_small_counts_equal_the_reference():
    assert GPT2_SMALL.n_forward == 157
    assert GPT2_SMALL.n_backward == 445
    assert GPT2_SMALL.n_edges == 32491
    assert len(GPT2_SMALL.edges) == 32491
    assert len({name for name, _, _ in GPT2_SMALL.edges}) == 32491


def test_names_and_order():
    s = GPT2_SMALL
    assert s.forward_names[:3] == ["input", "a0.h0", "a0.h1"]
    assert s.forward_names[13] == "m0" and s.forward_names[-1] == "m11"
    assert s.backward_names[:2] == ["a0.h0<q>", "a0.h1<q>"]
    assert s.backward_names[12] == "a0.h0<k>" and s.backward_names[36] == "m0"
    assert s.backward_names[-1] == "logits"
    names = [e[0] for e in s.edges]
    # the reference adds, per layer: every earlier node to each head's q, k, v; then to the MLP
    assert names[:4] == ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "input->a0.h1<q>"]
    assert names[36:38] == ["input->m0", "a0.h0->m0"]
    assert "a0.h3->m0" in names and "a1.h2->a3.h0<v>" in names and "m0->m1" in names
    assert names[-1] == "m11->logits" and names[-157] == "input->logits"
    assert s.edge_index("a0.h3->m0") == (4, 36)
    assert s.edge_index("m11->logits") == (156, 444)


def test_no_edge_points_backwards_or_into_the_same_layer_mlp_of_a_parallel_model():
    s = GraphSpec(3, 2, parallel_attn_mlp=True)
    names = {e[0] for e in s.edges}
    assert "a0.h0->m0" not in names and "a0.h0->m1" in names and "m1->a1.h0<q>" not in names
    for _, src, dst in s.edges:
        assert src < s.backward_prev[dst]


def test_topn_selects_the_largest_absolute_scores():
    s = GraphSpec(2, 2)
    rng = np.random.default_rng(0)
    g = Graph(s, rng.normal(size=(s.n_forward, s.n_backward)))
    g.apply_topn(5, prune=False)
    chosen = np.sort(np.abs(g.scores[g.in_graph]))
    assert g.count_included_edges() == 5
    assert chosen.min() >= np.sort(np.abs(g.scores[s.real_edge_mask]))[-5]
    g.apply_topn(5, absolute=False, prune=False)
    assert g.scores[g.in_graph].min() >= np.sort(g.scores[s.real_edge_mask])[-5]


def test_prune_removes_dangling_edges_and_nodes():
    s = GraphSpec(2, 1)
    g = Graph(s)
    # input->a0.h0<q> alone: a0.h0 has no outgoing edge, so both go
    g.in_graph[s.edge_index("input->a0.h0<q>")] = True
    g.nodes_in_graph[:] = True
    g.prune()
    assert g.count_included_edges() == 0 and not g.nodes_in_graph.any()
    # input->m0->logits is a connected path and stays
    for e in ["input->m0", "m0->logits"]:
        g.in_graph[s.edge_index(e)] = True
    g.nodes_in_graph[:] = True
    g.prune()
    assert sorted(g.edges_in_graph()) == ["input->m0", "m0->logits"]
    assert g.nodes_in_graph[[0, s.mlp_index(0)]].all() and g.nodes_in_graph.sum() == 2


def test_greedy_grows_from_the_logits():
    s = GraphSpec(2, 2)
    g = Graph(s)
    g.scores[s.edge_index("a1.h0->logits")] = 5.0
    g.scores[s.edge_index("input->a0.h0<q>")] = 10.0  # large, but a0.h0 never joins the circuit
    g.scores[s.edge_index("input->a1.h0<v>")] = 3.0
    g.apply_greedy(2, prune=False)
    assert sorted(g.edges_in_graph()) == ["a1.h0->logits", "input->a1.h0<v>"]


def test_json_round_trip_is_identical(tmp_path):
    s = GraphSpec(2, 3, d_model=16)
    g = Graph(s, np.random.default_rng(1).normal(size=(s.n_forward, s.n_backward)))
    g.apply_topn(20)
    g.nodes_scores = g.scores.sum(1)
    g.to_json(tmp_path / "g.json")
    h = Graph.from_json(tmp_path / "g.json")
    assert h.spec == s
    np.testing.assert_array_equal(h.scores, g.scores)
    np.testing.assert_array_equal(h.in_graph, g.in_graph)
    np.testing.assert_array_equal(h.nodes_in_graph, g.nodes_in_graph)
    np.testing.assert_allclose(h.nodes_scores, g.nodes_scores, rtol=1e-6)
    d = json.load(open(tmp_path / "g.json"))
    assert set(d) == {"cfg", "nodes", "edges"} and list(d["edges"]) == [e[0] for e in s.edges]
    assert d["cfg"] == {"n_layers": 2, "n_heads": 3, "parallel_attn_mlp": False, "d_model": 16}


def test_bad_json_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"cfg": {"n_layers": 1, "n_heads": 1}, "nodes": {},
                                                  "edges": {"input->a5.h0<q>": {"score": 1, "in_graph": True}}}))
    with pytest.raises(ValueError, match="do not exist"):
        Graph.from_json(tmp_path / "x.json")


# --- the grouped-query view ---------------------------------------------------------------

def _count_edges(n_layers, n_heads, attn_inputs):
    """Edges by counting what feeds each input: attention inputs see the input and all
    earlier layers' nodes, the MLP also its own layer's heads, the logits everything."""
    total = 0
    for layer in range(n_layers):
        before = 1 + layer * (n_heads + 1)
        total += attn_inputs * before + before + n_heads
    return total + 1 + n_layers * (n_heads + 1)


def test_grouped_view_names_counts_and_owners():
    s = GraphSpec(3, 4, d_model=16, n_kv_inputs=2)
    assert s.grouped_kv and s.n_kv_inputs == 2 and s.n_attn_inputs == 4 + 2 * 2
    assert s.n_backward == 3 * (4 + 2 * 2 + 1) + 1 and s.n_forward == GraphSpec(3, 4).n_forward
    assert s.n_edges == len(s.edges) == len({e[0] for e in s.edges}) == _count_edges(3, 4, 8)
    assert GraphSpec(3, 4).n_edges == _count_edges(3, 4, 12)
    assert s.backward_names[:9] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.kv0<k>", "a0.kv1<k>",
                                    "a0.kv0<v>", "a0.kv1<v>", "m0"]
    assert [e[0] for e in s.edges[:8]] == ["input->a0.h0<q>", "input->a0.h1<q>", "input->a0.kv0<k>",
                                           "input->a0.kv0<v>", "input->a0.h2<q>", "input->a0.h3<q>",
                                           "input->a0.kv1<k>", "input->a0.kv1<v>"]
    assert s.edge_index("a0.h3->a2.kv1<v>") == (4, s.qkv_index(2, "v", 1))
    for _, src, dst in s.edges:
        assert src < s.backward_prev[dst]
    # a shared k/v input belongs to every query head that reads it
    owners = [s.forward_names[i] for i in np.nonzero(s.forward_to_backward[:, s.qkv_index(1, "k", 1)])[0]]
    assert owners == ["a1.h2", "a1.h3"]
    assert s.forward_to_backward[s.head_index(1, 2)].sum() == 3
    with pytest.raises(ValueError, match="outside 0..1"):
        s.qkv_index(0, "k", 2)
    with pytest.raises(ValueError, match="must divide"):
        GraphSpec(2, 4, n_kv_inputs=3)
    assert GraphSpec(2, 4, n_kv_inputs=4) == GraphSpec(2, 4)  # multi-head attention: one view


def test_grouped_json_round_trip_and_view_mismatch(tmp_path):
    s = GraphSpec(2, 4, d_model=16, n_kv_inputs=1)
    g = Graph(s, np.random.default_rng(2).normal(size=(s.n_forward, s.n_backward)))
    g.apply_topn(15)
    g.to_json(tmp_path / "g.json")
    d = json.load(open(tmp_path / "g.json"))
    assert d["cfg"]["n_kv_heads"] == 1 and list(d["edges"]) == [e[0] for e in s.edges]
    h = Graph.from_json(tmp_path / "g.json", spec=s)
    assert h.spec == s
    np.testing.assert_array_equal(h.scores, g.scores)
    np.testing.assert_array_equal(h.in_graph, g.in_graph)
    flat = GraphSpec(2, 4, d_model=16)
    with pytest.raises(ValueError, match=r"grouped <k>/<v> view.*edges, but the model's graph has .*ungrouped view"):
        Graph.from_json(tmp_path / "g.json", spec=flat)
    with pytest.raises(ValueError, match="8 heads"):
        Graph.from_json(tmp_path / "g.json", spec=GraphSpec(2, 8, n_kv_inputs=1))
    # the reference's files (no n_kv_heads, no d_model) are the ungrouped view
    edges = {name: {"score": 2.0 if name == "input->a1.h3<k>" else 0.0, "in_graph": True} for name, _, _ in flat.edges}
    (tmp_path / "ref.json").write_text(json.dumps({"cfg": {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False},
                                                   "nodes": {}, "edges": edges}))
    r = Graph.from_json(tmp_path / "ref.json", spec=flat)
    assert not r.spec.grouped_kv and r.scores[flat.edge_index("input->a1.h3<k>")] == 2.0
    with pytest.raises(ValueError, match="grouped_kv=False"):
        Graph.from_json(tmp_path / "ref.json", spec=s)


def test_grouped_greedy_and_prune_count_shared_inputs_once():
    s = GraphSpec(2, 4, n_kv_inputs=2)
    g = Graph(s, np.random.default_rng(3).normal(size=(s.n_forward, s.n_backward)))
    for n in [1, 10, 40, s.n_edges]:
        g.apply_greedy(n, prune=False)
        assert g.count_included_edges() == n
    # a shared input stays while one of its query heads is in the circuit
    g = Graph(s)
    for e in ["input->a0.kv1<k>", "input->a0.h3<q>", "a0.h3->logits"]:
        g.in_graph[s.edge_index(e)] = True
    g.nodes_in_graph[:] = True
    g.prune()
    assert sorted(g.edges_in_graph()) == ["a0.h3->logits", "input->a0.h3<q>", "input->a0.kv1<k>"]


def test_topn_at_least_grows_until_n_edges_survive_pruning():
    spec = GraphSpec(2, 2, False, 8)
    scores = np.zeros(spec.real_edge_mask.shape, np.float32)
    # the two best edges dangle (a1.h0 has no input edge), the third connects it to the input
    for rank, name in enumerate(["a1.h0->logits", "m0->logits", "input->a1.h0<v>", "input->m0"]):
        scores[spec.edge_index(name)] = 10.0 - rank
    g = Graph(spec, scores)
    assert g.apply_topn(2).count_included_edges() < 2
    g.apply_topn_at_least(2)
    assert set(g.edges_in_graph()) == {"a1.h0->logits", "input->a1.h0<v>"}
