"""Llama, Mistral and Qwen2 (``model_type: llama | mistral | qwen2``).

RMSNorm, rotary positions (``rope_theta``; ``rope_scaling`` types "linear" and "llama3"),
SwiGLU MLP, grouped-query attention, optional ``head_dim``, tied or untied ``lm_head``.
Llama: ``attention_bias`` (q/k/v/o) and ``mlp_bias``. Mistral: ``sliding_window`` in every
layer. Qwen2: q/k/v biases, ``use_sliding_window`` with ``max_window_layers`` or
``layer_types``.
"""

from __future__ import annotations

from jaxinterp.config import ModelConfig

from ..hf import Family, register
from .common import LLAMALIKE_IGNORE, activation, check_keys, llamalike_rules, need, rope, sliding_layers

_SHAPES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_COMMON = _SHAPES + ("num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                     "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "head_dim")
_UNDERSTOOD = {
    # pretraining_tp > 1 only split the same matmuls into slices in older transformers
    "llama": _COMMON + ("attention_bias", "mlp_bias", "pretraining_tp"),
    "mistral": _COMMON + ("sliding_window",),
    "qwen2": _COMMON + ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
}
# Hugging Face's defaults for keys a config.json may leave out (tie_word_embeddings: False,
# the Family's tied_by_default)
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6),
    "mistral": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, num_key_value_heads=32, sliding_window=4096,
                  max_window_layers=28),
}


def config(hf: dict) -> ModelConfig:
    family = hf["model_type"]
    check_keys(hf, family, _UNDERSTOOD[family])
    hf = {**_DEFAULTS[family], **hf}  # an explicit null stays null (e.g. no sliding window)
    n_layers, n_heads, d_model = (need(hf, family, k) for k in ("num_hidden_layers", "num_attention_heads",
                                                               "hidden_size"))
    d_head = hf.get("head_dim") or d_model // n_heads
    if family == "llama":
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        qkv_bias = out_bias = attn_bias
    else:
        qkv_bias, out_bias, mlp_bias = family == "qwen2", False, False
    window, windowed = None, None
    if family == "mistral":
        window = hf["sliding_window"]  # every layer; null: none
    elif family == "qwen2":
        if hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None:
            window = hf["sliding_window"]
            windowed = sliding_layers(family, hf.get("layer_types"), n_layers)
            if windowed is None:  # Hugging Face's rule without layer_types
                windowed = tuple(i for i in range(n_layers) if i >= hf["max_window_layers"])
    return ModelConfig(
        n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_head, d_mlp=need(hf, family, "intermediate_size"),
        vocab_size=need(hf, family, "vocab_size"), n_ctx=hf["max_position_embeddings"],
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, norm="rmsnorm", norm_eps=hf["rms_norm_eps"],
        act_fn=activation(family, hf.get("hidden_act", "silu")), gated_mlp=True, qkv_bias=qkv_bias,
        out_bias=out_bias, mlp_bias=mlp_bias, sliding_window=window, sliding_layers=windowed,
        **rope(hf, family, d_head),
    )


register(Family(model_types=("llama", "mistral", "qwen2"), config=config, rules=llamalike_rules,
                tied_by_default=False, prefixes=("model.",), ignore=LLAMALIKE_IGNORE))
