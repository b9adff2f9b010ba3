"""Minimal reproduction of a jit-only miscompilation on the CPU backend (jax/jaxlib 0.10.2),
drafted for an upstream report (github.com/jax-ml/jax issues; this machine has no network).

The VJP of an RMSNorm taken at a broadcast input, contracted with another array, is wrong
under ``jax.jit`` once the input holds >= 152 tokens; eager execution is right. LayerNorm
(subtracting the mean) was not seen to be affected. jaxinterp hit it in its RMSNorm edge
probe (``models._normed_probe``): EAP scores of SmolLM2-135M changed with the batch size.
Its work-around is ``jax.lax.optimization_barrier((x, g))`` before the VJP.

Run: ``python docs/upstream/jax_cpu_rmsnorm_vjp.py`` -> prints the relative error at
151 tokens (~3e-7) and at 152 tokens (~0.17 on jax 0.10.2; expected ~3e-7).
"""

import jax
import jax.numpy as jnp


def rms_norm(w, x):
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + 1e-5) * w


def contracted_vjp(resid, w, g, source):
    x = jnp.broadcast_to(resid[None], g.shape)
    gx = jax.vjp(rms_norm, w, x)[1](g)[1]
    return jnp.einsum("fbpd,vbpd->fv", source, gx)


def relative_error(n_tok: int, d: int = 64, n_dst: int = 27, n_src: int = 10) -> float:
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    w = 1 + 0.1 * jax.random.normal(k[0], (d,))
    resid = jax.random.normal(k[1], (1, n_tok, d))
    g = jax.random.normal(k[2], (n_dst, 1, n_tok, d))
    source = jax.random.normal(k[3], (n_src, 1, n_tok, d))
    got = jax.jit(contracted_vjp)(resid, w, g, source)
    with jax.disable_jit():
        want = contracted_vjp(resid, w, g, source)
    return float(jnp.abs(got - want).max() / jnp.abs(want).max())


if __name__ == "__main__":
    print(jax.__version__, jax.devices()[0].platform)
    for n in (151, 152):
        print(f"{n} tokens: relative error {relative_error(n):.2e}")
