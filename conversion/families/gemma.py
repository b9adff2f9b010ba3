"""Gemma and Gemma 2 (``model_type: gemma | gemma2``).

Gemma: Llama-like with RMSNorm scaled by ``1 + w``, the token embedding multiplied by
``sqrt(hidden_size)`` (part of the ``input`` node, as TransformerLens folds it into
``W_E``), GeGLU (``gelu_pytorch_tanh``), ``head_dim`` independent of ``hidden_size``,
tied embeddings.

Gemma 2 adds attention-logit and final-logit soft-capping, ``query_pre_attn_scalar``,
RMSNorms after attention and after the MLP (``sandwich_norms``), and sliding-window
attention in alternate layers. Its post-attention norm acts on the *sum* of heads; in
the circuit graph each head node is the head's share of the normalised sum, with the
normaliser computed from the whole layer in the same run (see :mod:`jaxinterp.models`).
"""

from __future__ import annotations

import math

from jaxinterp.config import ModelConfig

from ..hf import ConversionError, Family, register
from .common import LLAMALIKE_IGNORE, activation, check_keys, llamalike_rules, need, rope, sliding_layers

_SHAPES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_COMMON = _SHAPES + ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                     "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias",
                     "use_bidirectional_attention", "hidden_act", "hidden_activation")
_UNDERSTOOD = {
    "gemma": _COMMON,
    "gemma2": _COMMON + ("query_pre_attn_scalar", "sliding_window", "sliding_window_size", "layer_types",
                         "final_logit_softcapping", "attn_logit_softcapping"),
}
# Hugging Face's defaults for keys a config.json may leave out (tie_word_embeddings: True,
# the Family's tied_by_default)
_DEFAULTS = {
    "gemma": dict(num_key_value_heads=16, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6),
    "gemma2": dict(num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
}


def _activation(family: str, hf: dict) -> str:
    if family == "gemma2":  # Gemma2MLP reads hidden_activation only (hidden_act is unused)
        return activation(family, hf.get("hidden_activation") or "gelu_pytorch_tanh")
    # Hugging Face 5 reads hidden_act and maps the legacy "gelu" of the official releases to
    # the tanh approximation they were trained with; 4.x read hidden_activation instead
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act
    if hf.get("hidden_activation") not in (None, act):
        raise ConversionError(f"gemma: hidden_act={hf.get('hidden_act')!r} and hidden_activation="
                              f"{hf['hidden_activation']!r} disagree; transformers versions read different ones")
    return activation(family, act)


def config(hf: dict) -> ModelConfig:
    family = hf["model_type"]
    check_keys(hf, family, _UNDERSTOOD[family])
    if hf.get("use_bidirectional_attention"):
        raise ConversionError(f"{family}: use_bidirectional_attention=True is not supported (causal models only)")
    hf = {**_DEFAULTS[family], **hf}
    n_layers, n_heads, d_model = (need(hf, family, k) for k in ("num_hidden_layers", "num_attention_heads",
                                                               "hidden_size"))
    d_head = hf["head_dim"] or d_model // n_heads
    bias = bool(hf.get("attention_bias", False))
    extra = {}
    if family == "gemma2":
        window = hf["sliding_window"]
        if hf.get("sliding_window_size") not in (None, window):
            raise ConversionError(f"gemma2: sliding_window={window} and sliding_window_size="
                                  f"{hf['sliding_window_size']} disagree")
        windowed = sliding_layers(family, hf.get("layer_types"), n_layers)
        if windowed is None:  # Hugging Face's default: layers 0, 2, 4, ... slide
            windowed = tuple(range(0, n_layers, 2))
        extra = dict(sliding_window=window, sliding_layers=windowed if window is not None else None,
                     attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
                     attn_logit_softcap=hf["attn_logit_softcapping"],
                     final_logit_softcap=hf["final_logit_softcapping"], sandwich_norms=True)
    return ModelConfig(
        n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_head, d_mlp=need(hf, family, "intermediate_size"),
        vocab_size=need(hf, family, "vocab_size"), n_ctx=hf["max_position_embeddings"],
        n_kv_heads=hf["num_key_value_heads"] or n_heads, norm="rmsnorm", norm_eps=hf["rms_norm_eps"],
        norm_offset=1.0, act_fn=_activation(family, hf), gated_mlp=True, qkv_bias=bias, out_bias=bias,
        mlp_bias=False, embed_scale=math.sqrt(d_model), **rope(hf, family, d_head), **extra,
    )


def rules(cfg: ModelConfig, tied: bool):
    return llamalike_rules(cfg, tied, post_norms=cfg.sandwich_norms)


register(Family(model_types=("gemma", "gemma2"), config=config, rules=rules, tied_by_default=True,
                prefixes=("model.",), ignore=LLAMALIKE_IGNORE))
