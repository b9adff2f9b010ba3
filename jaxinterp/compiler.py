"""How jaxinterp compiles: ``jit``, ``jax.jit`` with the XLA options every program needs.

XLA:CPU (jaxlib 0.10.2) hands reductions to YNNPACK ("YNN reduce fusions"), and such a
fusion computes wrong values once its output holds >= 1 MiB: the backward pass of an
RMSNorm at a broadcast input (every edge probe of an RMSNorm model) was off by up to 2x
its scale from 152 tokens per batch on SmolLM2-135M, in the unrolled and in the scanned
layer loop alike, while eager execution was right. Dropping the YNN reduce fusions makes
every program right; ``docs/upstream/jax_cpu_rmsnorm_vjp.py`` is the minimal reproduction
and tests/test_compiler.py checks it, so a jax release that changes either the bug or the
option's spelling is noticed.

The YNN dot fusions are off too: jaxinterp's programs ran faster without them (2-core
Xeon with AVX-512, idle, warm processes): SmolLM2-135M EAP, 32 IOI pairs in one batch,
11.7 -> 9.3 s; a 3-size faithfulness curve on it 20.9-23.0 -> 18.2-20.6 s; one EAP batch
at GPT-2-small's shape 3.1-3.2 -> 2.8-3.0 s. (Single matrix products are as fast either
way, 250-290 GFLOP/s, except the [157, 393216] x [393216, 36] edge contraction: 55 -> 33
ms.)

On CPU the programs are also compiled at LLVM optimisation level 1, not 2
(:data:`CPU_OPTIONS`): their time is in library products (Eigen) and in loops XLA
vectorises itself, so level 2's passes lengthened compilation without making the programs
faster (2-core Xeon, one process compiling both, alternating runs: GPT-2-small EAP batch
compiled in 3.6 s instead of 5.0, ran 5.14 s against 5.49 (median of 5); SmolLM2-135M's in
2.9 s instead of 5.0, ran 8.06 against 8.21; a circuit-evaluation batch compiled alike and
ran 3.59 against 3.56 s; the same scores). The level is read by the GPU backends too, for
their kernels, so it is set only where the default backend is the CPU. A level given in
``XLA_FLAGS`` is the user's choice and is kept (a per-program option would override it:
the test suite compiles at level 0, tests/conftest.py).

The options are per program (``jax.jit(compiler_options=...)``), not ``XLA_FLAGS``: they
then hold however jaxinterp is imported, without touching the user's other programs. Other
backends do not read ``xla_cpu_*`` options. Use :func:`jit` for every jitted program of
the package (tests/test_compiler.py checks that no module calls ``jax.jit`` directly).

jax refuses compiler options on a jit nested in another trace, so a program called inside
the caller's ``jax.jit``, ``jax.grad`` or ``jax.vmap`` is traced into it, as a plain
nested jit would be inlined: under the caller's jit its top-level program's options are
the ones XLA uses; under a transformation at top level the function runs as jax runs the
transformed function, op by op (a nested jit without the options would be compiled as its
own program, and the RMSNorm probe's backward, mapped over 2 sources at 152 tokens, was
17% off).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

# YNNPACK library fusions XLA:CPU may form: none (no reductions, and no products either: above).
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# where the default backend is the CPU (above): LLVM's optimisation level 1
CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def options_for(backend: str, given: Optional[dict] = None) -> dict:
    """The compiler options of a program on ``backend`` (``jax.default_backend()``), with
    ``given`` ones taking precedence; :data:`CPU_OPTIONS` only where ``XLA_FLAGS`` does not
    set them."""
    cpu = {k: v for k, v in CPU_OPTIONS.items() if not _in_xla_flags(k)} if backend == "cpu" else {}
    return {**COMPILER_OPTIONS, **cpu, **(given or {})}


def _in_xla_flags(name: str) -> bool:
    """Whether the environment's ``XLA_FLAGS`` set the option ``name``."""
    return any(flag.lstrip("-").split("=")[0] == name for flag in os.environ.get("XLA_FLAGS", "").split())


def jit(fun=None, *, persist: bool = False, **kwargs):
    """``jax.jit(fun, **kwargs)`` compiled with :func:`options_for` the default backend
    (``compiler_options`` given are merged over them); usable as
    ``functools.partial(jit, static_argnames=...)``. The backend is asked at the first call
    (or ``lower``, ``trace``, ...), not here: at import no backend is started.

    persist: keep the traced program on disk when jaxinterp's persistent cache is on
    (:mod:`jaxinterp.cache`), so that a later process skips tracing and lowering it (for the
    large per-batch programs; static arguments are given by keyword)."""
    if fun is None:
        return functools.partial(jit, persist=persist, **kwargs)
    jitted = _Jit(fun, kwargs)
    return _Persisted(fun, jitted, tuple(kwargs.get("static_argnames") or ())) if persist else jitted


class _Jit:
    """``jax.jit(fun, **kwargs)`` with the options of the default backend, made at first use,
    called under the mesh its arguments are laid out on (:func:`jaxinterp.sharding.mesh_of`:
    the graph forward's layout is traced for it); every attribute of the jitted function
    (``lower``, ``trace``, ``eval_shape``, ...) is its own. (The wrapper adds ~10 us to a
    ~35 us dispatch of a tiny program with four arguments, ~8 of them the mesh's lookup.)"""

    def __init__(self, fun, kwargs: dict):
        self.fun, self.kwargs, self.jax_jit = fun, kwargs, None
        functools.update_wrapper(self, fun)

    def wrapped(self):
        """The ``jax.jit`` function, made once: the default backend does not change after a
        backend has started."""
        if self.jax_jit is None:
            import jax

            options = options_for(jax.default_backend(), self.kwargs.get("compiler_options"))
            self.jax_jit = jax.jit(self.fun, **{**self.kwargs, "compiler_options": options})
        return self.jax_jit

    def __call__(self, *args, **kwargs):
        from .sharding import mesh_of

        with mesh_of(args + tuple(kwargs.values())):
            try:
                return self.wrapped()(*args, **kwargs)
            except ValueError as error:  # jax refuses compiler options on a jit nested in a trace
                if "compiler_options" not in str(error):
                    raise
        # inside the caller's transformation (jit, grad, vmap, ...): traced into it, as
        # jax.jit inlines a nested jit; the caller's top-level program carries its options
        return self.fun(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("fun", "kwargs", "jax_jit") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.wrapped(), name)


class _Persisted:
    """A jitted function that runs the exported program of :func:`jaxinterp.cache.exported_program`
    where there is one (compiled with :func:`options_for` like every program), else
    the jitted function itself (inside another trace, with the cache off, ...)."""

    def __init__(self, fun, jitted, static_argnames: tuple):
        self.fun, self.jitted, self.static_argnames = fun, jitted, static_argnames
        self.calls = {}  # id(exported program) -> its jitted call (the cache keeps the programs alive)
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        from .cache import compiled_program, exported_program

        static = {k: kwargs[k] for k in self.static_argnames if k in kwargs}
        dynamic = {k: v for k, v in kwargs.items() if k not in static}
        exported = exported_program(self.fun, static, args, dynamic)
        if exported is None:
            return self.jitted(*args, **kwargs)
        if id(exported) not in self.calls:
            self.calls[id(exported)] = compiled_program(exported, args, dynamic) or jit(exported.call)
        return self.calls[id(exported)](*args, **dynamic)

    def lower(self, *args, **kwargs):  # AOT (jaxinterp plan) lowers the jitted function itself
        return self.jitted.lower(*args, **kwargs)
