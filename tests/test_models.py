"""The graph-structured forward: equals the plain forward, and intervenes edge by edge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.graph import GraphSpec
from jaxinterp.models import Intervention, forward, node_outputs

import handbuilt


@pytest.fixture(scope="module")
def batch(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, model.cfg.vocab_size, size=(3, 9))
    mask = (np.arange(9)[None] < np.array([[9], [6], [4]])).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_plain_forward_equals_the_handbuilt_forward(model, batch):
    ours = forward(model.params, model.cfg, *batch)
    ref, outs = handbuilt.forward(model.params, model.cfg, *batch)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    spec = model.graph_spec
    got = node_outputs(model.params, model.cfg, *batch)
    for i, name in enumerate(spec.forward_names):
        np.testing.assert_allclose(got[:, :, i], outs[name], atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("mode", ["replace", "add", "grad"])
def test_graph_forward_without_intervention_is_the_plain_forward(model, batch, mode):
    spec = model.graph_spec
    plain = forward(model.params, model.cfg, *batch)
    source = jax.random.normal(jax.random.PRNGKey(0), (spec.n_forward, 3, 9, model.cfg.d_model))
    iv = Intervention(jnp.zeros((spec.n_forward, spec.n_backward)), source, mode=mode)
    np.testing.assert_allclose(forward(model.params, model.cfg, *batch, intervention=iv), plain, atol=1e-5)


def _removed(params, cfg, node):
    """Params of a model without ``node``'s output (computed by editing weights)."""
    p = jax.tree.map(lambda a: a, params)
    if node == "input":
        p["embed"] = dict(p["embed"], w_e=jnp.zeros_like(p["embed"]["w_e"]))
    elif node.startswith("a"):
        layer, head = (int(x[1:]) for x in node.split("."))
        attn = dict(p["blocks"]["attn"])
        attn["w_o"] = attn["w_o"].at[layer, head].set(0.0)
        p["blocks"] = dict(p["blocks"], attn=attn)
    else:
        layer = int(node[1:])
        mlp = dict(p["blocks"]["mlp"])
        mlp["w_out"] = mlp["w_out"].at[layer].set(0.0)
        mlp["b_out"] = mlp["b_out"].at[layer].set(0.0)
        p["blocks"] = dict(p["blocks"], mlp=mlp)
    return p


@pytest.mark.parametrize("node", ["input", "a0.h2", "m0", "a1.h1", "m1"])
def test_zeroing_all_edges_of_a_node_removes_that_node(model, batch, node):
    spec = model.graph_spec
    u = spec.forward_names.index(node)
    coef = jnp.zeros((spec.n_forward, spec.n_backward)).at[u].set(1.0)
    source = jnp.zeros((spec.n_forward, 3, 9, model.cfg.d_model))  # zero instead of the node's output
    got = forward(model.params, model.cfg, *batch, intervention=Intervention(coef, source, mode="replace"))
    want = forward(_removed(model.params, model.cfg, node), model.cfg, *batch)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_replacing_one_edge_matches_the_handbuilt_patch(model, batch):
    spec = model.graph_spec
    cfg = model.cfg
    rng = np.random.default_rng(3)
    source = jnp.asarray(rng.normal(size=(spec.n_forward, 3, 9, cfg.d_model)), jnp.float32)
    _, clean = handbuilt.forward(model.params, cfg, *batch)
    for name in ["a0.h1->a1.h3<k>", "input->m1", "m0->logits", "a1.h0->logits"]:
        s, d = spec.edge_index(name)
        coef = jnp.zeros((spec.n_forward, spec.n_backward)).at[s, d].set(1.0)
        got = forward(model.params, cfg, *batch, intervention=Intervention(coef, source, mode="replace"))
        src_name, dst_name = name.split("->")
        want, _ = handbuilt.forward(model.params, cfg, *batch,
                                    extra={dst_name: source[s] - clean[src_name]})
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
