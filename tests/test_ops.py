"""Functional ops: importable alone, exact against PyTorch, and jit/vmap/grad-safe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import compiler, ops

torch = pytest.importorskip("torch")


def test_layer_norm_matches_torch():
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    w, b = np.linspace(0.5, 1.5, 16, dtype=np.float32), np.linspace(-1, 1, 16, dtype=np.float32)
    ref = torch.nn.functional.layer_norm(torch.tensor(x), (16,), torch.tensor(w), torch.tensor(b), 1e-5).numpy()
    np.testing.assert_allclose(ops.layer_norm(x, w, b, 1e-5), ref, atol=1e-5)


def test_rms_norm_matches_its_definition():
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    w = np.arange(8, dtype=np.float32) / 8
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-6, offset=1.0), want, rtol=1e-5)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "gemma"])
def test_norm_input_vjps_equal_torch_autograd_per_cotangent(kind):
    """The edge probes' written-out norm backward, one cotangent at a time through torch's
    autograd, at SmolLM2's width with an off-centre input (so LayerNorm's mean term counts)."""
    rng = np.random.default_rng(11)
    n, d = 5, 576
    x = (rng.normal(size=(3, 7, d)) * 3 + 2).astype(np.float32)
    w = rng.normal(size=d).astype(np.float32) * 0.5 + (0 if kind == "gemma" else 1)
    g = rng.normal(size=(n, 3, 7, d)).astype(np.float32)
    offset = 1.0 if kind == "gemma" else 0.0

    def torch_norm(t):
        if kind == "layernorm":
            return torch.nn.functional.layer_norm(t, (d,), torch.tensor(w), torch.tensor(w[::-1].copy()), 1e-5)
        return t * torch.rsqrt((t ** 2).mean(-1, keepdim=True) + 1e-6) * (offset + torch.tensor(w))

    want = []
    for i in range(n):
        t = torch.tensor(x, requires_grad=True)
        torch_norm(t).backward(torch.tensor(g[i]))
        want.append(t.grad.numpy())
    want = np.stack(want)
    got = compiler.jit(ops.norm_input_vjps, static_argnums=(2, 4, 5))(x, w, 1e-5 if kind == "layernorm" else 1e-6,
                                                                       g, kind == "layernorm", offset)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())


def _attn_params(rng, n_heads, n_kv, d_model=16, d_head=4):
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32) * 0.5
    return {"w_q": f(n_heads, d_model, d_head), "b_q": f(n_heads, d_head), "w_k": f(n_kv, d_model, d_head),
            "b_k": f(n_kv, d_head), "w_v": f(n_kv, d_model, d_head), "b_v": f(n_kv, d_head),
            "w_o": f(n_heads, d_head, d_model), "b_o": f(d_model)}


def test_grouped_query_attention_equals_repeated_key_value_heads():
    rng = np.random.default_rng(2)
    p = _attn_params(rng, n_heads=6, n_kv=2)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    mask = ops.attention_mask(jnp.array([[1] * 5, [1, 1, 1, 0, 0]]))
    grouped, _ = ops.attention(p, x, mask)
    rep = dict(p, **{k: jnp.repeat(p[k], 3, 0) for k in ["w_k", "b_k", "w_v", "b_v"]})
    repeated, _ = ops.attention(rep, x, mask)
    np.testing.assert_allclose(grouped, repeated, atol=1e-5)


def test_per_head_inputs_equal_shared_input_when_identical():
    rng = np.random.default_rng(3)
    p = _attn_params(rng, n_heads=4, n_kv=2)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    mask = ops.attention_mask(jnp.ones((2, 5), jnp.int32))
    shared = ops.attention_heads(p, x, x, x, mask)
    xh = jnp.broadcast_to(x[None], (4, 2, 5, 16))
    np.testing.assert_allclose(ops.attention_heads(p, xh, xh, xh, mask), shared, atol=1e-5)
    out, per_head = ops.attention(p, x, mask)
    np.testing.assert_allclose(out, per_head.sum(2) + p["b_o"], atol=1e-5)
    assert per_head.shape == (2, 5, 4, 16)


def test_kv_head_inputs_are_shared_by_their_query_heads():
    """One k/v input per key/value head (the graph's grouped view): with identical
    inputs it is plain attention; an input given to key/value head 1 reaches query heads
    2, 3 only, and equals giving it to each of their per-query-head copies."""
    rng = np.random.default_rng(7)
    p = _attn_params(rng, n_heads=4, n_kv=2)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    mask = ops.attention_mask(jnp.ones((2, 5), jnp.int32))
    shared = ops.attention_heads(p, x, x, x, mask, head_major=True)
    xkv = jnp.broadcast_to(x[None], (2, 2, 5, 16))
    np.testing.assert_allclose(ops.attention_heads(p, x, xkv, xkv, mask, head_major=True), shared, atol=1e-5)
    bump = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    by_kv = ops.attention_heads(p, x, xkv.at[1].add(bump), xkv, mask, head_major=True)
    xq = jnp.broadcast_to(x[None], (4, 2, 5, 16))
    by_copies = ops.attention_heads(p, x, xq.at[2:].add(bump), xq, mask, head_major=True)
    np.testing.assert_allclose(by_kv, by_copies, atol=1e-5)
    np.testing.assert_allclose(by_kv[:2], shared[:2], atol=1e-5)
    assert np.abs(by_kv[2:] - shared[2:]).max() > 1e-3
    with pytest.raises(ValueError, match="query heads or the 2 key/value heads"):
        ops.attention_heads(p, x, xq[:3], xq[:3], mask)


def test_rms_norm_shares_add_up_to_the_norm_of_the_sum():
    rng = np.random.default_rng(8)
    parts = rng.normal(size=(3, 2, 4, 8)).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    w = rng.normal(size=8).astype(np.float32) * 0.3
    shares, bias_share = ops.rms_norm_shares(jnp.asarray(parts), jnp.asarray(w), 1e-6, 1.0, jnp.asarray(bias))
    total = parts.sum(0) + bias
    scale = (1 + w) / np.sqrt((total ** 2).mean(-1, keepdims=True) + 1e-6)  # of the whole sum
    np.testing.assert_allclose(shares, parts * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias_share, bias * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shares.sum(0) + bias_share, ops.rms_norm(total, w, 1e-6, 1.0), rtol=1e-5, atol=1e-6)
    assert ops.rms_norm_shares(jnp.asarray(parts), jnp.asarray(w), 1e-6)[1] is None


def test_padding_keys_are_never_attended():
    rng = np.random.default_rng(4)
    p = _attn_params(rng, 2, 2)
    x = jnp.asarray(rng.normal(size=(1, 6, 16)), jnp.float32)
    mask = ops.attention_mask(jnp.array([[1, 1, 1, 1, 0, 0]]))
    y = ops.attention_heads(p, x, x, x, mask)
    x2 = x.at[:, 4:].set(100.0)  # changing padded tokens changes nothing at real positions
    np.testing.assert_allclose(ops.attention_heads(p, x2, x2, x2, mask)[:, :4], y[:, :4], atol=1e-5)


def test_ops_are_jit_vmap_and_grad_safe():
    rng = np.random.default_rng(5)
    p = {"w_in": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32), "b_in": jnp.zeros(12),
         "w_out": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32), "b_out": jnp.zeros(8)}
    x = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
    f = compiler.jit(jax.vmap(lambda xi: ops.mlp(p, xi)))
    np.testing.assert_allclose(f(x), ops.mlp(p, x), atol=1e-5)
    g = jax.grad(lambda xi: ops.mlp(p, ops.layer_norm(xi, jnp.ones(8), None, 1e-5)).sum())(x)
    assert g.shape == x.shape and np.isfinite(g).all()


def test_rotary_preserves_norms_and_relative_positions():
    cos, sin = ops.rotary_tables(jnp.arange(6), 8, 10000.0)
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.normal(size=(1, 6, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 6, 1, 8)), jnp.float32)
    qr = ops.apply_rotary(q, cos, sin)
    np.testing.assert_allclose(jnp.linalg.norm(qr, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
    # the same vectors at shifted positions give the same dot product
    same_q = jnp.broadcast_to(q[:, :1], q.shape)
    same_k = jnp.broadcast_to(k[:, :1], k.shape)
    a, b = ops.apply_rotary(same_q, cos, sin), ops.apply_rotary(same_k, cos, sin)
    dots = jnp.einsum("bqhe,bkhe->qk", a, b)
    np.testing.assert_allclose(dots[3, 1], dots[4, 2], rtol=1e-4)


def test_gated_mlp_with_biases_matches_torchs_llama_mlp():
    """Llama's MLP with ``mlp_bias``: down(act(gate(x)) * up(x)), every projection with its
    bias (nonzero here: random init leaves them zero, where a dropped bias goes unseen)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    hf = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2,
                                 mlp_bias=True, hidden_act="silu")).eval()
    with torch.no_grad():
        for b in (hf.gate_proj.bias, hf.up_proj.bias, hf.down_proj.bias):
            b.normal_()
    x = torch.randn(2, 3, 16)
    t = lambda a: jnp.asarray(a.detach().numpy())  # noqa: E731
    p = {"w_gate": t(hf.gate_proj.weight.T), "b_gate": t(hf.gate_proj.bias), "w_in": t(hf.up_proj.weight.T),
         "b_in": t(hf.up_proj.bias), "w_out": t(hf.down_proj.weight.T), "b_out": t(hf.down_proj.bias)}
    want = hf(x).detach().numpy()
    got = np.asarray(ops.mlp(p, t(x), "silu"))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
