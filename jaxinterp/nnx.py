"""A Flax NNX module view of a converted model, for users who compose with Flax.

    from jaxinterp import load_model
    from jaxinterp.nnx import Transformer

    view = Transformer.from_model(load_model("gpt2"))       # or mesh=make_mesh(2, 4)
    logits = view(tokens)                                   # == model(tokens)
    optimizer = nnx.Optimizer(view, optax.adam(1e-4), wrt=nnx.Param)

Every parameter is an ``nnx.Param`` holding the same array as ``model.params`` (a view,
not a copy). Its ``out_sharding`` metadata is the leaf's logical axes from the layout
table (:data:`jaxinterp.layout.LEAVES`), e.g. ``("layer", "head", "d_model", "d_head")``
for ``blocks/attn/w_q``. On a mesh the arrays are placed by
:func:`jaxinterp.sharding.shard_params`, and each ``Param`` also carries
``sharding_rules``: its own logical axes resolved for that mesh (``kv_head -> None``
where 2 key/value heads do not divide a 4-way ``model`` axis; ``d_model -> model`` for the
attention projections, :data:`jaxinterp.sharding.LEAF_RULES`), so
``nnx.get_partition_spec(nnx.state(view))`` gives exactly :func:`jaxinterp.sharding.param_specs`.
Without a mesh, :data:`LOGICAL_RULES` (the table of :data:`jaxinterp.sharding.MESH_RULES`)
resolves the names in a Flax ``logical_axis_rules`` context; one table per axis name cannot
hold the per-leaf exceptions (the attention projections split along d_model, not by heads),
so for jaxinterp's own layout give ``mesh=``.

There is no second forward: ``__call__`` unwraps the parameters and calls
:func:`jaxinterp.models.forward` (interventions included, through its keyword arguments),
on a mesh under :func:`jaxinterp.sharding.on_mesh`, so that the node outputs it returns
(``return_node_outputs=True``) are split along d_model as jaxinterp's methods split them;
inside the caller's ``nnx.jit`` the parameters are read in their own layout, so a training
step returns them in it.
The config stays a static attribute, so ``nnx.split``/``nnx.merge``/``nnx.jit`` treat it
as part of the graph definition, as ``jax.jit`` treats it as a static argument.

Flax is imported here only: the rest of jaxinterp never pays its import time.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from flax import nnx

from . import layout, models, sharding
from .config import ModelConfig

# Logical axis -> mesh axis (None: replicated), as Flax's ``logical_axis_rules`` want them.
# Every axis of the table is listed: Flax passes a name without a rule through unchanged,
# and a logical name is not a mesh axis.
LOGICAL_RULES = tuple((axis, sharding.MESH_RULES.get(axis))
                      for axis in dict.fromkeys(a for leaf in layout.LEAVES.values() for a in leaf.axes))


def _is_param(x) -> bool:
    return isinstance(x, nnx.Variable)


class Transformer(nnx.Module):
    """``Transformer(cfg, params, mesh=None)``: ``params`` is a pytree of the layout
    table's leaves (checked); ``mesh`` a ``("data", "model")`` mesh to place them on.

    ``view(tokens [batch, pos], attention_mask [batch, pos] = None, **kwargs)`` returns
    float32 logits ``[batch, pos, vocab]``, exactly :func:`jaxinterp.models.forward`
    (``kwargs`` are its own: ``intervention``, ``logit_positions``, ...).
    """

    def __init__(self, cfg: ModelConfig, params, *, mesh: Optional[jax.sharding.Mesh] = None):
        layout.check_params(params, cfg, "Transformer params")
        specs = None
        if mesh is not None:
            params = sharding.shard_params(params, mesh)
            specs = layout.flatten(sharding.param_specs(params, dict(mesh.shape)))
        flat = {}
        for path, value in layout.flatten(params).items():
            axes = layout.LEAVES[path].axes
            meta = {"out_sharding": axes}
            if specs is not None:  # this param's own resolution: a mesh axis may not divide it
                meta["sharding_rules"] = tuple(zip(axes, tuple(specs[path])))
            # eager_sharding off: the arrays are already placed; Flax would otherwise try
            # to place them by the logical names themselves
            flat[path] = nnx.Param(value, eager_sharding=False, **meta)
        self.cfg = cfg
        self.mesh = mesh  # static, like cfg: __call__ traces under it (sharding.on_mesh)
        self.params = nnx.data(layout.unflatten(flat))

    @classmethod
    def from_model(cls, model, mesh: Optional[jax.sharding.Mesh] = None) -> "Transformer":
        """The view of a :class:`jaxinterp.loading.Model` (its arrays, not copies)."""
        return cls(model.cfg, model.params, mesh=mesh)

    def param_tree(self) -> Any:
        """The plain parameter pytree (arrays) that :func:`jaxinterp.models.forward` reads."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_param)

    def to_model(self, tokenizer=None):
        """A :class:`jaxinterp.loading.Model` with this view's current parameters (e.g.
        after training), for jaxinterp's methods."""
        from .loading import Model

        return Model(self.cfg, self.param_tree(), tokenizer)

    def __call__(self, tokens, attention_mask=None, **kwargs):
        # on a mesh the graph forward splits its node outputs over the model axis, as
        # jaxinterp's own methods do (jaxinterp.sharding.split_nodes); inside the caller's
        # jit (nnx.jit: the parameters are tracers) jax.set_mesh is refused, and the
        # abstract mesh is what tracing reads
        params = self.param_tree()
        traced = self.mesh is not None and any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(params))
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh) if traced else sharding.on_mesh(self.mesh):
            if traced:
                # read in their own layout (sharding.param_specs), so that their gradients, and
                # what the caller's optimizer makes of them, keep it too: left to XLA, the
                # vectors along d_model (norms, biases) came back split along it, like the
                # attention projections around them (sharding.LEAF_RULES)
                params = jax.lax.with_sharding_constraint(params, sharding.param_specs(params, dict(self.mesh.shape)))
            return models.forward(params, self.cfg, tokens, attention_mask, **kwargs)


__all__ = ["Transformer", "LOGICAL_RULES"]
