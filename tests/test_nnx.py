"""The Flax NNX view (jaxinterp.nnx): same logits as the model, split/merge, an optax step,
and on a real 8-device CPU mesh the same shardings as jaxinterp.sharding.shard_params."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from devtools.testing import devices_env
from jaxinterp import compiler, layout
from jaxinterp.nnx import LOGICAL_RULES, Transformer

from conftest import padded_batch


def test_logits_equal_the_model(model):
    view = Transformer.from_model(model)
    ids, mask, _ = padded_batch(model.cfg.vocab_size)
    # jitted by nnx (model(...) is compiled with jaxinterp.compiler's XLA options, nnx.jit
    # without them, so XLA may fuse differently: float rounding only)
    jitted = nnx.jit(lambda m, t, k: m(t, k))(view, ids, mask)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model(ids, mask)), rtol=1e-5, atol=1e-6)
    # eager: the same ops without XLA's fusion (float rounding only)
    np.testing.assert_allclose(np.asarray(view(ids, mask)), np.asarray(model(ids, mask)), rtol=1e-5, atol=1e-6)
    # the forward's own keyword arguments pass through (no second forward)
    last = jnp.asarray([10, 6, 2])
    np.testing.assert_allclose(np.asarray(view(ids, mask, logit_positions=last))[:, 0],
                               np.asarray(model(ids, mask))[np.arange(3), last], rtol=1e-6, atol=1e-6)


def test_params_carry_the_tables_logical_axes(model):
    state = nnx.state(Transformer.from_model(model), nnx.Param)
    w_q = state["params"]["blocks"]["attn"]["w_q"]
    assert w_q.get_metadata()["out_sharding"] == ("layer", "head", "d_model", "d_head")
    assert w_q[...] is model.params["blocks"]["attn"]["w_q"]  # a view, not a copy
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    axes = {tuple(k.key for k in path[1:]): v.get_metadata()["out_sharding"] for path, v in flat}
    assert axes == {p: layout.LEAVES[p].axes for p in layout.shapes(model.cfg)}
    # Flax resolves the logical names with the sharding table's rules
    from flax.core import spmd

    with spmd.logical_axis_rules(LOGICAL_RULES):
        assert nnx.get_partition_spec(state)["params"]["blocks"]["attn"]["w_q"].get_value() == \
            jax.sharding.PartitionSpec(None, "model", None, None)


def test_split_merge_round_trips(model):
    view = Transformer.from_model(model)
    graphdef, state = nnx.split(view)
    again = nnx.merge(graphdef, state)
    assert again.cfg == model.cfg
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, again.param_tree(), view.param_tree()))
    ids, mask, _ = padded_batch(model.cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(again(ids, mask)), np.asarray(model(ids, mask)), rtol=1e-5, atol=1e-6)
    # jit through split/merge: the config is in the graph definition, the arrays in the state
    logits = compiler.jit(lambda s: nnx.merge(graphdef, s)(ids, mask))(state)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids, mask)), rtol=1e-5, atol=1e-5)


def test_one_optax_step_changes_the_params(model):
    view = Transformer.from_model(model)
    before = jax.tree.map(np.asarray, view.param_tree())
    optimizer = nnx.Optimizer(view, optax.sgd(0.1), wrt=nnx.Param)
    ids, mask, _ = padded_batch(model.cfg.vocab_size)

    def loss(m):  # next-token cross-entropy on the real tokens
        logits = m(ids[:, :-1], mask[:, :-1])
        ll = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(ids[:, 1:])[..., None], -1)[..., 0]
        return -(ll * mask[:, 1:]).sum() / mask[:, 1:].sum()

    @nnx.jit
    def step(m, opt):
        value, grads = nnx.value_and_grad(loss)(m)
        opt.update(m, grads)
        return value

    first = float(step(view, optimizer))
    after = view.param_tree()
    old = layout.flatten(before)
    changed = [p for p, a in layout.flatten(after).items() if not np.array_equal(np.asarray(a), old[p])]
    assert ("blocks", "attn", "w_q") in changed and len(changed) >= len(layout.flatten(after)) - 1
    assert float(step(view, optimizer)) < first  # a descent step on this batch
    # the trained view goes back to jaxinterp's methods as a Model
    back = view.to_model()
    np.testing.assert_allclose(np.asarray(back(ids, mask)), np.asarray(view(ids, mask)), rtol=1e-5, atol=1e-6)
    # the original model's arrays were not touched (jax arrays are immutable)
    np.testing.assert_array_equal(np.asarray(model.params["blocks"]["attn"]["w_q"]),
                                  before["blocks"]["attn"]["w_q"])


def test_params_outside_the_table_are_refused(model):
    params = {**model.params, "extra": {"w": jnp.zeros(3)}}
    with pytest.raises(ValueError, match="unexpected parameter extra/w"):
        Transformer(model.cfg, params)


MESH_CHECK = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jaxinterp import compiler, layout, load_model, models
    from jaxinterp.config import ModelConfig
    from jaxinterp.nnx import Transformer
    from jaxinterp.sharding import make_mesh, shard_params

    assert len(jax.devices()) == 8


    def by_path(state):  # {("blocks", "attn", "w_q"): the Variable's value}, "params/" dropped
        flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        return {tuple(k.key for k in path[1:]): v.get_value() for path, v in flat}

    mesh = make_mesh(data=2, model=4)
    gqa = ModelConfig(n_layers=2, n_heads=8, n_kv_heads=2, d_model=32, d_head=4, d_mlp=40, vocab_size=64,
                      n_ctx=16, norm="rmsnorm", positional="rotary", act_fn="silu", gated_mlp=True,
                      qkv_bias=False, out_bias=False, mlp_bias=False)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    gqa_params = jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape), layout.abstract_params(gqa))
    gpt2 = load_model(sys.argv[1])
    out = {}
    for name, cfg, params in (("gpt2", gpt2.cfg, gpt2.params), ("gqa", gqa, gqa_params)):
        view = Transformer(cfg, params, mesh=mesh)
        want = layout.flatten(shard_params(params, mesh))
        state = nnx.state(view, nnx.Param)
        got, named = by_path(state), by_path(nnx.get_named_sharding(state, mesh))
        same = set(got) == set(want) and all(got[p].sharding == s.sharding and named[p] == s.sharding
                                             for p, s in want.items())
        ids = np.arange(2 * 7).reshape(2, 7) % cfg.vocab_size
        plain = np.asarray(compiler.jit(lambda p, t: models.forward(p, cfg, t))(params, ids))
        logits_close = bool(np.allclose(np.asarray(view(ids)), plain, rtol=1e-4, atol=1e-4))
        outs = view(ids, return_node_outputs=True)[1]  # [src, batch, pos, d_model]
        outs_spec = [None if s is None else str(s) for s in outs.sharding.spec]
        opt = nnx.Optimizer(view, optax.sgd(0.1), wrt=nnx.Param)

        @nnx.jit
        def step(m, o):
            grads = nnx.grad(lambda m: (m(ids) ** 2).mean())(m)
            o.update(m, grads)

        step(view, opt)
        # jit may spell a replicated spec differently (P() for P(None, None)): equivalence
        kept = all(a.sharding.is_equivalent_to(want[p].sharding, a.ndim)
                   for p, a in layout.flatten(view.param_tree()).items())
        out[name] = dict(same=bool(same), logits_close=logits_close, kept_after_step=bool(kept),
                         w_k=[None if s is None else str(s) for s in want[("blocks", "attn", "w_k")].sharding.spec],
                         outs_d_model=outs_spec[-1] if len(outs_spec) == 4 else None)
    print(json.dumps(out))
""")


def test_state_shardings_on_an_8_device_mesh_match_shard_params(gpt2_dir):
    run = subprocess.run([sys.executable, "-c", MESH_CHECK, gpt2_dir], env=devices_env(8), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    import json

    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("gpt2", "gqa"):
        assert out[name]["same"] and out[name]["logits_close"] and out[name]["kept_after_step"], out
        # the node outputs split along d_model over the model axis, as jaxinterp's methods split them
        assert out[name]["outs_d_model"] == "model", out
    # the attention projections along d_model (jaxinterp.sharding.LEAF_RULES), also where the
    # 2 key/value heads do not divide the 4-way model axis
    assert out["gpt2"]["w_k"] == out["gqa"]["w_k"] == [None, None, "model", None]
