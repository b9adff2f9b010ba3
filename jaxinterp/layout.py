"""The parameter layout: every leaf of the parameter pytree, once.

:data:`LEAVES` maps each leaf's path to its logical axes (the axis vocabulary of the
README; ``ctx`` is the learned-position table's ``n_ctx`` axis) and to the switches that
make it present. Everything else that needs the layout derives it from here:

* shapes without weights: :func:`abstract_params` (and :func:`jaxinterp.memory.abstract_params`);
* sharding: :data:`jaxinterp.sharding.PARAM_AXES` and :func:`jaxinterp.sharding.logical_axes`;
* initialisation of the demo model: :func:`devtools.train_demo.init_params` (development code, not installed);
* the converters' output and restored checkpoints: :func:`check_params`;
* the Flax NNX view's ``nnx.Param`` sharding metadata: :mod:`jaxinterp.nnx`.

The forward (:mod:`jaxinterp.models`, :mod:`jaxinterp.ops`) reads optional leaves by
their presence (``p.get("b_o")``, ``"w_gate" in p``); :func:`check_params` is what keeps
presence and the config's switches in agreement, so both ways of deciding give one answer.

Print the table with ``python -m jaxinterp.layout`` (:func:`describe`; with a config, the
leaves it has and their sizes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import numpy as np

Path = tuple[str, ...]


class LayoutError(ValueError):
    """A parameter pytree that does not match the layout (the message names the leaf)."""


# Switches: the config predicates that make an optional leaf present. The forward reads
# the leaves' presence; these say which leaves a config's checkpoint must have.
SWITCHES: dict[str, Callable[[Any], bool]] = {
    "learned_positions": lambda cfg: cfg.positional == "learned",
    "layernorm": lambda cfg: cfg.norm == "layernorm",  # RMSNorm has no bias
    "qkv_bias": lambda cfg: cfg.qkv_bias,
    "out_bias": lambda cfg: cfg.out_bias,
    "mlp_bias": lambda cfg: cfg.mlp_bias,
    "gated_mlp": lambda cfg: cfg.gated_mlp,
    "sandwich_norms": lambda cfg: cfg.sandwich_norms,
    # The forward adds an unembedding bias when one is given, but no supported family
    # has one, so no converted checkpoint may carry it.
    "unembed_bias": lambda cfg: False,
}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter leaf: its logical axes and the switches that must all hold for it to
    be present (none: always present)."""

    axes: tuple[str, ...]
    when: tuple[str, ...] = ()


def _norm(group: Path, lead: tuple[str, ...], when: tuple[str, ...] = ()) -> dict[Path, Leaf]:
    return {group + ("w",): Leaf(lead + ("d_model",), when),
            group + ("b",): Leaf(lead + ("d_model",), when + ("layernorm",))}


_L = ("layer",)
# Insertion order is the order leaves are initialised in (train_demo draws its random
# numbers leaf by leaf in this order).
LEAVES: dict[Path, Leaf] = {
    ("embed", "w_e"): Leaf(("vocab", "d_model")),
    ("embed", "w_pos"): Leaf(("ctx", "d_model"), ("learned_positions",)),
    **_norm(("blocks", "ln1"), _L),
    ("blocks", "attn", "w_q"): Leaf(_L + ("head", "d_model", "d_head")),
    ("blocks", "attn", "b_q"): Leaf(_L + ("head", "d_head"), ("qkv_bias",)),
    ("blocks", "attn", "w_k"): Leaf(_L + ("kv_head", "d_model", "d_head")),
    ("blocks", "attn", "b_k"): Leaf(_L + ("kv_head", "d_head"), ("qkv_bias",)),
    ("blocks", "attn", "w_v"): Leaf(_L + ("kv_head", "d_model", "d_head")),
    ("blocks", "attn", "b_v"): Leaf(_L + ("kv_head", "d_head"), ("qkv_bias",)),
    ("blocks", "attn", "w_o"): Leaf(_L + ("head", "d_head", "d_model")),
    ("blocks", "attn", "b_o"): Leaf(_L + ("d_model",), ("out_bias",)),
    **_norm(("blocks", "ln1_post"), _L, ("sandwich_norms",)),  # on the attention output (Gemma 2)
    **_norm(("blocks", "ln2"), _L),
    ("blocks", "mlp", "w_in"): Leaf(_L + ("d_model", "d_mlp")),
    ("blocks", "mlp", "b_in"): Leaf(_L + ("d_mlp",), ("mlp_bias",)),
    ("blocks", "mlp", "w_gate"): Leaf(_L + ("d_model", "d_mlp"), ("gated_mlp",)),
    ("blocks", "mlp", "b_gate"): Leaf(_L + ("d_mlp",), ("gated_mlp", "mlp_bias")),
    ("blocks", "mlp", "w_out"): Leaf(_L + ("d_mlp", "d_model")),
    ("blocks", "mlp", "b_out"): Leaf(_L + ("d_model",), ("mlp_bias",)),
    **_norm(("blocks", "ln2_post"), _L, ("sandwich_norms",)),  # on the MLP output (Gemma 2)
    **_norm(("ln_f",), ()),
    ("unembed", "w_u"): Leaf(("d_model", "vocab")),  # present also when tied (a copy of w_e.T)
    ("unembed", "b_u"): Leaf(("vocab",), ("unembed_bias",)),
}


