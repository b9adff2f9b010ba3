"""Pieces shared by the rotary families: config-key checking, RoPE settings, and the
Llama-style tensor map (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``gate_proj``/
``up_proj``/``down_proj``, RMSNorms), all as data.

Config keys are checked against what a family understands (penzai's habit): a key that
is neither read nor known to be harmless is refused, so a feature we do not implement
can never be ignored silently.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np

from jaxinterp.config import ModelConfig, Rope, ROPE_TYPES

from ..hf import ConversionError, Rule

# Keys of any Hugging Face config that do not change a causal LM's forward pass.
HARMLESS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "use_cache", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "hidden_dropout", "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class",
    "cache_implementation", "id2label", "label2id", "classifier_dropout", "torchscript",
})

# RoPE dictionary keys per rope_type (Hugging Face's ``rope_parameters`` / ``rope_scaling``).
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "linear": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
               "high_freq_factor", "original_max_position_embeddings"},
}
_ROPE_REQUIRED = {"default": set(), "linear": {"factor"},
                  "llama3": {"factor", "low_freq_factor", "high_freq_factor"}}


def check_keys(hf: dict, family: str, understood: Iterable[str]) -> None:
    """Refuse config keys that are neither ``understood`` by ``family`` nor harmless."""
    unknown = sorted(set(hf) - set(understood) - HARMLESS)
    if unknown:
        raise ConversionError(
            f"{family} config fields {unknown} are not understood by the {family} converter (they may change the "
            f"forward pass); understood: {sorted(set(understood))}")


def need(hf: dict, family: str, key: str) -> Any:
    if hf.get(key) is None:
        raise ConversionError(f"{family} config.json lacks {key!r}")
    return hf[key]


def activation(family: str, name: str) -> str:
    from jaxinterp.config import ACTIVATIONS

    if name not in ACTIVATIONS:
        raise ConversionError(f"{family} activation {name!r} is not supported; supported: {list(ACTIVATIONS)}")
    return name


def rope(hf: dict, family: str, d_head: int, theta_key: str = "rope_theta",
         partial_key: Optional[str] = None, partial_default: float = 1.0) -> dict:
    """RoPE settings from either config layout, as :class:`ModelConfig` fields
    (``positional``, ``rope``, ``rotary_dim``).

    Hugging Face 5 writes ``rope_parameters {rope_type, rope_theta, factor, ...}``; older
    files have ``rope_theta`` (``theta_key``) and ``rope_scaling {type|rope_type, ...}``
    at the top level (``rope_scaling`` wins, as in Hugging Face). ``partial_key``: the
    legacy top-level key of the rotary fraction (GPT-NeoX ``rotary_pct``); families
    without one refuse a partial rotary fraction.
    """
    d = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if d and all(isinstance(v, dict) for v in d.values()):
        raise ConversionError(f"{family}: per-layer-type rope_parameters {sorted(d)} are not supported")
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConversionError(f"{family}: rope_type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    unknown = sorted(set(d) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ConversionError(f"{family}: rope settings {unknown} are not supported for rope_type {rope_type!r} "
                              f"(understood: {sorted(_ROPE_KEYS[rope_type])})")
    missing = sorted(k for k in _ROPE_REQUIRED[rope_type] if d.get(k) is None)
    if missing:
        raise ConversionError(f"{family}: rope_type {rope_type!r} needs {missing}")
    theta = d.get("rope_theta", hf.get(theta_key, 10000.0))
    partial = d.get("partial_rotary_factor", hf.get(partial_key, partial_default) if partial_key else 1.0)
    if partial_key is None and partial != 1.0:
        raise ConversionError(f"{family}: partial_rotary_factor={partial} is not supported (only 1.0)")
    rotary_dim = int(d_head * partial)  # Hugging Face truncates the same way
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ConversionError(f"{family}: rotary dimension {rotary_dim} (d_head {d_head} x {partial}) must be "
                              "even and positive")
    schedule = dict(theta=float(theta), type=rope_type)
    if rope_type in ("linear", "llama3"):
        schedule["factor"] = float(d["factor"])
    if rope_type == "llama3":
        schedule.update(low_freq_factor=float(d["low_freq_factor"]), high_freq_factor=float(d["high_freq_factor"]),
                        original_max_position=int(d.get("original_max_position_embeddings")
                                                  or need(hf, family, "max_position_embeddings")))
    return dict(positional="rotary", rope=Rope(**schedule), rotary_dim=None if rotary_dim == d_head else rotary_dim)


# --- the Llama-style tensor map ----------------------------------------------------------

def _heads_in(n: int, e: int, d: int):
    """``nn.Linear`` weight ``[n * d_head, d_model]`` -> ``[n, d_model, d_head]``."""
    return lambda w: (w.reshape(n, e, d).transpose(0, 2, 1),)


def _heads_bias(n: int, e: int):
    return lambda b: (b.reshape(n, e),)


def _transpose(w: np.ndarray):
    return (w.T,)


def llamalike_rules(cfg: ModelConfig, tied: bool, *, post_norms: bool = False) -> list[Rule]:
    """Tensor map of ``LlamaForCausalLM`` and its relatives (keys after ``model.``);
    ``tied``: the unembedding is the embedding matrix (no ``lm_head``).

    ``post_norms``: Gemma 2 naming, where ``post_attention_layernorm`` is the norm *on the
    attention output* and ``pre_feedforward_layernorm`` the MLP's input norm.
    """
    D, H, K, E, M, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size
    blk = "layers.{layer}."
    att, mlp = blk + "self_attn.", blk + "mlp."
    out = [
        Rule((("embed", "w_e"),) + ((("unembed", "w_u"),) if tied else ()), "embed_tokens.weight", (V, D),
             lambda w: (w, w.T) if tied else (w,)),
        Rule((("blocks", "ln1", "w"),), blk + "input_layernorm.weight", (D,)),
        Rule((("blocks", "attn", "w_q"),), att + "q_proj.weight", (H * E, D), _heads_in(H, E, D)),
        Rule((("blocks", "attn", "w_k"),), att + "k_proj.weight", (K * E, D), _heads_in(K, E, D)),
        Rule((("blocks", "attn", "w_v"),), att + "v_proj.weight", (K * E, D), _heads_in(K, E, D)),
        Rule((("blocks", "attn", "w_o"),), att + "o_proj.weight", (D, H * E),
             lambda w: (w.reshape(D, H, E).transpose(1, 2, 0),)),  # = w.T.reshape(H, E, D), as a view
        Rule((("blocks", "mlp", "w_gate"),), mlp + "gate_proj.weight", (M, D), _transpose),
        Rule((("blocks", "mlp", "w_in"),), mlp + "up_proj.weight", (M, D), _transpose),
        Rule((("blocks", "mlp", "w_out"),), mlp + "down_proj.weight", (D, M), _transpose),
        Rule((("ln_f", "w"),), "norm.weight", (D,)),
    ]
    if post_norms:
        out += [Rule((("blocks", "ln1_post", "w"),), blk + "post_attention_layernorm.weight", (D,)),
                Rule((("blocks", "ln2", "w"),), blk + "pre_feedforward_layernorm.weight", (D,)),
                Rule((("blocks", "ln2_post", "w"),), blk + "post_feedforward_layernorm.weight", (D,))]
    else:
        out.append(Rule((("blocks", "ln2", "w"),), blk + "post_attention_layernorm.weight", (D,)))
    if cfg.qkv_bias:
        out += [Rule((("blocks", "attn", "b_q"),), att + "q_proj.bias", (H * E,), _heads_bias(H, E)),
                Rule((("blocks", "attn", "b_k"),), att + "k_proj.bias", (K * E,), _heads_bias(K, E)),
                Rule((("blocks", "attn", "b_v"),), att + "v_proj.bias", (K * E,), _heads_bias(K, E))]
    if cfg.out_bias:
        out.append(Rule((("blocks", "attn", "b_o"),), att + "o_proj.bias", (D,)))
    if cfg.mlp_bias:
        out += [Rule((("blocks", "mlp", "b_gate"),), mlp + "gate_proj.bias", (M,)),
                Rule((("blocks", "mlp", "b_in"),), mlp + "up_proj.bias", (M,)),
                Rule((("blocks", "mlp", "b_out"),), mlp + "down_proj.bias", (D,))]
    if not tied:
        out.append(Rule((("unembed", "w_u"),), "lm_head.weight", (V, D), _transpose))
    return out


# rotary-frequency buffers of older checkpoints; lm_head duplicates the embedding when tied
LLAMALIKE_IGNORE = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight")


def sliding_layers(family: str, layer_types: Optional[list], n_layers: int) -> Optional[tuple[int, ...]]:
    """Indices of ``"sliding_attention"`` layers in Hugging Face's ``layer_types``."""
    if layer_types is None:
        return None
    allowed = ("full_attention", "sliding_attention")
    bad = sorted({t for t in layer_types if t not in allowed})
    if bad or len(layer_types) != n_layers:
        raise ConversionError(f"{family}: layer_types must list {n_layers} entries from {list(allowed)}, "
                              f"got {layer_types}")
    return tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
