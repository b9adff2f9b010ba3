"""An independent circuit-graph forward for the rotary families, in PyTorch.

It runs a Hugging Face model's own modules (norms, projections, rotary tables, MLPs) but
wires them by hand, head by head and input by input, so that every downstream input of
the circuit graph (``a0.h1<k>``, ``m1``, ``logits``) can get an extra additive term and
every node output is returned. Nothing here touches jaxinterp: it checks the converter
and the graph forward (node outputs, EAP scores by autograd) from the outside.

Supports llama, mistral, qwen2, gemma, gemma2 and gpt_neox. Gemma 2's head nodes are
each head's share of the normalised attention output, ``out_h * (1 + w) / rms(S)`` with
``S`` the layer's summed attention output in the same run (written out here from the
RMSNorm formula, and checked against Hugging Face's own norm of ``S``).

``extra`` may also name the grouped view's shared inputs ``a{l}.kv{g}<k|v>``: every
query head of key/value head ``g`` then sees the perturbation in its k (v) input.
"""

import sys

import torch


def _parts(hf):
    """(base model, per-layer modules accessor, final norm, unembedding)."""
    if hf.config.model_type == "gpt_neox":
        base = hf.gpt_neox
        return base, base.embed_in, base.final_layer_norm, hf.get_output_embeddings()
    base = hf.model
    return base, base.embed_tokens, base.norm, hf.lm_head


def _window(cfg, layer):
    if cfg.model_type == "mistral":
        return cfg.sliding_window
    types = getattr(cfg, "layer_types", None)
    if types and types[layer] == "sliding_attention":
        return cfg.sliding_window
    return None


def _head_qkv(cfg, attn, x, h):
    """Query, key and value of query head ``h`` from the normalised input(s) ``x``
    (a dict letter -> ``[batch, pos, d_model]``): each ``[batch, pos, d_head]``."""
    B, P, _ = x["q"].shape
    H = cfg.num_attention_heads
    if cfg.model_type == "gpt_neox":
        E = cfg.hidden_size // H
        # the fused projection's output is [head, (q, k, v), d_head]
        per = {c: attn.query_key_value(x[c]).view(B, P, H, 3 * E)[:, :, h] for c in "qkv"}
        return per["q"][..., :E], per["k"][..., E:2 * E], per["v"][..., 2 * E:]
    E = attn.head_dim
    K = cfg.num_key_value_heads
    g = h // (H // K)  # the key/value head that query head h reads
    q = attn.q_proj(x["q"]).view(B, P, H, E)[:, :, h]
    k = attn.k_proj(x["k"]).view(B, P, K, E)[:, :, g]
    v = attn.v_proj(x["v"]).view(B, P, K, E)[:, :, g]
    return q, k, v


def forward(hf, ids, mask, extra=None, blocked=None):
    """``ids, mask [batch, pos]`` (torch) -> ``(logits [batch, pos, vocab], {node: output})``.

    ``extra``: downstream input name -> ``[batch, pos, d_model]`` added to that input;
    ``blocked``: layer -> ``[batch, pos_q, pos_k]`` bool tensor, attention scores masked out
    in that layer (attention knockout).
    """
    extra = extra or {}
    blocked = blocked or {}
    cfg = hf.config
    base, embed, final_norm, unembed = _parts(hf)
    rope_module = sys.modules[type(base).__module__]
    B, P = ids.shape
    emb = embed(ids)  # Gemma's embedding module includes the sqrt(d_model) scale
    outs = {"input": emb}
    resid = emb
    cos, sin = base.rotary_emb(resid, position_ids=torch.arange(P)[None])
    pos = torch.arange(P)
    for l, layer in enumerate(base.layers):
        attn = layer.attention if cfg.model_type == "gpt_neox" else layer.self_attn
        window = _window(cfg, l)
        allowed = (pos[None, :] <= pos[:, None])[None] & (mask[:, None, :] > 0)
        if window is not None:
            allowed = allowed & (pos[None, :] > pos[:, None] - window)[None]
        if l in blocked:
            allowed = allowed & ~blocked[l]
        attn_out = 0.0
        o_weight = (attn.dense if cfg.model_type == "gpt_neox" else attn.o_proj).weight  # [d_model, head * d_head]
        H = cfg.num_attention_heads
        group = H // getattr(cfg, "num_key_value_heads", H)
        for h in range(H):
            x = {c: layer.input_layernorm(resid + extra.get(f"a{l}.h{h}<{c}>", 0.0)
                                          + (extra.get(f"a{l}.kv{h // group}<{c}>", 0.0) if c != "q" else 0.0))
                 for c in "qkv"}
            q, k, v = _head_qkv(cfg, attn, x, h)
            q, k = rope_module.apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
            q, k = q[:, 0], k[:, 0]
            scores = q @ k.transpose(1, 2) * attn.scaling
            cap = getattr(attn, "attn_logit_softcapping", None)
            if cap is not None:
                scores = cap * torch.tanh(scores / cap)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            z = torch.softmax(scores, -1) @ v
            E = z.shape[-1]
            out = z @ o_weight[:, h * E:(h + 1) * E].T
            outs[f"a{l}.h{h}"] = out
            attn_out = attn_out + out
        o_module = attn.dense if cfg.model_type == "gpt_neox" else attn.o_proj
        bias = o_module.bias
        if cfg.model_type == "gemma2":
            norm = layer.post_attention_layernorm
            total = attn_out + (0.0 if bias is None else bias)
            scale = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight)
            for h in range(H):
                outs[f"a{l}.h{h}"] = outs[f"a{l}.h{h}"] * scale
            bias = None if bias is None else bias * scale
            attn_out = sum(outs[f"a{l}.h{h}"] for h in range(H))
            # the shares add up to Hugging Face's own normalised attention output
            torch.testing.assert_close(attn_out + (0.0 if bias is None else bias), norm(total), rtol=1e-4, atol=1e-5)
        if bias is not None:
            attn_out = attn_out + bias
        parallel = cfg.model_type == "gpt_neox" and cfg.use_parallel_residual
        x_m = (resid if parallel else resid + attn_out) + extra.get(f"m{l}", 0.0)
        if cfg.model_type == "gemma2":
            m = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x_m)))
        else:
            m = layer.mlp(layer.post_attention_layernorm(x_m))
        outs[f"m{l}"] = m
        resid = resid + attn_out + m
    logits = unembed(final_norm(resid + extra.get("logits", 0.0)))
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits, outs