def axis_sizes(cfg) -> dict[str, int]:
    """Each logical axis's size for ``cfg`` (a :class:`jaxinterp.config.ModelConfig`)."""
    return {"layer": cfg.n_layers, "head": cfg.n_heads, "kv_head": cfg.n_kv_heads, "d_model": cfg.d_model,
            "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "vocab": cfg.vocab_size, "ctx": cfg.n_ctx}


def present(path: Path, cfg) -> bool:
    """Whether ``cfg``'s parameters have the leaf at ``path`` (a key of :data:`LEAVES`)."""
    return all(SWITCHES[s](cfg) for s in LEAVES[path].when)


def shapes(cfg) -> dict[Path, tuple[int, ...]]:
    """Path -> shape of every leaf ``cfg``'s parameters have, in :data:`LEAVES` order."""
    sizes = axis_sizes(cfg)
    return {path: tuple(sizes[a] for a in leaf.axes) for path, leaf in LEAVES.items() if present(path, cfg)}


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """``{("blocks", "attn", "w_q"): x, ...}`` -> the nested dict pytree."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def flatten(params) -> dict[Path, Any]:
    """The nested dict pytree -> ``{path: leaf}`` (paths as tuples of strings)."""
    import jax

    return {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def abstract_params(cfg, dtype=np.float32) -> dict:
    """The parameter pytree of ``cfg`` as ``jax.ShapeDtypeStruct`` leaves (no weights)."""
    import jax

    return unflatten({path: jax.ShapeDtypeStruct(shape, dtype) for path, shape in shapes(cfg).items()})


def param_count(cfg) -> int:
    """Number of parameters (tied embeddings counted twice, as they are stored)."""
    return sum(math.prod(s) for s in shapes(cfg).values())


def leaf_axes(path: Path) -> Optional[tuple[str, ...]]:
    """Logical axes of the leaf at ``path``, matched on the longest suffix in
    :data:`LEAVES` (a parameter tree nested one level deeper still resolves); None if none."""
    for start in range(len(path)):
        leaf = LEAVES.get(tuple(path[start:]))
        if leaf is not None:
            return leaf.axes
    return None


def check_params(params, cfg, source: str = "parameters") -> None:
    """Raise :class:`LayoutError` unless ``params`` has exactly the leaves of ``cfg``'s
    layout with their shapes: a missing leaf, an extra one or a wrong shape is named with
    the switches that decide it. ``source`` starts the message (e.g. a checkpoint path)."""
    want = shapes(cfg)
    got = {path: tuple(np.shape(a)) for path, a in flatten(params).items()}

    def name(path: Path) -> str:
        return "/".join(path)

    def why(path: Path) -> str:
        when = LEAVES[path].when if path in LEAVES else ()
        return f" (present when {' and '.join(when)})" if when else ""

    missing = [p for p in want if p not in got]
    if missing:
        raise LayoutError(f"{source}: missing parameter {name(missing[0])} {list(LEAVES[missing[0]].axes)}"
                          f"{why(missing[0])}" + (f" and {len(missing) - 1} more: "
                                                  f"{[name(p) for p in missing[1:6]]}" if len(missing) > 1 else ""))
    extra = [p for p in got if p not in want]
    if extra:
        p = extra[0]
        reason = ("is not a leaf of jaxinterp.layout.LEAVES" if p not in LEAVES
                  else f"is not expected for this config{why(p)}")
        raise LayoutError(f"{source}: unexpected parameter {name(p)}: it {reason}"
                          + (f"; also {[name(q) for q in extra[1:6]]}" if len(extra) > 1 else ""))
    for path, shape in want.items():
        if got[path] != shape:
            axes = ", ".join(f"{a}={n}" for a, n in zip(LEAVES[path].axes, shape))
            raise LayoutError(f"{source}: parameter {name(path)} has shape {got[path]}, expected {shape} "
                              f"[{axes}]")


def describe(cfg=None) -> str:
    """The table as text: path, logical axes (with sizes for ``cfg``) and switches."""
    sizes = axis_sizes(cfg) if cfg is not None else {}
    lines = []
    for path, leaf in LEAVES.items():
        if cfg is not None and not present(path, cfg):
            continue
        axes = ", ".join(f"{a}={sizes[a]}" if sizes else a for a in leaf.axes)
        lines.append(f"{'/'.join(path):20} [{axes}]" + (f"  {' and '.join(leaf.when)}" if leaf.when else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
