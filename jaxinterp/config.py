"""The one model description every family converts into.

Per-architecture differences are fields of :class:`ModelConfig`; the forward pass in
:mod:`jaxinterp.models` reads them and nothing else. A new family is a converter that
fills these fields (see ``conversion/families``), never a new forward.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Optional

from .names import GEMMA2_HEADS

Norm = Literal["layernorm", "rmsnorm"]
Positional = Literal["learned", "rotary"]

NORMS = ("layernorm", "rmsnorm")
POSITIONALS = ("learned", "rotary")
ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu", "gelu_fast")
# RoPE frequency schedules (Hugging Face ``rope_type`` names) the forward implements.
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Rope:
    """A rotary-position frequency schedule (Hugging Face's ``rope_theta`` and
    ``rope_scaling`` / ``rope_parameters``), nested in :class:`ModelConfig`.

    ``theta``: the base; ``type``: "default" (``theta ** (-2i / rotary_dim)``), "linear"
    (all frequencies divided by ``factor``) or "llama3" (Llama 3.1's banded schedule with
    ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position``);
    :func:`jaxinterp.ops.rope_inv_freq` computes it. Frozen and hashable, as the config.
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.type!r} is not supported; supported: {ROPE_TYPES}")

    def scaling(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxinterp.ops.rope_inv_freq` after ``theta``."""
        return dict(rope_type=self.type, factor=self.factor, low_freq_factor=self.low_freq_factor,
                    high_freq_factor=self.high_freq_factor, original_max_position=self.original_max_position)


@dataclasses.dataclass(frozen=True)
class Origin:
    """What a checkpoint says beyond the architecture: facts of its conversion, which the
    forward never reads. Kept in a converted directory's metadata and on the loaded
    :class:`jaxinterp.model.Model` (``model.origin``).

    ``model_type``: the Hugging Face family it was converted from (``"gpt2"``,
    ``"llama"``, ...); ``tie_word_embeddings``: whether its unembedding was the embedding
    matrix (the converter copies it, so the parameters always have ``unembed/w_u``);
    ``bos_token_id``: its config's BOS token id, if any.
    """

    model_type: str
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Origin":
        _check_fields(cls, d)
        return cls(**d)


def _check_fields(cls, d: dict[str, Any]) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"a {cls.__name__} is a JSON object, not a {type(d).__name__}")
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and architectural switches of a decoder-only transformer.

    Axis names used throughout jaxinterp: ``layer, head, kv_head, d_head, d_model, d_mlp,
    vocab`` (see the README). ``d_head`` need not be ``d_model / n_heads`` (Gemma).

    ``n_kv_heads``: the number of key/value heads (grouped-query attention); left out
    (None) it is ``n_heads`` (multi-head attention), and it is stored as that number.

    Layout switches: ``qkv_bias``, ``out_bias``, ``mlp_bias``, ``gated_mlp`` (with ``norm``,
    ``positional`` and ``sandwich_norms``) say which optional parameter leaves exist; they
    are read through the switches of :data:`jaxinterp.layout.SWITCHES`, the forward reads
    the leaves' presence, and conversion checks that the two agree.

    Not here: what a checkpoint says beyond the architecture (:class:`Origin`: its
    ``model_type``, tied embeddings, BOS id; kept in a converted directory's metadata) and
    the circuit graph's grouped-query view (``grouped_kv``, a property of the loaded
    :class:`jaxinterp.model.Model` and of :class:`jaxinterp.graph.GraphSpec`, chosen at
    load time). The config is a jit static argument: every field is hashable.

    Architectural switches beyond GPT-2:

    * ``norm_offset``: RMSNorm multiplies by ``norm_offset + w`` (Gemma: 1).
    * ``embed_scale``: the token embedding is multiplied by it (Gemma: ``sqrt(d_model)``);
      the ``input`` node's output is the *scaled* embedding, as TransformerLens's
      ``hook_embed`` (it folds the scale into ``W_E``).
    * ``rotary_dim``: rotate only the first ``rotary_dim`` features of each head
      (GPT-NeoX partial rotary); None rotates all ``d_head``.
    * ``rope``: the rotary frequency schedule (:class:`Rope`: base ``theta`` and scaling),
      read when ``positional == "rotary"``.
    * ``sliding_window``: keys more than ``sliding_window - 1`` positions back are masked,
      in the layers ``sliding_layers`` (None: every layer).
    * ``attn_scale``: attention logits are ``q . k * attn_scale`` (None: ``d_head**-0.5``;
      Gemma 2: ``query_pre_attn_scalar**-0.5``).
    * ``attn_logit_softcap`` / ``final_logit_softcap``: ``c * tanh(x / c)`` on attention
      logits (before masking) / on the output logits (Gemma 2).
    * ``sandwich_norms``: extra RMSNorms on the attention and MLP outputs before they
      join the residual stream (Gemma 2's ``post_attention_layernorm`` and
      ``post_feedforward_layernorm``). The attention one normalises the *sum* of heads;
      in the circuit graph a head's node output is its share of the normalised sum, with
      the normaliser computed from the whole layer in the same run (:mod:`jaxinterp.models`).
    * ``gemma2_heads``: with sandwich norms, what a head node is (:data:`GEMMA2_HEADS`):
      ``"shared"`` (the default, above) or ``"per-input"``, MIB's through the reference on
      TransformerLens: a head's output is its raw ``z_h @ w_o[h]``, and each downstream
      input renormalises the layer's sum of heads as its own edges mix them. Not an
      architecture fact but the circuit graph's definition, kept here because every
      program reads it; :func:`jaxinterp.loading.load_model` sets it, and a converted
      checkpoint does not keep it (chosen at load time, as the grouped-query view).
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    n_kv_heads: Optional[int] = None  # None: n_heads (multi-head attention); stored as the number
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0
    positional: Positional = "learned"
    act_fn: str = "gelu_new"
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    embed_scale: float = 1.0
    rotary_dim: Optional[int] = None
    rope: Rope = Rope()
    sliding_window: Optional[int] = None
    sliding_layers: Optional[tuple[int, ...]] = None
    attn_scale: Optional[float] = None
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    sandwich_norms: bool = False
    gemma2_heads: str = "shared"

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if isinstance(self.rope, dict):  # from JSON
            _check_fields(Rope, self.rope)
            object.__setattr__(self, "rope", Rope(**self.rope))
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"activation {self.act_fn!r} is not supported; supported: {ACTIVATIONS}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is not supported; supported: {NORMS}")
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional {self.positional!r} is not supported; supported: {POSITIONALS}")
        if not 1 <= self.n_kv_heads <= self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.d_head and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in (0, d_head={self.d_head}]")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1")
        if self.sliding_layers is not None:
            if not isinstance(self.sliding_layers, tuple):  # hashable: the config is a jit static argument
                object.__setattr__(self, "sliding_layers", tuple(int(i) for i in self.sliding_layers))
            if self.sliding_window is None:
                raise ValueError("sliding_layers is set but sliding_window is None")
            bad = [i for i in self.sliding_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"sliding_layers {bad} are outside 0..{self.n_layers - 1}")
        if self.sandwich_norms and self.norm != "rmsnorm":
            raise ValueError("sandwich_norms is implemented for norm='rmsnorm' only")
        if self.gemma2_heads not in GEMMA2_HEADS:
            raise ValueError(f"gemma2_heads {self.gemma2_heads!r} is not one of {GEMMA2_HEADS}")
        if self.gemma2_heads != "shared" and not self.sandwich_norms:
            raise ValueError("gemma2_heads='per-input' is a choice for models with sandwich norms (Gemma 2) only")

    @property
    def per_input_heads(self) -> bool:
        """Whether head nodes are raw outputs renormalised per downstream input (``gemma2_heads``)."""
        return self.gemma2_heads == "per-input"

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def window(self, layer: int) -> Optional[int]:
        """The sliding-window size of ``layer``'s attention, or None (full causal)."""
        if self.sliding_window is None or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return None
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """From :meth:`to_dict` (or its JSON); an unknown field is an error naming it."""
        _check_fields(cls, d)
        return cls(**d)  # __post_init__ turns JSON lists and the rope dict back into tuples and Rope

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
