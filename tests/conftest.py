"""Shared fixtures: small random-init Hugging Face checkpoints built in the tests."""

import csv
import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# load_model turns on the persistent compilation cache; tests stay hermetic (test_cache
# gives its subprocesses a cache directory of their own)
os.environ.setdefault("JAXINTERP_COMPILE_CACHE", "0")

from jaxinterp.testing import NAMES, save_random_gpt2  # noqa: E402


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


def write_ioi_csv(path, tokenizer, n=12, seed=0, ragged=False):
    """IOI-shaped pairs over the test vocabulary; ``ragged`` varies prompt lengths."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.choice(NAMES, 3, replace=False)
        place = "school" if (ragged and i % 2) else "the store"
        rows.append({
            "clean": f"When {a} and {b} went to {place} , {b} gave a drink to",
            "corrupted": f"When {a} and {b} went to {place} , {c} gave a drink to",
            "correct_idx": tokenizer.convert_tokens_to_ids(a),
            "incorrect_idx": tokenizer.convert_tokens_to_ids(b),
        })
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="session")
def ioi_csv(tmp_path_factory, model):
    return write_ioi_csv(tmp_path_factory.mktemp("data") / "ioi.csv", model.tokenizer, ragged=True)
