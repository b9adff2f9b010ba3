"""An independent, deliberately plain GPT-2 forward for checking the graph forward.

Head by head, input by input, no shared code with ``jaxinterp.models``: each downstream
input can be given an extra additive term, and every node output is returned. Used to
check EAP scores (by ``jax.jvp``), exact patching and node removal.
"""

import jax
import jax.numpy as jnp


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * w + b


def forward(params, cfg, tokens, mask, extra=None, emb=None, blocked=None):
    """``extra``: dict mapping a downstream input name (``a0.h1<k>``, ``m1``, ``logits``)
    to an array ``[batch, pos, d_model]`` added to that input; ``emb`` replaces the token
    embedding; ``blocked``: dict layer -> ``[batch, pos_q, pos_k]`` bool, attention
    scores masked out in that layer (attention knockout). Returns
    ``(logits, {node name: output})``."""
    blocked = blocked or {}
    extra = extra or {}
    B, P = tokens.shape
    emb = params["embed"]["w_e"][tokens] if emb is None else emb
    resid = emb + params["embed"]["w_pos"][:P][None]
    outs = {"input": emb}
    allowed = jnp.tril(jnp.ones((P, P), bool))[None] & (mask[:, None, :] > 0)
    for l in range(cfg.n_layers):
        p = jax.tree.map(lambda a: a[l], params["blocks"])
        layer_out = jnp.zeros_like(resid)
        for h in range(cfg.n_heads):
            def inp(letter):
                x = resid + extra.get(f"a{l}.h{h}<{letter}>", 0.0)
                return _ln(x, p["ln1"]["w"], p["ln1"]["b"], cfg.norm_eps)
            q = inp("q") @ p["attn"]["w_q"][h] + p["attn"]["b_q"][h]
            k = inp("k") @ p["attn"]["w_k"][h] + p["attn"]["b_k"][h]
            v = inp("v") @ p["attn"]["w_v"][h] + p["attn"]["b_v"][h]
            s = jnp.einsum("bqe,bke->bqk", q, k) / jnp.sqrt(q.shape[-1])
            s = jnp.where(allowed & ~blocked[l] if l in blocked else allowed, s, -1e30)
            z = jax.nn.softmax(s, -1) @ v
            out = z @ p["attn"]["w_o"][h]
            outs[f"a{l}.h{h}"] = out
            layer_out = layer_out + out
        attn_out = layer_out + p["attn"]["b_o"]
        x = resid + attn_out + extra.get(f"m{l}", 0.0)
        hidden = jax.nn.gelu(_ln(x, p["ln2"]["w"], p["ln2"]["b"], cfg.norm_eps) @ p["mlp"]["w_in"] + p["mlp"]["b_in"],
                             approximate=True)
        m = hidden @ p["mlp"]["w_out"] + p["mlp"]["b_out"]
        outs[f"m{l}"] = m
        resid = resid + attn_out + m
    x = resid + extra.get("logits", 0.0)
    logits = _ln(x, params["ln_f"]["w"], params["ln_f"]["b"], cfg.norm_eps) @ params["unembed"]["w_u"]
    return logits, outs
