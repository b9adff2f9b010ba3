"""Shared fixtures: small random-init Hugging Face checkpoints built in the tests."""

import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound (a test runs for ~0.1 s what XLA took ~10 s to compile), so
# it compiles without LLVM's backend optimisation: ~40% less compile time, results equal
# to ~1e-6 of their scale. What the tests guard lives above LLVM: the one miscompilation
# found so far (docs/upstream/jax_cpu_rmsnorm_vjp.py) reproduces at level 0 as at the
# default. JAXINTERP_TEST_XLA_OPT=default runs the suite exactly as users compile.
if os.environ.get("JAXINTERP_TEST_XLA_OPT", "0") != "default":
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
# load_model turns on the persistent compilation cache; tests stay hermetic (test_cache
# gives its subprocesses a cache directory of their own)
os.environ.setdefault("JAXINTERP_COMPILE_CACHE", "0")

from devtools.testing import save_random_gpt2, write_ioi_csv  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leaked_compile_cache():
    """A test that runs a command in-process (a sweep turns on jax's persistent cache in
    its output directory) must not leave the cache on for the tests after it: their
    programs would be written to a directory that pytest removes, and a CI run segfaulted
    inside XLA's compile with it on."""
    import jax
    from jax._src import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free every compiled program after each test module. Each one keeps its machine code
    in its own memory mappings (~3 per kernel); one process running the whole suite
    accumulated tens of thousands (Linux allows 65,530 per process), and CI's run died of
    a segfault inside XLA's compiler ~200 tests in. Later modules recompile what they
    share (~the same time: the suite rarely reuses a program across modules)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """2 layers, 4 heads, d_model 64, tied embeddings."""
    return save_random_gpt2(str(tmp_path_factory.mktemp("gpt2")), n_layer=2, n_head=4, n_embd=64, seed=0)


@pytest.fixture(scope="session")
def model(gpt2_dir):
    from jaxinterp import load_model

    return load_model(gpt2_dir)


def padded_batch(vocab, n_pos=11, seed=0):
    """Random ids ``[3, n_pos]`` right-padded to lengths ``n_pos, 7, 3``: (ids, mask, lengths)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(3, n_pos))
    lengths = np.array([n_pos, 7, 3])
    mask = (np.arange(n_pos)[None] < lengths[:, None]).astype(np.int64)
    return np.where(mask > 0, ids, 0), mask, lengths


@pytest.fixture(scope="session")
def ioi_csv(tmp_path_factory, model):
    return write_ioi_csv(tmp_path_factory.mktemp("data") / "ioi.csv", model.tokenizer, ragged=True)
