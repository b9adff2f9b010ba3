"""``Model``: a loaded model, what every method takes.

A :class:`Model` holds the architecture (:class:`jaxinterp.config.ModelConfig`), the
parameters, the tokenizer, the circuit graph's grouped-query view chosen at load time
(``grouped_kv``) and what the checkpoint said beyond the architecture
(:class:`jaxinterp.config.Origin`). :func:`jaxinterp.loading.load_model` makes one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax.numpy as jnp

from . import models
from .compiler import jit
from .config import ModelConfig, Origin
from .graph import GraphSpec


@dataclasses.dataclass
class Model:
    """A converted model: config, parameters (jax arrays) and, if present, its tokenizer.

    ``model(tokens [batch, pos], attention_mask [batch, pos]) -> logits [batch, pos, vocab]``
    (float32).

    grouped_kv: the circuit graph's view (:attr:`graph_spec`): grouped-query attention's
        ``<k>``/``<v>`` inputs per key/value head, or (False, the default) one per query
        head as the reference has them; see :mod:`jaxinterp.graph`. Logits do not depend on it.
    origin: the checkpoint's conversion facts (None when not known, e.g. a model built in code).
    """

    cfg: ModelConfig
    params: Any
    tokenizer: Any = None
    path: Optional[str] = None
    grouped_kv: bool = False
    origin: Optional[Origin] = None

    def __call__(self, tokens, attention_mask=None):
        return jit_forward(self.cfg)(self.params, jnp.asarray(tokens),
                                     None if attention_mask is None else jnp.asarray(attention_mask))

    @property
    def graph_spec(self) -> GraphSpec:
        """The circuit graph in this model's view."""
        return GraphSpec.from_config(self.cfg, self.grouped_kv)


@functools.lru_cache(maxsize=None)
def jit_forward(cfg: ModelConfig):
    """``fn(params, tokens, attention_mask or None) -> logits``: the plain forward of
    ``cfg``, jitted once per config."""
    return jit(lambda p, t, m: models.forward(p, cfg, t, m))


__all__ = ["Model", "jit_forward"]
