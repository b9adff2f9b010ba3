"""Information-flow routes (``attribute(method="information-flow-routes")``) against the
reference's own scores and greedy circuit on the demo model (tests/golden/ifr/, made by
tests/golden/make_golden_ifr.py in the reference's venv; a grouped-query RMSNorm model's
are in tests/test_gemma2_heads.py) and against the formula computed by hand, token by
token, on the hand-built GPT-2 forward (tests/handbuilt.py)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import load_model
from jaxinterp.attribution import attribute
from jaxinterp.config import ModelConfig
from jaxinterp.graph import Graph
from jaxinterp.interventions import prepare_data
from jaxinterp.routes import downstream_streams, input_groups

import handbuilt

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(GOLDEN, "ifr", "ifr.json")) as _f:
    INFO = json.load(_f)
SCORE_TOL = 1e-5  # of the largest |score|
METHOD = "information-flow-routes"


def _reference(path, spec):
    """``(scores [src, dst], in_graph [src, dst])`` of a reference graph file, read edge by
    edge by name."""
    with open(os.path.join(GOLDEN, path)) as f:
        edges = json.load(f)["edges"]
    assert sorted(edges) == sorted(name for name, _, _ in spec.edges)
    scores = np.zeros((spec.n_forward, spec.n_backward))
    in_graph = np.zeros(scores.shape, bool)
    for name, e in edges.items():
        s, d = spec.edge_index(name)
        scores[s, d], in_graph[s, d] = e["score"], e["in_graph"]
    return scores, in_graph


def _input_share_by_hand(model, pairs):
    """``input -> a0.*`` edges: the input is layer 0's only upstream node, so its importance
    at a token is 1 where ``|x|_1 > |x - emb|_1`` (x = emb + position embedding, or emb
    without learned positions) and 0 elsewhere; the score is the mean over prompts of the
    fraction of their tokens where it holds. From the embedding tables, token by token."""
    w_e = np.asarray(model.params["embed"]["w_e"], np.float64) * model.cfg.embed_scale
    w_pos = model.params["embed"].get("w_pos")
    fractions = []
    for ids, n in zip(pairs.clean, pairs.lengths):
        hits = 0
        for p in range(n):
            emb = w_e[ids[p]]
            x = emb + (0 if w_pos is None else np.asarray(w_pos[p], np.float64))
            hits += np.abs(x).sum() > np.abs(x - emb).sum()
        fractions.append(hits / n)
    return float(np.mean(fractions))


@pytest.mark.parametrize("checkpoint", sorted(INFO["checkpoints"]))
def test_scores_and_greedy_circuit_equal_the_reference(checkpoint):
    entry = INFO["checkpoints"][checkpoint]
    model = load_model(os.path.join(ROOT, entry["model"]))
    spec = model.graph_spec
    pairs, _ = prepare_data(model, os.path.join(ROOT, INFO["data"]), "logit_diff")
    got = attribute(model, pairs, method=METHOD, batch_size=entry["batch_size"], quiet=True).scores
    want, _ = _reference(entry["graph"], spec)
    real = spec.real_edge_mask
    nan = np.isnan(want) & real
    assert nan.sum() == entry["nan_scores"]
    # The reference's NaN: 0/0 at tokens where no upstream node is close (its padding
    # tokens of a model whose pad embedding is zero, or a position embedding that outweighs
    # the token's); it only happens into layer 0's attention, whose one upstream node is
    # the input. jaxinterp counts those tokens as 0; the expected value is computed by hand.
    assert all(s == 0 and d < spec.n_attn_inputs for s, d in zip(*np.nonzero(nan)))
    if nan.any():
        share = _input_share_by_hand(model, pairs)
        np.testing.assert_allclose(got[nan], share, rtol=0, atol=1e-6)
        assert abs(entry["nan_replaced_by"] - share) <= 1e-6  # the golden script's own count, in torch
    finite = real & ~nan
    scale = np.abs(want[finite]).max()
    assert scale > 0.1
    diff = np.abs(got - want)[finite].max() / scale
    assert diff <= SCORE_TOL, f"max |diff| = {diff:.2e} of max |score|"
    # MIB selects these circuits greedily from the logits up (its run_evaluation.py); the
    # reference's greedy circuit was taken with its NaNs replaced (make_golden_ifr.py)
    _, want_greedy = _reference(entry["greedy"], spec)
    ours = Graph(spec, got).apply_greedy(entry["greedy_n"])
    assert ours.count_included_edges() == entry["circuit_edges"] > 5
    np.testing.assert_array_equal(ours.in_graph, want_greedy)


@pytest.fixture(scope="module")
def pairs(model, ioi_csv):
    return prepare_data(model, ioi_csv, "logit_diff")[0]


def test_two_layers_equal_the_formula_by_hand(model, pairs):
    """conftest's random 2-layer GPT-2 on ragged IOI prompts. Node outputs from the
    hand-built forward; each downstream input's residual stream assembled from them
    (embeddings + positions, + each layer's heads + b_o for its MLP, + its MLP for the next
    layer and the logits); proximity, its normalisation and the means over tokens and
    prompts in plain loops."""
    spec, p, cfg = model.graph_spec, model.params, model.cfg
    _, outs = handbuilt.forward(p, cfg, jnp.asarray(pairs.clean), jnp.asarray(pairs.attention_mask))
    names = spec.forward_names
    outs = np.stack([np.asarray(outs[n], np.float64) for n in names])  # [src, batch, pos, d_model]
    x = outs[0] + np.asarray(p["embed"]["w_pos"][:pairs.clean.shape[1]], np.float64)[None]
    streams = []  # (dst columns, stream, number of upstream nodes)
    for layer in range(cfg.n_layers):
        h0 = spec.head_index(layer)
        streams.append(([spec.qkv_index(layer, c, h) for c in "qkv" for h in range(cfg.n_heads)], x, h0))
        x = x + outs[h0:h0 + cfg.n_heads].sum(0) + np.asarray(p["blocks"]["attn"]["b_o"][layer], np.float64)
        streams.append(([spec.mlp_in_index(layer)], x, h0 + cfg.n_heads))
        x = x + outs[spec.mlp_index(layer)]
    streams.append(([spec.logits_index], x, spec.n_forward))
    want = np.zeros((spec.n_forward, spec.n_backward))
    for dsts, x, n_up in streams:
        for b, length in enumerate(pairs.lengths):
            for pos in range(length):
                prox = np.maximum(0.0, np.abs(x[b, pos]).sum() - np.abs(x[b, pos] - outs[:n_up, b, pos]).sum(-1))
                want[:n_up, dsts] += (prox / prox.sum() / length / len(pairs))[:, None]
    got = attribute(model, pairs, method=METHOD, batch_size=5, quiet=True).scores
    # several routes into the logits and into layer 1 matter
    assert (want[:, spec.logits_index] > 0.02).sum() >= 4 and (want[:, spec.mlp_in_index(1)] > 0.02).sum() >= 4
    np.testing.assert_allclose(got, want, rtol=0, atol=SCORE_TOL * np.abs(want).max())


def test_which_stream_each_input_reads():
    """Layer l's q/k/v inputs read the stream entering it; its MLP that stream plus the
    layer's attention output (resid[l + 1] - mlp_out[l]), or, with attention and MLP in
    parallel, the stream entering it; the logits the stream entering the final norm."""
    resid = np.arange(3 * 2 * 1 * 1, dtype=np.float32).reshape(3, 2, 1, 1) ** 2  # [layer + 1, batch, pos, d]
    mlp_out = np.full((2, 2, 1, 1), 0.5, np.float32)
    seq = np.asarray(downstream_streams(jnp.asarray(resid), jnp.asarray(mlp_out), False))
    par = np.asarray(downstream_streams(jnp.asarray(resid), jnp.asarray(mlp_out), True))
    np.testing.assert_array_equal(seq, [resid[0], resid[1] - 0.5, resid[1], resid[2] - 0.5, resid[2]])
    np.testing.assert_array_equal(par, [resid[0], resid[0], resid[1], resid[1], resid[2]])
    spec = Graph.from_config(ModelConfig(n_layers=2, n_heads=2, d_model=4, d_head=2, d_mlp=4, vocab_size=5, n_ctx=4,
                                         parallel_attn_mlp=True)).spec
    group, prev = input_groups(spec)
    assert group[spec.qkv_index(1, "v", 1)] == 2 and group[spec.mlp_in_index(1)] == 3 and group[-1] == 4
    assert prev.tolist() == [1, 1, 4, 4, 7]  # parallel: an MLP does not read its own layer's heads


@pytest.mark.parametrize("option", [dict(intervention="zero"), dict(positional=True), dict(remat=True),
                                    dict(max_memory="1GB")])
def test_options_it_does_not_read_are_refused(model, pairs, option):
    with pytest.raises(ValueError, match=f"{list(option)[0]} is not offered"):
        attribute(model, pairs, method=METHOD, quiet=True, **option)
