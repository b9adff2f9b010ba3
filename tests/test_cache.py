"""The persistent compilation cache (jaxinterp.cache) and the shape buckets that let
runs reuse its programs.

A second process running the same ``jaxinterp attribute`` command must compile nothing:
jax times every request to compile (``/jax/core/compile/backend_compile_duration``,
answered by compiling or from the persistent cache) and reports every cache hit; the
second process's requests must all be hits. Nor may it trace the attribution program
again (it runs the exported one the first process kept). Bucketed batch sizes
and padded lengths must not change the scores.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxinterp.cache import ENV, configured_dir, default_dir
from jaxinterp.data import Pairs, bucket, bucket_length, length_bucket

# Runs the CLI with jax's compile and cache events counted; prints them as JSON last.
COUNTING = """
import json, sys
from jax import monitoring
counts = {"requests": 0, "hits": 0}
def on_duration(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":  # around every compile, cached or not
        counts["requests"] += 1
def on_event(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
monitoring.register_event_duration_secs_listener(on_duration)
monitoring.register_event_listener(on_event)
import functools
import jaxinterp.attribution as attribution
traced = attribution.batch_scores.fun
@functools.wraps(traced)  # the same name: the cache's key names the function
def counted(*args, **kwargs):  # runs only when the attribution program is traced
    counts["traced"] = counts.get("traced", 0) + 1
    return traced(*args, **kwargs)
attribution.batch_scores.fun = counted
from jaxinterp.cli import main
status = main(sys.argv[1:])
print(json.dumps(counts))
sys.exit(status)
"""


def test_configured_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_dir() == os.path.join(str(tmp_path), "jaxinterp", "xla")
    for off in ("0", "off", "FALSE", "no"):
        assert configured_dir(off) is None
    assert configured_dir("1") == default_dir()
    assert configured_dir(str(tmp_path / "c")) == str(tmp_path / "c")
    monkeypatch.delenv(ENV, raising=False)
    assert configured_dir() == default_dir()
    monkeypatch.setenv(ENV, "0")
    assert configured_dir() is None


def _attribute(gpt2_dir, ioi_csv, out, cache, extra=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{ENV: str(cache)})
    proc = subprocess.run([sys.executable, "-c", COUNTING, "attribute", "--model", gpt2_dir, "--data", ioi_csv,
                           "--method", "EAP", "--batch-size", "4", "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _entries(cache):
    return sorted(p for p in os.listdir(cache)) if os.path.isdir(cache) else []


def test_second_process_compiles_nothing(gpt2_dir, ioi_csv, tmp_path):
    cache = tmp_path / "xla"
    first = _attribute(gpt2_dir, ioi_csv, tmp_path / "a.json", cache)
    entries = _entries(cache)
    assert first["requests"] > 0 and first["hits"] == 0 and first["traced"] == 1 and entries
    assert [f.startswith("batch_scores-") for f in os.listdir(cache / "exported")] == [True]
    assert [f.startswith("batch_scores-") for f in os.listdir(cache / "executables")] == [True]
    second = _attribute(gpt2_dir, ioi_csv, tmp_path / "b.json", cache)
    # every compile request a hit, no "traced"; the attribution program is not even looked
    # up in jax's cache: its executable is loaded as it was kept (cache.compiled_program)
    assert second["requests"] == second["hits"] < first["requests"] and "traced" not in second, (first, second)
    assert _entries(cache) == entries
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    # turned off: nothing read or written, the program traced and compiled as plain jax.jit
    off = _attribute(gpt2_dir, ioi_csv, tmp_path / "c.json", cache, ["--no-compile-cache"])
    assert off == {"requests": first["requests"], "hits": 0} and _entries(cache) == entries
    c = json.loads((tmp_path / "c.json").read_text())
    assert a == b == c  # the exported program computes the jitted function's numbers, to the bit


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 5, 7, 9, 13, 17, 25, 33, 100)] == [1, 2, 3, 6, 8, 12, 16, 24, 32, 48, 128]
    rng = np.random.default_rng(0)
    clean = rng.integers(1, 50, (5, 11)).astype(np.int32)
    lengths = np.array([11, 9, 4, 11, 7], np.int32)
    mask = (np.arange(11)[None] < lengths[:, None]).astype(np.int32)
    pairs = Pairs(clean, clean[::-1].copy(), mask, lengths, np.ones((5, 2), np.int32))
    batch = next(pairs.batches(16))  # fewer examples than the batch size: 6 rows, not 16
    assert batch["clean"].shape == (6, 11) and batch["weight"].tolist() == [1, 1, 1, 1, 1, 0]
    assert [b["clean"].shape[0] for b in pairs.batches(2)] == [2, 2, 2]
    padded = bucket_length(pairs, n_ctx=64)
    assert padded.n_pos == 12 and (padded.attention_mask[:, 11] == 0).all()
    assert (padded.clean[:, :11] == clean).all() and (padded.lengths == lengths).all()
    assert bucket_length(pairs, n_ctx=11).n_pos == 11  # never past the model's context


def test_length_buckets_pad_at_most_a_quarter():
    """Padded lengths: at least 8, four per doubling, never more than 25% padding."""
    assert [length_bucket(n) for n in (1, 8, 9, 11, 13, 15, 17, 19, 21, 25, 29, 33, 100)] == \
        [8, 8, 10, 12, 14, 16, 20, 20, 24, 28, 32, 40, 112]
    lengths = np.arange(1, 5000)
    padded = np.array([length_bucket(n) for n in lengths])
    assert (padded >= lengths).all() and (padded <= np.maximum(8, 1.25 * lengths)).all()
    assert len(np.unique(padded[(lengths > 64) & (lengths <= 128)])) == 4


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs"])
def test_bucketed_scores_equal_exact_length(model, ioi_csv, method):
    """Scores on the data padded to its length bucket (and beyond) equal the scores at its
    own length, relative to their scale."""
    import jax

    from jaxinterp.attribution import batch_scores
    from jaxinterp.interventions import prepare_data

    pairs, metric = prepare_data(model, ioi_csv, "logit_diff")
    kw = dict(cfg=model.cfg, method=method, metric=metric, ig_steps=2 if "IG" in method else 1)

    def scores(p):
        return sum(np.asarray(jax.device_get(batch_scores(model.params, b, **kw)), np.float64)
                   for b in p.batches(5))

    exact = scores(pairs)
    assert bucket_length(pairs, model.cfg.n_ctx).n_pos > pairs.n_pos  # the test pads at all
    scale = np.abs(exact).max()
    for padded in (bucket_length(pairs, model.cfg.n_ctx), pairs.padded_to(pairs.n_pos + 9)):
        np.testing.assert_allclose(scores(padded), exact, rtol=0, atol=2e-5 * scale)


def test_an_executable_that_cannot_be_kept_is_compiled_once(tmp_path):
    """Where the executables cannot be written (here a file stands where their directory
    would be), a persisted function still runs, right, and XLA compiles it once, not once to
    keep it and once more to run it."""
    import jax
    import jax.numpy as jnp

    from jaxinterp import cache
    from jaxinterp.compiler import jit

    compiles = []

    def on_duration(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        assert cache.enable_compile_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
        (tmp_path / "xla" / "executables").write_text("not a directory")
        f = jit(lambda a, *, k: (jnp.sin(a) * k).sum(0), persist=True, static_argnames=("k",))
        np.testing.assert_allclose(f(x, k=3), (np.sin(x) * 3).sum(0), rtol=1e-6)
        assert len(compiles) == 1
        np.testing.assert_allclose(f(x, k=3), (np.sin(x) * 3).sum(0), rtol=1e-6)
        assert len(compiles) == 1  # the compiled program is reused in the process
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        cache.disable_compile_cache()


def test_exported_program_key(tmp_path):
    """A persisted function is traced once per key: its static arguments and its
    arguments' shapes and dtypes; a later caller (here: the same process with its
    programs forgotten, as a new process) reads the program from disk and traces nothing."""
    import jax.numpy as jnp

    from jaxinterp import cache
    from jaxinterp.compiler import jit

    calls = []

    def scaled_sum(x, *, k):
        calls.append(k)  # runs only when traced
        return (x * k).sum(0)

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    try:
        assert cache.enable_compile_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
        f = jit(scaled_sum, persist=True, static_argnames=("k",))
        np.testing.assert_array_equal(f(x, k=2), (x * 2).sum(0))
        np.testing.assert_array_equal(f(x, k=2), (x * 2).sum(0))
        assert calls == [2] and len(os.listdir(tmp_path / "xla" / "exported")) == 1
        assert len(os.listdir(tmp_path / "xla" / "executables")) == 1  # its compiled program
        cache._programs.clear()
        g = jit(scaled_sum, persist=True, static_argnames=("k",))
        np.testing.assert_array_equal(g(x, k=2), (x * 2).sum(0))
        assert calls == [2]  # read back, not traced
        g(x, k=3)  # another static argument
        g(x[:2], k=2)  # another shape
        g(jnp.asarray(x, jnp.bfloat16), k=2)  # another dtype
        assert calls == [2, 3, 2, 2] and len(os.listdir(tmp_path / "xla" / "exported")) == 4
        assert len(os.listdir(tmp_path / "xla" / "executables")) == 4
        # a damaged (truncated) file is exported (compiled) again and rewritten, not an error
        for path in [*(tmp_path / "xla" / "exported").iterdir(), *(tmp_path / "xla" / "executables").iterdir()]:
            path.write_bytes(path.read_bytes()[:50])
        cache._programs.clear()
        h = jit(scaled_sum, persist=True, static_argnames=("k",))
        np.testing.assert_array_equal(h(x, k=2), (x * 2).sum(0))
        assert calls == [2, 3, 2, 2, 2]
        cache._programs.clear()
        np.testing.assert_array_equal(jit(scaled_sum, persist=True, static_argnames=("k",))(x, k=2), (x * 2).sum(0))
        assert calls == [2, 3, 2, 2, 2]  # the rewritten file reads back
        # the damaged executable was removed and compiled again by XLA, jax's own cache (which
        # holds the program) bypassed: an executable read from it cannot be kept on XLA:CPU
        assert len(os.listdir(tmp_path / "xla" / "executables")) == 4
        # executables gone, jax's cache full (as after an update of jaxinterp that changed no
        # program): each is compiled and kept again, once, and what is kept runs
        for path in (tmp_path / "xla" / "executables").iterdir():
            path.unlink()
        cache._programs.clear()
        np.testing.assert_array_equal(jit(scaled_sum, persist=True, static_argnames=("k",))(x, k=2), (x * 2).sum(0))
        assert len(os.listdir(tmp_path / "xla" / "executables")) == 1
        cache._programs.clear()
        np.testing.assert_array_equal(jit(scaled_sum, persist=True, static_argnames=("k",))(x, k=2), (x * 2).sum(0))
        assert calls == [2, 3, 2, 2, 2]  # nothing traced: the exported program read, its executable loaded
    finally:
        cache.disable_compile_cache()
    jit(scaled_sum, persist=True, static_argnames=("k",))(x, k=2)  # cache off: plain jax.jit
    assert calls == [2, 3, 2, 2, 2, 2] and len(os.listdir(tmp_path / "xla" / "exported")) == 4
