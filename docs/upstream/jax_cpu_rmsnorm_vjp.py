"""Minimal reproduction of a jit-only miscompilation on the CPU backend (jax/jaxlib 0.10.2),
drafted for an upstream report (github.com/jax-ml/jax or openxla/xla issues; this machine
has no network).

The VJP of an RMSNorm taken at a broadcast input, contracted with another array, is wrong
under ``jax.jit`` once the broadcast cotangent holds >= 1 MiB (here 27 x 152 x 64 float32;
27 x 151 x 64 is right); eager execution is right. jaxinterp hit it in its RMSNorm edge
probe (``models._normed_probe``): EAP scores of SmolLM2-135M changed with the batch size.

Cause: XLA:CPU's YNNPACK reduce fusion. After optimisation the norm's backward is one
``kind=kCustom`` fusion with ``"fusion_config":{"kind":"__ynn_fusion"}`` whose root is the
``f32[27,1,152,64]`` cotangent (it contains the norm's ``reduce``); its values are wrong.
What was tried, with ``XLA_FLAGS`` (relative error at 152 tokens; right is ~3e-7):

* ``--xla_cpu_experimental_ynn_fusion_type=-reduce`` or ``=`` (none): 3e-7, right;
* ``-dot``, ``-eltwise``, ``-individual_dot``: 0.17, still wrong;
* ``--xla_backend_optimization_level=0``, ``--xla_cpu_use_fusion_emitters=false``,
  ``--xla_cpu_enable_fast_math=false``, ``--xla_cpu_use_xnnpack=false``,
  ``--xla_cpu_multi_thread_eigen=false``, ``--xla_cpu_parallel_codegen_split_count=1``,
  ``--xla_cpu_use_thunk_runtime=false``: 0.17, still wrong.

The same fusion also breaks the vjp taken at ``resid`` itself and mapped over the
cotangents (``jax.vmap(jax.vjp(norm, w, resid)[1])(g)``, jaxinterp's form since session 10,
which avoids a transposing copy of ``g``), and from smaller sizes: 32 x 15 tokens x 64 with
12 cotangents gives 0.15 (LayerNorm) and 0.14 (RMSNorm) under a plain ``jax.jit``, ~3e-7 with
the YNN reduce fusion off.

Per program, ``jax.jit(f, compiler_options={"xla_cpu_experimental_ynn_fusion_type":
"LIBRARY_FUSION_TYPE_DOT"})`` keeps the YNN dot fusions and is right; that was jaxinterp's
work-around (``jaxinterp.compiler``) until it turned the YNN dot fusions off as well
(``""``: faster for its programs), with ``tests/test_compiler.py`` keeping a strict xfail
on plain ``jax.jit`` to notice the fix.

Run: ``python docs/upstream/jax_cpu_rmsnorm_vjp.py`` -> prints the relative error at
151 tokens (~3e-7) and at 152 tokens (~0.17 on jax 0.10.2; expected ~3e-7), then at 152
tokens with the YNN reduce fusion off (~3e-7).
"""

import jax
import jax.numpy as jnp


def rms_norm(w, x):
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + 1e-5) * w


def contracted_vjp(resid, w, g, source):
    x = jnp.broadcast_to(resid[None], g.shape)
    gx = jax.vjp(rms_norm, w, x)[1](g)[1]
    return jnp.einsum("fbpd,vbpd->fv", source, gx)


def relative_error(n_tok: int, d: int = 64, n_dst: int = 27, n_src: int = 10, compiler_options=None) -> float:
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    w = 1 + 0.1 * jax.random.normal(k[0], (d,))
    resid = jax.random.normal(k[1], (1, n_tok, d))
    g = jax.random.normal(k[2], (n_dst, 1, n_tok, d))
    source = jax.random.normal(k[3], (n_src, 1, n_tok, d))
    got = jax.jit(contracted_vjp, compiler_options=compiler_options)(resid, w, g, source)
    with jax.disable_jit():
        want = contracted_vjp(resid, w, g, source)
    return float(jnp.abs(got - want).max() / jnp.abs(want).max())


if __name__ == "__main__":
    print(jax.__version__, jax.devices()[0].platform)
    for n in (151, 152):
        print(f"{n} tokens: relative error {relative_error(n):.2e}")
    no_ynn_reduce = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
    print(f"152 tokens, YNN reduce fusion off: relative error {relative_error(152, compiler_options=no_ynn_reduce):.2e}")
