"""How jaxinterp compiles: ``jit``, ``jax.jit`` with the XLA options every program needs.

XLA:CPU (jaxlib 0.10.2) hands reductions to YNNPACK ("YNN reduce fusions"), and such a
fusion computes wrong values once its output holds >= 1 MiB: the backward pass of an
RMSNorm at a broadcast input (every edge probe of an RMSNorm model) was off by up to 2x
its scale from 152 tokens per batch on SmolLM2-135M, in the unrolled and in the scanned
layer loop alike, while eager execution was right. Dropping the YNN reduce fusions (the
YNN dot fusions stay) makes every program right; ``docs/upstream/jax_cpu_rmsnorm_vjp.py``
is the minimal reproduction and tests/test_compiler.py checks it, so a jax release that
changes either the bug or the option's spelling is noticed.

The option is per program (``jax.jit(compiler_options=...)``), not ``XLA_FLAGS``: it then
holds however jaxinterp is imported, without touching the user's other programs. Other
backends do not read ``xla_cpu_*`` options. Use :func:`jit` for every jitted program of
the package (tests/test_compiler.py checks that no module calls ``jax.jit`` directly).
"""

from __future__ import annotations

import functools

import jax

# YNNPACK library fusions XLA:CPU may form: matrix products only (no reductions, above).
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def jit(fun=None, **kwargs):
    """``jax.jit(fun, **kwargs)`` compiled with :data:`COMPILER_OPTIONS` (merged under
    any ``compiler_options`` given); usable as ``functools.partial(jit, static_argnames=...)``."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    kwargs["compiler_options"] = {**COMPILER_OPTIONS, **(kwargs.get("compiler_options") or {})}
    return jax.jit(fun, **kwargs)
