"""``load_model``: a Hugging Face directory or a converted one, as a callable model."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .graph import GraphSpec
from . import models


@dataclasses.dataclass
class Model:
    """A converted model: config, parameters (jax arrays) and, if present, its tokenizer.

    ``model(tokens [batch, pos], attention_mask [batch, pos]) -> logits [batch, pos, vocab]``
    (float32).
    """

    cfg: ModelConfig
    params: Any
    tokenizer: Any = None
    path: Optional[str] = None

    def __call__(self, tokens, attention_mask=None):
        return _jit_forward(self.cfg)(self.params, jnp.asarray(tokens),
                                      None if attention_mask is None else jnp.asarray(attention_mask))

    @property
    def graph_spec(self) -> GraphSpec:
        return GraphSpec.from_config(self.cfg)


@functools.lru_cache(maxsize=None)
def _jit_forward(cfg: ModelConfig):
    return jax.jit(lambda p, t, m: models.forward(p, cfg, t, m))


def load_tokenizer(path: str):
    """The ``AutoTokenizer`` saved in ``path``, or None when the directory has none."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: str, dtype=jnp.float32) -> Model:
    """Load a Hugging Face checkpoint directory or a directory written by ``jaxinterp convert``."""
    from .conversion import is_converted, load_converted, load_hf_checkpoint

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    cfg, params = load_converted(path) if is_converted(path) else load_hf_checkpoint(path)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return Model(cfg, params, load_tokenizer(path), path)
