"""The graph-structured forward: equals the plain forward, and intervenes edge by edge."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.compiler import jit
from jaxinterp.models import EdgeIntervention, forward, node_outputs, residual_stream

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


@pytest.mark.parametrize("mode", ["replace", "add", "grad", "grad-replace"])
def test_graph_forward_without_intervention_is_the_plain_forward(model, batch, mode):
    spec = model.graph_spec
    plain = forward(model.params, model.cfg, *batch)
    source = jax.random.normal(jax.random.PRNGKey(0), (spec.n_forward, 3, 9, model.cfg.d_model))
    iv = EdgeIntervention(jnp.zeros((spec.n_forward, spec.n_backward)), source, mode=mode)
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
    got = forward(model.params, model.cfg, *batch, intervention=EdgeIntervention(coef, source, mode="replace"))
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
        got = forward(model.params, cfg, *batch, intervention=EdgeIntervention(coef, source, mode="replace"))
        src_name, dst_name = name.split("->")
        want, _ = handbuilt.forward(model.params, cfg, *batch,
                                    extra={dst_name: source[s] - clean[src_name]})
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)


def test_add_one_is_add_with_a_single_source_row(model, batch):
    spec, cfg = model.graph_spec, model.cfg
    source = jax.random.normal(jax.random.PRNGKey(1), (spec.n_forward, 3, 9, cfg.d_model))
    for name in ["input->a1.h2<q>", "a0.h3->m0", "m1->logits"]:
        s, d = spec.edge_index(name)
        coef = jnp.zeros((spec.n_forward, spec.n_backward)).at[s, d].set(0.7)
        want = forward(model.params, cfg, *batch, intervention=EdgeIntervention(coef, source, mode="add"))
        one = EdgeIntervention(0.7 * jax.nn.one_hot(d, spec.n_backward)[None], source[s][None], mode="add-one")
        np.testing.assert_allclose(forward(model.params, cfg, *batch, intervention=one), want, atol=1e-5, err_msg=name)


def test_grad_replace_gradient_is_the_grad_of_replace(model, batch):
    """The linearised probe's gradient equals autodiff through the real ``replace`` sum."""
    spec, cfg = model.graph_spec, model.cfg
    source = jax.random.normal(jax.random.PRNGKey(2), (spec.n_forward, 3, 9, cfg.d_model))
    zeros = jnp.zeros((spec.n_forward, spec.n_backward))

    def total(coef, mode):
        return forward(model.params, cfg, *batch, intervention=EdgeIntervention(coef, source, mode=mode))[:, -1, :5].sum()

    want = jax.grad(lambda c: total(c, "replace"))(zeros)
    got = jax.grad(lambda c: total(c, "grad-replace"))(zeros)
    real = spec.real_edge_mask
    scale = np.abs(np.where(real, want, 0)).max()
    assert scale > 0.1  # effects that are not tiny
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=0, atol=5e-6 * scale)


def test_logits_at_chosen_positions_are_those_of_the_full_run(model, batch):
    full = forward(model.params, model.cfg, *batch)
    at = jnp.array([8, 5, 3])
    got = forward(model.params, model.cfg, *batch, logit_positions=at)
    assert got.shape == (3, 1, model.cfg.vocab_size)
    np.testing.assert_allclose(got[:, 0], full[jnp.arange(3), at], atol=1e-5)


def test_residual_stream_starts_at_the_embeddings_and_ends_at_the_logits(model, batch):
    logits, resid = residual_stream(model.params, model.cfg, *batch)
    assert resid.shape == (model.cfg.n_layers + 1, 3, 9, model.cfg.d_model)
    p = model.params
    np.testing.assert_allclose(resid[0], p["embed"]["w_e"][batch[0]] + p["embed"]["w_pos"][:9], atol=1e-6)
    ln = p["ln_f"]
    x = resid[-1]
    x = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + model.cfg.norm_eps)
    np.testing.assert_allclose((x * ln["w"] + ln["b"]) @ p["unembed"]["w_u"], logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["grad", "grad-replace"])
def test_compiled_edge_gradients_at_a_realistic_batch_are_autodiff_through_the_sum(model, mode):
    """Compiled as jaxinterp compiles (:func:`jaxinterp.compiler.jit`), at 32 x 15 tokens
    (where the probe's vjp, mapped over its inputs, is wrong under a plain ``jax.jit`` on
    CPU while eager mode and small batches are right: XLA's YNNPACK reduce fusion), the
    linearised probe equals autodiff through the real sum (*) of the ``add`` mode."""
    spec, cfg = model.graph_spec, model.cfg
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, size=(32, 15)))
    mask = jnp.ones((32, 15), jnp.int32)
    _, outs = forward(model.params, cfg, tokens, mask, return_node_outputs=True)
    delta = jax.random.normal(jax.random.PRNGKey(3), outs.shape) * 0.1
    zeros = jnp.zeros((spec.n_forward, spec.n_backward))

    def total(coef, m, source):
        logits = forward(model.params, cfg, tokens, mask, intervention=EdgeIntervention(coef, source, mode=m))
        return (logits[:, -1, :7] ** 2).sum()

    want = jit(jax.grad(lambda c: total(c, "add", delta)))(zeros)
    source = delta if mode == "grad" else outs + delta  # grad-replace: source - own outputs = delta
    got = jit(jax.grad(lambda c: total(c, mode, source)))(zeros)
    real = spec.real_edge_mask
    scale = np.abs(np.where(real, want, 0)).max()
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-4 * scale, rtol=0)


