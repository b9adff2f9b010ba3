"""GPT-2 (``model_type: gpt2``): learned positions, LayerNorm, GELU MLP, Conv1D weights."""

from __future__ import annotations

import numpy as np

from jaxinterp.config import ModelConfig

from ..hf import ConversionError, Family, Rule, register
from .common import check_keys

# Config keys that change the forward pass, with the only values we implement.
_REQUIRED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
_UNDERSTOOD = tuple(_REQUIRED) + (
    "vocab_size", "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "layer_norm_epsilon",
    "activation_function", "tie_word_embeddings",
    "n_ctx",  # older files: the same as n_positions
    # scores in float32, scaled before the q.k product: the same function (only rounding
    # in half precision differs)
    "reorder_and_upcast_attn",
    # dropout (off at inference), and the sequence-summary head of GPT2DoubleHeadsModel /
    # classification heads, which a causal LM does not have
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "_num_labels",
    "task_specific_params",  # generation defaults of the hub's gpt2 (sampling, max_length)
)


def config(hf: dict) -> ModelConfig:
    check_keys(hf, "gpt2", _UNDERSTOOD)
    for key, value in _REQUIRED.items():
        if key in hf and hf[key] != value:
            raise ConversionError(f"gpt2 config field {key}={hf[key]!r} is not supported (only {value!r})")
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    if d_model % n_heads:
        raise ConversionError(f"gpt2 config: n_embd={d_model} is not divisible by n_head={n_heads}")
    return ModelConfig(
        n_layers=hf["n_layer"], n_heads=n_heads, d_model=d_model, d_head=d_model // n_heads,
        d_mlp=hf.get("n_inner") or 4 * d_model, vocab_size=hf["vocab_size"], n_ctx=hf["n_positions"],
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), positional="learned",
        act_fn=hf.get("activation_function", "gelu_new"),
    )


def rules(cfg: ModelConfig, tied: bool) -> list[Rule]:
    D, H, E, M, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size

    def split_qkv_weight(w):  # Conv1D [d_model, 3 * d_model] -> 3 x [head, d_model, d_head]
        return tuple(part.reshape(D, H, E).transpose(1, 0, 2) for part in np.split(w, 3, axis=1))

    def split_qkv_bias(b):  # [3 * d_model] -> 3 x [head, d_head]
        return tuple(part.reshape(H, E) for part in np.split(b, 3))

    blk = "h.{layer}."
    out = [
        Rule((("embed", "w_e"),) + ((("unembed", "w_u"),) if tied else ()),
             "wte.weight", (V, D), lambda w: (w, w.T) if tied else (w,)),
        Rule((("embed", "w_pos"),), "wpe.weight", (cfg.n_ctx, D)),
        Rule((("blocks", "ln1", "w"),), blk + "ln_1.weight", (D,)),
        Rule((("blocks", "ln1", "b"),), blk + "ln_1.bias", (D,)),
        Rule(tuple(("blocks", "attn", f"w_{x}") for x in "qkv"), blk + "attn.c_attn.weight", (D, 3 * D),
             split_qkv_weight),
        Rule(tuple(("blocks", "attn", f"b_{x}") for x in "qkv"), blk + "attn.c_attn.bias", (3 * D,),
             split_qkv_bias),
        Rule((("blocks", "attn", "w_o"),), blk + "attn.c_proj.weight", (D, D), lambda w: (w.reshape(H, E, D),)),
        Rule((("blocks", "attn", "b_o"),), blk + "attn.c_proj.bias", (D,)),
        Rule((("blocks", "ln2", "w"),), blk + "ln_2.weight", (D,)),
        Rule((("blocks", "ln2", "b"),), blk + "ln_2.bias", (D,)),
        Rule((("blocks", "mlp", "w_in"),), blk + "mlp.c_fc.weight", (D, M)),
        Rule((("blocks", "mlp", "b_in"),), blk + "mlp.c_fc.bias", (M,)),
        Rule((("blocks", "mlp", "w_out"),), blk + "mlp.c_proj.weight", (M, D)),
        Rule((("blocks", "mlp", "b_out"),), blk + "mlp.c_proj.bias", (D,)),
        Rule((("ln_f", "w"),), "ln_f.weight", (D,)),
        Rule((("ln_f", "b"),), "ln_f.bias", (D,)),
    ]
    if not tied:
        out.append(Rule((("unembed", "w_u"),), "lm_head.weight", (V, D), lambda w: (w.T,)))
    return out


register(Family(
    model_types=("gpt2",), config=config, rules=rules, tied_by_default=True, prefixes=("transformer.",),
    # attention-mask buffers of older checkpoints; lm_head duplicates wte when tied
    ignore=(r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
))
