"""Named model shapes: the public models' Hugging Face configs, without weights.

One table for everything that plans or benchmarks a model it does not load
(``jaxinterp plan``, ``benchmarks/bench_large.py``): each entry is the ``config.json`` of
the public checkpoint (the fields that shape the forward pass), read by the same family
converters as a real checkpoint, so a named shape is exactly the model a checkpoint of it
would load as.
"""

from __future__ import annotations

import os
from typing import Optional

from .config import ModelConfig

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
               rms_norm_eps=1e-5, hidden_act="silu")

HF_SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                         use_sliding_window=False, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                 n_ctx=1024, activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True),
    # a small Llama-architecture shape for quick checks
    "tiny": dict(_LLAMA3, vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}


class ShapeError(ValueError):
    """An unknown shape name or an unreadable config (the message says which exist)."""


def hf_config(name_or_path: str) -> dict:
    """The Hugging Face config of a named shape, or of a ``config.json`` (or a directory
    holding one)."""
    if name_or_path in HF_SHAPES:
        return dict(HF_SHAPES[name_or_path])
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ShapeError(f"unknown shape {name_or_path!r}: name one of {sorted(HF_SHAPES)} or give a config.json")
    from .io import read_json

    config = read_json(path)
    if not isinstance(config, dict):
        raise ShapeError(f"{path}: not a model config (a JSON {type(config).__name__}, not an object)")
    return config


def model_config(name_or_path: str, n_layers: Optional[int] = None) -> ModelConfig:
    """The :class:`ModelConfig` of a named shape or a ``config.json`` (read by the family
    converters, as a checkpoint would be); ``n_layers`` overrides the depth."""
    import dataclasses

    from .conversion.hf import family_for

    hf = hf_config(name_or_path)
    cfg = family_for(hf).config(hf)
    if n_layers is not None:
        if n_layers < 1:
            raise ShapeError(f"n_layers must be >= 1, got {n_layers}")
        layers = None if cfg.sliding_layers is None else tuple(i for i in cfg.sliding_layers if i < n_layers)
        cfg = dataclasses.replace(cfg, n_layers=n_layers, sliding_layers=layers)
    return cfg


__all__ = ["HF_SHAPES", "ShapeError", "hf_config", "model_config"]
