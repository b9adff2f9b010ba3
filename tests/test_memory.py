"""Memory estimates, batch-size picking and out-of-memory messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.attribution import compiled_peak_bytes
from jaxinterp.config import ModelConfig
from jaxinterp.memory import (OutOfMemoryError, abstract_params, estimate_peak_bytes,
                              explain_out_of_memory, format_bytes, is_resource_exhausted, param_count,
                              parse_bytes, pick_micro_batch)

GPT2 = ModelConfig(n_layers=2, n_heads=4, d_model=64, d_head=16, d_mlp=256, vocab_size=35, n_ctx=64)
LLAMA = ModelConfig(n_layers=3, n_heads=8, n_kv_heads=2, d_model=128, d_head=16, d_mlp=344, vocab_size=512,
                    n_ctx=128, norm="rmsnorm", positional="rotary", act_fn="silu", gated_mlp=True, qkv_bias=False,
                    out_bias=False, mlp_bias=False)
METHODS = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted", "exact")


@pytest.mark.parametrize("text, expected", [
    ("70GB", 70 * 10**9), ("512MiB", 512 * 2**20), ("1.5 gb", 1_500_000_000), ("2TiB", 2 * 2**40),
    ("100kB", 100_000), ("1000", 1000), (4096, 4096), ("64 KiB", 65536),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["70 parsecs", "GB", "-5GB", "0", "", "1e3.5GB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(512 * 2**20) == "512.00 MiB" and format_bytes(100) == "100 B"


def test_abstract_params_match_loaded_models(model, tmp_path):
    from jaxinterp import load_model
    from devtools.testing import save_random_llama

    llama = load_model(save_random_llama(str(tmp_path / "llama")))
    for m in (model, llama):
        abstract = abstract_params(m.cfg)
        assert jax.tree.structure(abstract) == jax.tree.structure(m.params)
        assert [a.shape for a in jax.tree.leaves(abstract)] == [a.shape for a in jax.tree.leaves(m.params)]
        assert param_count(m.cfg) == sum(a.size for a in jax.tree.leaves(m.params))


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_estimate_is_monotone(cfg, method):
    by_batch = [estimate_peak_bytes(cfg, b, 16, method) for b in range(1, 129)]
    by_pos = [estimate_peak_bytes(cfg, 8, p, method) for p in range(1, 129)]
    assert np.all(np.diff(by_batch) >= 0) and by_batch[-1] > by_batch[0]
    assert np.all(np.diff(by_pos) >= 0) and by_pos[-1] > by_pos[0]
    # more devices never need more memory per device
    assert estimate_peak_bytes(cfg, 64, 16, method, data_devices=4) < by_batch[63]
    assert estimate_peak_bytes(cfg, 64, 16, method, model_devices=4) < by_batch[63]
    # bfloat16 halves the activations, not the float32 scores
    assert estimate_peak_bytes(cfg, 64, 16, method, dtype=jnp.bfloat16) < by_batch[63]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", ["30MB", "100MB", "3GiB"])
def test_picked_batch_is_the_largest_that_fits(method, budget):
    limit = parse_bytes(budget)
    est = lambda b, data: estimate_peak_bytes(LLAMA, b, 32, method, exact_chunk=4, data_devices=data)  # noqa: E731
    for data in (1, 2, 4):
        b = pick_micro_batch(LLAMA, 32, method, limit, exact_chunk=4, data_devices=data)
        assert b % data == 0 and b >= data
        assert est(b, data) <= limit < est(b + data, data)
    assert pick_micro_batch(LLAMA, 32, method, limit, exact_chunk=4, limit=3) <= 3


def test_nothing_fits():
    with pytest.raises(OutOfMemoryError, match=r"needs about .* for a batch of 1, more than the 1.00 MiB.*--mesh"):
        pick_micro_batch(LLAMA, 32, "EAP", 2**20)


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs"])
def test_picked_batch_fits_compiled_program(method):
    """XLA's own memory analysis of the compiled program at the picked batch size stays
    within the budget, and the estimate is not uselessly loose (within 3x)."""
    limit = parse_bytes("12MB")
    b = pick_micro_batch(GPT2, 16, method, limit)
    assert b >= 8
    actual = compiled_peak_bytes(GPT2, b, 16, method, ig_steps=2)
    assert actual <= limit
    assert estimate_peak_bytes(GPT2, b, 16, method) <= 3 * actual


def test_attribute_picks_the_batch_size(model, ioi_csv, capsys):
    from jaxinterp.attribution import attribute

    graph = attribute(model, ioi_csv, method="EAP", max_memory="1GB", quiet=False)
    assert "batch size 12 (estimated peak" in capsys.readouterr().out  # all 12 examples fit
    expected = attribute(model, ioi_csv, method="EAP", batch_size=12, quiet=True)
    np.testing.assert_array_equal(graph.scores, expected.scores)
    with pytest.raises(OutOfMemoryError, match="more than the 1000 B allowed"):
        attribute(model, ioi_csv, method="EAP", max_memory=1000, quiet=True)


def test_cli_max_memory(gpt2_dir, ioi_csv, tmp_path, capsys):
    from jaxinterp.cli import main

    args = ["attribute", "--model", gpt2_dir, "--data", ioi_csv, "--method", "EAP", "--out", str(tmp_path / "g.json")]
    with pytest.raises(SystemExit) as refused:  # an unreadable size is an argparse error, before any work
        main(args + ["--max-memory", "lots"])
    assert refused.value.code == 2
    assert "cannot read a memory size from 'lots'" in capsys.readouterr().err
    assert main(args + ["--max-memory", "1kB"]) == 2
    assert "shard the model over more devices" in capsys.readouterr().err


def test_resource_exhausted_becomes_actionable():
    @explain_out_of_memory
    def run(method="EAP", batch_size=64, max_memory=None):
        # a real XLA allocation failure: 32 TiB on the host
        return jnp.zeros((2**45,), jnp.uint8).block_until_ready()

    with pytest.raises(OutOfMemoryError) as info:
        run("EAP-IG-inputs", batch_size=64)
    message = str(info.value)
    assert message.startswith("EAP-IG-inputs: out of device memory at batch size 64: RESOURCE_EXHAUSTED")
    assert "--batch-size" in message and "--max-memory" in message
    assert is_resource_exhausted(info.value.__cause__)
    assert not is_resource_exhausted(RuntimeError("INVALID_ARGUMENT: shapes"))
