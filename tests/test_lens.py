"""Vocabulary projections against numpy computations from the hand-built forward's node
outputs and the raw parameters, following the formulas in jaxinterp/lens.py's docstring."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import load_model
from jaxinterp.cli import main
from jaxinterp.lens import (direct_logit_attribution, logit_lens, mlp_value_top_tokens, ov_factors, ov_top_pairs,
                            qk_top_pairs, top_pairs)
from devtools.testing import save_random_llama

import handbuilt


@pytest.fixture(scope="module")
def batch(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, model.cfg.vocab_size, size=(3, 9)).astype(np.int32)
    lengths = np.array([9, 6, 4])
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
    return tokens, mask, lengths


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """RMSNorm, no biases, rotary positions, grouped-query attention (4 heads, 2 kv heads)."""
    return load_model(save_random_llama(str(tmp_path_factory.mktemp("llama")), seed=3))


def np_params(model):
    return {k: (np_params_dict(v) if isinstance(v, dict) else np.asarray(v)) for k, v in model.params.items()}


def np_params_dict(d):
    return {k: (np_params_dict(v) if isinstance(v, dict) else np.asarray(v, np.float64)) for k, v in d.items()}


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def test_logit_lens_reads_each_layer_and_ends_at_the_logits(model, batch):
    tokens, mask, _ = batch
    p = np_params(model)
    lens = np.asarray(logit_lens(model.params, model.cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    assert lens.shape == (model.cfg.n_layers + 1,) + tokens.shape + (model.cfg.vocab_size,)
    np.testing.assert_allclose(lens[-1], model(tokens, mask), atol=1e-4, rtol=1e-4)

    logits, outs = handbuilt.forward(model.params, model.cfg, jnp.asarray(tokens), jnp.asarray(mask))
    outs = {k: np.asarray(v, np.float64) for k, v in outs.items()}
    resid = outs["input"] + p["embed"]["w_pos"][:tokens.shape[1]]
    w_u = p["unembed"]["w_u"]
    for layer in range(model.cfg.n_layers + 1):
        read = layer_norm(resid, p["ln_f"]["w"], p["ln_f"]["b"]) @ w_u
        np.testing.assert_allclose(lens[layer], read, atol=2e-4, rtol=1e-4, err_msg=f"layer {layer}")
        if layer < model.cfg.n_layers:
            heads = sum(outs[f"a{layer}.h{h}"] for h in range(model.cfg.n_heads))
            resid = resid + heads + p["blocks"]["attn"]["b_o"][layer] + outs[f"m{layer}"]


def test_direct_logit_attribution_of_every_node_and_the_constants(model, batch):
    tokens, mask, lengths = batch
    p = np_params(model)
    spec = model.graph_spec
    dla = direct_logit_attribution(model.params, model.cfg, tokens, mask)
    _, outs = handbuilt.forward(model.params, model.cfg, jnp.asarray(tokens), jnp.asarray(mask))
    rows = np.arange(len(tokens))
    at = {k: np.asarray(v, np.float64)[rows, lengths - 1] for k, v in outs.items()}   # [batch, d_model]
    constants = p["embed"]["w_pos"][lengths - 1] + p["blocks"]["attn"]["b_o"].sum(0)  # positions, out biases
    final = sum(at.values()) + constants
    centred = lambda x: x - x.mean(-1, keepdims=True)  # noqa: E731
    scale = np.sqrt((centred(final) ** 2).mean(-1, keepdims=True) + model.cfg.norm_eps)
    w, b, w_u = p["ln_f"]["w"], p["ln_f"]["b"], p["unembed"]["w_u"]
    for i, name in enumerate(spec.forward_names):
        expected = (centred(at[name]) / scale * w) @ w_u
        np.testing.assert_allclose(dla.nodes[i], expected, atol=2e-4, rtol=1e-4, err_msg=name)
    rest = (centred(constants) / scale * w + b) @ w_u
    np.testing.assert_allclose(dla.rest, rest, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(dla.nodes.sum(0) + dla.rest, np.asarray(model(tokens, mask))[rows, lengths - 1],
                               atol=2e-4, rtol=1e-4)


def test_direct_logits_sum_to_the_logits_with_rmsnorm_and_no_constants(llama):
    tokens = np.random.default_rng(1).integers(4, llama.cfg.vocab_size, size=(2, 7))
    dla = direct_logit_attribution(llama.params, llama.cfg, tokens)
    np.testing.assert_allclose(dla.nodes.sum(0), np.asarray(llama(tokens))[:, -1], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(dla.rest, 0.0, atol=2e-4)  # no positions, no biases: nothing outside the nodes
    assert np.abs(dla.nodes).max() > 10 * 2e-4


def test_mlp_value_vectors_top_tokens(model):
    p = np_params(model)
    layer, neurons = 1, np.array([0, 5, 17, 100, 255])
    ids, values = mlp_value_top_tokens(model.params, model.cfg, layer, k=4, neurons=neurons, chunk=2)
    v = p["blocks"]["mlp"]["w_out"][layer][neurons]
    scores = ((v - v.mean(-1, keepdims=True)) * p["ln_f"]["w"]) @ p["unembed"]["w_u"]
    expected = np.argsort(-scores, -1)[:, :4]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(values, np.take_along_axis(scores, expected, -1), rtol=1e-4, atol=1e-5)
    assert mlp_value_top_tokens(model.params, model.cfg, 0, k=3)[0].shape == (model.cfg.d_mlp, 3)


def _top_entries(matrix, k):
    flat = np.argsort(-matrix.reshape(-1), kind="stable")[:k]
    return flat // matrix.shape[1], flat % matrix.shape[1], matrix.reshape(-1)[flat]


def test_ov_circuit_pairs(model):
    p = np_params(model)
    layer, head = 1, 2
    blocks = p["blocks"]
    e = p["embed"]["w_e"]
    e_in = (e - e.mean(-1, keepdims=True)) * blocks["ln1"]["w"][layer]
    w_o = blocks["attn"]["w_o"][layer, head]
    out = ((w_o - w_o.mean(-1, keepdims=True)) * p["ln_f"]["w"]) @ p["unembed"]["w_u"]
    matrix = e_in @ blocks["attn"]["w_v"][layer, head] @ out     # [attended token, promoted token]
    rows, cols, values = _top_entries(matrix, 6)
    for pairs in (ov_top_pairs(model.params, model.cfg, layer, head, k=6),
                  top_pairs(*ov_factors(model.params, model.cfg, layer, head), k=6, chunk=7)):
        np.testing.assert_array_equal(pairs.rows, rows)
        np.testing.assert_array_equal(pairs.cols, cols)
        np.testing.assert_allclose(pairs.values, values, rtol=1e-4)


def test_qk_circuit_pairs_under_grouped_query_attention(llama):
    p = np_params(llama)
    layer, head = 1, 3                   # query head 3 reads key/value head 1 (4 heads over 2)
    e = p["embed"]["w_e"] * p["blocks"]["ln1"]["w"][layer]  # RMSNorm's linear part at unit scale
    matrix = (e @ p["blocks"]["attn"]["w_q"][layer, head]) @ (e @ p["blocks"]["attn"]["w_k"][layer, 1]).T
    rows, cols, values = _top_entries(matrix, 5)
    pairs = qk_top_pairs(llama.params, llama.cfg, layer, head, k=5)
    np.testing.assert_array_equal(pairs.rows, rows)
    np.testing.assert_array_equal(pairs.cols, cols)
    np.testing.assert_allclose(pairs.values, values, rtol=1e-4)


def test_bad_input_is_refused(model, batch):
    tokens, mask, _ = batch
    with pytest.raises(ValueError, match="positions"):
        direct_logit_attribution(model.params, model.cfg, tokens, mask, positions=[0, 9, 1])
    with pytest.raises(ValueError, match="layer 2 is outside"):
        ov_top_pairs(model.params, model.cfg, 2, 0)
    with pytest.raises(ValueError, match="head 4 is outside"):
        qk_top_pairs(model.params, model.cfg, 0, 4)
    with pytest.raises(ValueError, match="neurons"):
        mlp_value_top_tokens(model.params, model.cfg, 0, neurons=[model.cfg.d_mlp])


def test_cli_draws_and_prints(gpt2_dir, model, tmp_path, capsys):
    png = str(tmp_path / "lens.png")
    prompt = "When Mary and John went to the store , John gave a drink to"
    assert main(["lens", "--model", gpt2_dir, "--prompt", prompt, "--top-k", "3", "--out", png]) == 0
    assert os.path.getsize(png) > 1000
    text = capsys.readouterr().out
    ids = [model.tokenizer.bos_token_id] + model.tokenizer(prompt)["input_ids"]
    predicted = model.tokenizer.decode([int(np.argmax(model(np.array([ids]))[0, -1]))])
    last_layer = [line for line in text.splitlines() if "after layer 1:" in line][0]
    assert last_layer.split(":", 1)[1].split()[0] == repr(predicted)
    assert "direct logit attribution" in text and ("a1.h" in text or "m1" in text)
