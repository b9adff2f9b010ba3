"""The one model description every family converts into.

Per-architecture differences are fields of :class:`ModelConfig`; the forward pass in
:mod:`jaxinterp.models` reads them and nothing else. A new family is a converter that
fills these fields (see ``conversion/families``), never a new forward.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Optional

Norm = Literal["layernorm", "rmsnorm"]
Positional = Literal["learned", "rotary"]

ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu", "gelu_fast")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and architectural switches of a decoder-only transformer.

    Axis names used throughout jaxinterp: ``layer, head, kv_head, d_head, d_model, d_mlp,
    vocab`` (see the README).
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    n_kv_heads: Optional[int] = None  # None: = n_heads (multi-head attention)
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    positional: Positional = "learned"
    act_fn: str = "gelu_new"
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    tie_word_embeddings: bool = True
    rotary_dim: Optional[int] = None
    rope_theta: float = 10000.0
    model_type: str = "gpt2"
    bos_token_id: Optional[int] = None

    def __post_init__(self):
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"activation {self.act_fn!r} is not supported; supported: {ACTIVATIONS}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.n_heads // self.kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
