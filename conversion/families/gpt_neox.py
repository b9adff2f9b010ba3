"""GPT-NeoX / Pythia (``model_type: gpt_neox``).

LayerNorms with biases, partial rotary positions (``rotary_pct`` / ``partial_rotary_factor``
of each head, ``rotary_emb_base`` / ``rope_theta``), a GELU MLP, parallel attention + MLP
(``use_parallel_residual``; False gives the sequential block), untied ``embed_out``.

The fused ``query_key_value`` weight ``[3 * d_model, d_model]`` is laid out per head:
output feature ``h * 3 * d_head + j * d_head + e`` is head ``h``'s ``(q, k, v)[j]``
feature ``e`` (``GPTNeoXAttention`` views it as ``[..., head, 3 * d_head]`` and chunks
the last axis into q, k, v).
"""

from __future__ import annotations

from jaxinterp.config import ModelConfig

from ..hf import ConversionError, Family, Rule, register
from .common import activation, check_keys, need, rope

_UNDERSTOOD = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings",
               "use_parallel_residual", "rope_parameters", "rope_scaling", "rotary_pct", "rotary_emb_base",
               "attention_bias", "is_decoder")
_DEFAULTS = dict(hidden_act="gelu", max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True,
                 attention_bias=True)  # tie_word_embeddings: False, the Family's tied_by_default


def config(hf: dict) -> ModelConfig:
    family = "gpt_neox"
    check_keys(hf, family, _UNDERSTOOD)
    hf = {**_DEFAULTS, **hf}
    n_layers, n_heads, d_model = (need(hf, family, k) for k in ("num_hidden_layers", "num_attention_heads",
                                                               "hidden_size"))
    if d_model % n_heads:
        raise ConversionError(f"gpt_neox: hidden_size={d_model} is not divisible by num_attention_heads={n_heads}")
    d_head = d_model // n_heads
    bias = bool(hf["attention_bias"])
    return ModelConfig(
        n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_head,
        d_mlp=need(hf, family, "intermediate_size"), vocab_size=need(hf, family, "vocab_size"),
        n_ctx=hf["max_position_embeddings"], norm="layernorm", norm_eps=hf["layer_norm_eps"],
        act_fn=activation(family, hf["hidden_act"]), parallel_attn_mlp=bool(hf["use_parallel_residual"]),
        qkv_bias=bias, out_bias=bias, mlp_bias=True,
        # Hugging Face's GPTNeoXConfig defaults rotary_pct to 0.25 when the file omits it
        **rope(hf, family, d_head, theta_key="rotary_emb_base", partial_key="rotary_pct", partial_default=0.25),
    )


def rules(cfg: ModelConfig, tied: bool) -> list[Rule]:
    D, H, E, M, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size

    def split_qkv_weight(w):  # [head * (q, k, v) * d_head, d_model] -> 3 x [head, d_model, d_head]
        w = w.reshape(H, 3, E, D)
        return tuple(w[:, j].transpose(0, 2, 1) for j in range(3))

    def split_qkv_bias(b):  # [head * (q, k, v) * d_head] -> 3 x [head, d_head]
        b = b.reshape(H, 3, E)
        return tuple(b[:, j] for j in range(3))

    blk = "layers.{layer}."
    out = [
        Rule((("embed", "w_e"),) + ((("unembed", "w_u"),) if tied else ()), "embed_in.weight", (V, D),
             lambda w: (w, w.T) if tied else (w,)),
        Rule((("blocks", "ln1", "w"),), blk + "input_layernorm.weight", (D,)),
        Rule((("blocks", "ln1", "b"),), blk + "input_layernorm.bias", (D,)),
        Rule(tuple(("blocks", "attn", f"w_{x}") for x in "qkv"), blk + "attention.query_key_value.weight",
             (3 * D, D), split_qkv_weight),
        Rule((("blocks", "attn", "w_o"),), blk + "attention.dense.weight", (D, D),
             lambda w: (w.reshape(D, H, E).transpose(1, 2, 0),)),  # = w.T.reshape(H, E, D), as a view
        Rule((("blocks", "ln2", "w"),), blk + "post_attention_layernorm.weight", (D,)),
        Rule((("blocks", "ln2", "b"),), blk + "post_attention_layernorm.bias", (D,)),
        Rule((("blocks", "mlp", "w_in"),), blk + "mlp.dense_h_to_4h.weight", (M, D), lambda w: (w.T,)),
        Rule((("blocks", "mlp", "b_in"),), blk + "mlp.dense_h_to_4h.bias", (M,)),
        Rule((("blocks", "mlp", "w_out"),), blk + "mlp.dense_4h_to_h.weight", (D, M), lambda w: (w.T,)),
        Rule((("blocks", "mlp", "b_out"),), blk + "mlp.dense_4h_to_h.bias", (D,)),
        Rule((("ln_f", "w"),), "final_layer_norm.weight", (D,)),
        Rule((("ln_f", "b"),), "final_layer_norm.bias", (D,)),
    ]
    if cfg.qkv_bias:
        out.append(Rule(tuple(("blocks", "attn", f"b_{x}") for x in "qkv"), blk + "attention.query_key_value.bias",
                        (3 * D,), split_qkv_bias))
    if cfg.out_bias:
        out.append(Rule((("blocks", "attn", "b_o"),), blk + "attention.dense.bias", (D,)))
    if not tied:
        out.append(Rule((("unembed", "w_u"),), "lm_head.weight", (V, D), lambda w: (w.T,)))
    return out


register(Family(
    model_types=("gpt_neox",), config=config, rules=rules, tied_by_default=False, prefixes=("gpt_neox.",),
    # older checkpoints call the unembedding embed_out (transformers 5 renames it on load)
    renames=((r"embed_out\.weight", "lm_head.weight"),),
    # attention-mask and rotary-frequency buffers of older checkpoints; lm_head when tied
    ignore=(r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)", r"lm_head\.weight"),
))