def _edge_contractions(jaxpr, size: int) -> int:
    """How many ``dot_general`` equations in ``jaxpr`` and the jaxprs inside it (loop
    bodies, branches, each counted once) contract ``size`` elements."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            n += int(np.prod([eqn.invars[0].aval.shape[i] for i in contracted])) == size
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    n += _edge_contractions(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub, size)
    return n


@pytest.mark.parametrize("scan", [False, True])
def test_each_layer_contracts_delta_once_for_all_its_inputs(qwen, scan):
    """The gradient modes' backward reads delta ``[src, batch, pos, d_model]`` in one
    product per layer (per piece of delta, scanned in segments) for all the layer's inputs:
    its MLP input's gradient joins the attention inputs' (its own matrix-vector product
    read delta a second time per layer), plus the logits' one. 3 layers: unrolled 3 + 1
    products (7 before); scanned in segments of layers 0-1 and 2, one loop body whose
    branches contract 1 and 2 pieces, + 1 (7 before)."""
    import jaxinterp.models as models

    spec, cfg = qwen.graph_spec, qwen.cfg
    tokens, mask = jnp.ones((3, 7), jnp.int32), jnp.ones((3, 7), jnp.int32)
    source = jnp.zeros((spec.n_forward, 3, 7, cfg.d_model))
    f = lambda c: forward(qwen.params, cfg, tokens, mask, EdgeIntervention(c, source, mode="grad"),  # noqa: E731
                          scan=scan).sum()
    jaxpr = jax.make_jaxpr(jax.grad(f))(jnp.zeros((spec.n_forward, spec.n_backward))).jaxpr
    assert models.SCAN_SEGMENTS == 2 and cfg.n_layers == 3
    assert _edge_contractions(jaxpr, 3 * 7 * cfg.d_model) == (1 + 2 if scan else 3) + 1


# --- the scanned layer loop: the same numbers as the unrolled one ----------------------

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """3 layers, GQA 4/2, q/k/v biases, a sliding window in layers 1-2 (the scan carries
    per-layer windows as data)."""
    from jaxinterp import load_model
    from devtools.testing import save_random_qwen2

    path = save_random_qwen2(str(tmp_path_factory.mktemp("qwen")), num_hidden_layers=3, max_window_layers=1)
    return load_model(path)


def _intervention(spec, cfg, mode, n_pos, seed=0, positional=False, shifted=False):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    source = jax.random.normal(k[0], (spec.n_forward, 3, n_pos, cfg.d_model))
    shape = ((n_pos,) if positional else ()) + (spec.n_forward, spec.n_backward)
    coef = jax.random.uniform(k[1], shape) if mode in ("replace", "add") else jnp.zeros(shape)
    if not shifted:
        return EdgeIntervention(coef, source, mode=mode)
    shift = jax.random.uniform(k[2], (spec.n_forward,))
    detach = (jax.random.uniform(k[3], (spec.n_forward,)) > 0.5).astype(jnp.float32)
    # restored outputs (causal tracing): some nodes at some positions, partly or wholly
    restore = jax.random.uniform(k[4], (spec.n_forward, n_pos)) * (jax.random.uniform(k[4], (spec.n_forward, 1)) > 0.5)
    return EdgeIntervention(coef, source, shift, detach, restore, mode=mode)


@pytest.mark.parametrize("mode,positional,shifted", [
    ("replace", False, False), ("replace", True, False), ("add", False, True), ("grad", False, True),
    ("grad-replace", False, False), ("grad-replace", True, False)])
def test_scanned_layers_equal_unrolled_layers(qwen, mode, positional, shifted):
    """Logits, node outputs, residual streams and the gradient w.r.t. every coefficient
    (real edges: the scan masks the rest) agree between the two layer loops, the scan
    with and without rematerialisation."""
    spec, cfg = qwen.graph_spec, qwen.cfg
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, size=(3, 7)))
    mask = jnp.asarray((np.arange(7)[None] < np.array([[7], [5], [3]])).astype(np.int32))
    iv = _intervention(spec, cfg, mode, 7, positional=positional, shifted=shifted)

    def run(coef, scan, remat):
        logits, outs = forward(qwen.params, cfg, tokens, mask, dataclasses.replace(iv, coef=coef),
                               return_node_outputs=True, scan=scan, remat=remat)
        return (logits[:, -1, :9] ** 2).sum(), (logits, outs)

    # jitted, as every method runs it (eagerly, each of the loop's ~400 primitives compiled alone);
    # the scan with and without remat against the unrolled loop without (unrolled remat:
    # test_attribution.py::test_remat_gives_the_same_scores)
    value_and_grad = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=(1, 2))
    (_, (want_logits, want_outs)), want_g = value_and_grad(iv.coef, False, False)
    real = spec.real_edge_mask
    want_g = np.where(real, want_g, 0)
    for remat in (False, True):
        (_, (got_logits, got_outs)), got_g = value_and_grad(iv.coef, True, remat)
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-5 * np.abs(want_logits).max(), rtol=0)
        np.testing.assert_allclose(got_outs, want_outs, atol=1e-5 * np.abs(want_outs).max(), rtol=0)
        np.testing.assert_allclose(np.where(real, got_g, 0), want_g, atol=1e-5 * np.abs(want_g).max(), rtol=0)
    want_r = residual_stream(qwen.params, cfg, tokens, mask, iv, scan=False)[1]
    got_r = residual_stream(qwen.params, cfg, tokens, mask, iv, scan=True)[1]
    np.testing.assert_allclose(got_r, want_r, atol=1e-5 * np.abs(want_r).max(), rtol=0)


@pytest.mark.parametrize("segments", [1, 3])
def test_scanned_replace_in_segments_equals_unrolled(qwen, monkeypatch, segments):
    """Circuit evaluation's scanned loop holds its buffered rows in segments of layers, a
    layer contracting the buffers of its own and the earlier segments: one segment (every
    row), or three of one layer each (every layer writes the other segments' spare rows).
    Values and coefficient gradients equal the unrolled loop's."""
    from jaxinterp import models

    monkeypatch.setattr(models, "SCAN_SEGMENTS", segments)
    spec, cfg = qwen.graph_spec, qwen.cfg
    assert len(models._segments(spec, "replace")) == segments
    tokens = jnp.asarray(np.random.default_rng(2).integers(4, cfg.vocab_size, size=(3, 7)))
    iv = _intervention(spec, cfg, "replace", 7, seed=3)

    def run(coef, scan):
        logits = forward(qwen.params, cfg, tokens, None, dataclasses.replace(iv, coef=coef), scan=scan)
        return (logits[:, -1, :9] ** 2).sum(), logits

    (_, want), want_g = jax.value_and_grad(lambda c: run(c, False), has_aux=True)(iv.coef)
    (_, got), got_g = jax.value_and_grad(lambda c: run(c, True), has_aux=True)(iv.coef)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    real = spec.real_edge_mask
    np.testing.assert_allclose(np.where(real, got_g, 0), np.where(real, want_g, 0),
                               atol=1e-5 * np.abs(np.where(real, want_g, 0)).max(), rtol=0)


@pytest.mark.parametrize("n_layers,segments", [(3, 2), (30, 2), (7, 4), (2, 4)])
def test_segments_partition_layers_and_rows(n_layers, segments, monkeypatch):
    """The segments cover the layers in order, and their rows the upstream nodes in order:
    each segment's rows are its layers' heads and MLPs (the first's also the input)."""
    from jaxinterp import models
    from jaxinterp.graph import GraphSpec

    monkeypatch.setattr(models, "SCAN_SEGMENTS", segments)
    spec = GraphSpec(n_layers=n_layers, n_heads=4)
    got = models._segments(spec, "replace")
    assert len(got) == min(segments, n_layers)
    assert [g[0][0] for g in got] == [0] + [g[0][1] for g in got[:-1]] and got[-1][0][1] == n_layers
    assert [g[1][0] for g in got] == [0] + [g[1][1] for g in got[:-1]] and got[-1][1][1] == spec.n_forward
    for (a, b), (lo, hi) in got:
        assert lo == (spec.head_index(a) if a else 0) and hi - lo == (b - a) * 5 + (a == 0)
    assert models._segments(spec, "grad") == models._segments(spec, "grad-replace") == got
    assert models._segments(spec, "add") == models._segments(spec, None) == [((0, n_layers), (0, spec.n_forward))]


def test_scanned_add_one_equals_unrolled(qwen):
    spec, cfg = qwen.graph_spec, qwen.cfg
    tokens = jnp.asarray(np.random.default_rng(2).integers(4, cfg.vocab_size, size=(3, 6)))
    source = jax.random.normal(jax.random.PRNGKey(4), (1, 3, 6, cfg.d_model))
    iv = EdgeIntervention(jax.random.uniform(jax.random.PRNGKey(5), (1, spec.n_backward)), source, mode="add-one")
    want = forward(qwen.params, cfg, tokens, intervention=iv, scan=False)
    got = forward(qwen.params, cfg, tokens, intervention=iv, scan=True)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
