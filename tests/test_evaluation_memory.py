"""Evaluating circuits costs about a forward pass per circuit: no src x dst blow-up.

The unrolled forward once made XLA materialise an array of size src x dst x batch x pos
x d_model when circuits were evaluated (SmolLM2-135M: a 119 GB buffer for a curve at
batch 32). This bounds the compiled evaluation program's temporary memory, from XLA's own
memory analysis, by a small multiple of what a circuit run must hold: the node outputs of
this run and of the corrupted run, ``[src, batch, pos, d_model]`` each, per circuit.
"""

import os

import jax
import jax.numpy as jnp
import pytest

from devtools.testing import slow
from jaxinterp.config import ModelConfig
from jaxinterp.graph import GraphSpec
from jaxinterp.interventions import TaskMetric, batch_circuit_metrics
from jaxinterp.memory import abstract_params
from jaxinterp.plan import abstract_batch

# SmolLM2's architecture (GQA, RMSNorm, gated MLP, rotary), narrower and shallower but deep
# enough for the layers to be scanned (models.SCAN_MIN_LAYERS)
CFG = ModelConfig(n_layers=16, n_heads=6, n_kv_heads=2, d_model=96, d_head=16, d_mlp=256, vocab_size=512,
                  n_ctx=128, norm="rmsnorm", positional="rotary", act_fn="silu", gated_mlp=True, qkv_bias=False,
                  out_bias=False, mlp_bias=False)


def compiled_memory(cfg: ModelConfig, batch: int, pos: int, circuits: int, chunk: int):
    """XLA's memory analysis of one compiled evaluation batch (abstract inputs, no weights)."""
    spec = GraphSpec.from_config(cfg)
    masks = jax.ShapeDtypeStruct((circuits, spec.n_forward, spec.n_backward), jnp.bool_)
    lowered = batch_circuit_metrics.lower(abstract_params(cfg), abstract_batch(batch, pos), masks, cfg=cfg,
                                          metric=TaskMetric("logit_diff"), intervention="patching", chunk=chunk)
    return lowered.compile().memory_analysis()


@pytest.mark.parametrize("chunk", [1, 4])
def test_circuit_evaluation_memory_is_a_few_node_output_arrays_per_circuit(chunk):
    batch, pos = 8, 24
    spec = GraphSpec.from_config(CFG)
    node_outputs = spec.n_forward * batch * pos * CFG.d_model * 4  # one [src, batch, pos, d_model] float32 array
    temp = compiled_memory(CFG, batch, pos, circuits=8, chunk=chunk).temp_size_in_bytes
    # The corrupted run's outputs (and the scan's stacked copy of them) once, then this
    # run's outputs, their difference from the corrupted ones and the layer's edge inputs
    # per circuit evaluated at once. Measured at 10 layers: 4.4 (chunk 1) and 11.2 (chunk
    # 4); the unrolled forward needed 8.6 and 38.3 (and ~22 per circuit at SmolLM2's size).
    # At this shape (session 14): 3.45 and 7.5, and 3.28 and 8.16 with the buffered rows in
    # two segments (models._segments: each buffer has spare rows, and chunk 4 holds 4 sets).
    assert temp <= (3 + 3 * chunk) * node_outputs, (temp / node_outputs, chunk)


@pytest.mark.parametrize("chunk", [1, 4])
def test_the_evaluation_estimate_bounds_xla_s_figure(chunk):
    """memory.evaluation_peak_bytes (what --max-memory sizes the circuits per call by) is
    an upper bound of XLA's own figure, and not a useless one (within 4x)."""
    from jaxinterp.memory import evaluation_peak_bytes

    m = compiled_memory(CFG, 8, 24, circuits=8, chunk=chunk)
    actual = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    estimate = evaluation_peak_bytes(CFG, 8, 24, chunk, n_circuits=8)
    assert actual <= estimate <= 4 * actual, (estimate / actual, chunk)


def test_circuits_per_call_is_the_most_that_fit():
    from jaxinterp.memory import OutOfMemoryError, circuits_per_call, evaluation_peak_bytes

    est = lambda c: evaluation_peak_bytes(CFG, 8, 24, c, n_circuits=12)  # noqa: E731
    assert est(1) < est(2) < est(12)
    assert circuits_per_call(CFG, 8, 24, 12, est(3)) == 3
    assert circuits_per_call(CFG, 8, 24, 12, est(3) - 1) == 2
    assert circuits_per_call(CFG, 8, 24, 12, 10 * est(12)) == 12  # never more than there are
    with pytest.raises(OutOfMemoryError, match="evaluating one circuit on a batch of 8 prompts"):
        circuits_per_call(CFG, 8, 24, 12, est(1) - 1)


def test_by_default_a_curve_needs_no_more_memory_than_attribution():
    """Without --max-memory the circuits per call are as many as fit in EAP's estimate for
    the same batch (at most 8): XLA's peak for the evaluation call is then below 2x its peak
    for EAP on that batch (the old fixed 8 per call needed 4.0x at this shape)."""
    from jaxinterp.attribution import compiled_peak_bytes
    from jaxinterp.memory import default_circuits_per_call

    batch, pos, circuits = 32, 24, 12
    chunk = default_circuits_per_call(CFG, batch, pos, circuits)
    assert 1 <= chunk < 8
    eap = compiled_peak_bytes(CFG, batch, pos, "EAP")
    m = compiled_memory(CFG, batch, pos, circuits, chunk)
    evaluation = m.argument_size_in_bytes + m.temp_size_in_bytes
    assert evaluation < 2 * eap, (evaluation / eap, chunk)


def test_curve_and_evaluate_take_max_memory(model, ioi_csv, gpt2_dir, tmp_path, capsys):
    """The same faithfulness whatever the number of circuits per call; the chosen number is
    printed; a budget that fits no circuit is refused with exit code 2."""
    import numpy as np

    from jaxinterp.attribution import attribute
    from jaxinterp.cli import main
    from jaxinterp.evaluation import evaluate, faithfulness_curve
    from jaxinterp.memory import evaluation_peak_bytes

    graph = attribute(model, ioi_csv, method="EAP", quiet=True)
    sizes = [5, 10, 20, 50, 100]
    fixed = faithfulness_curve(model, graph, ioi_csv, sizes, chunk=8)
    # room for 3 of the 7 circuits (5 sizes, the full model, the empty circuit) at once
    budget = evaluation_peak_bytes(model.cfg, 12, 16, 3, n_circuits=7)
    sized = faithfulness_curve(model, graph, ioi_csv, sizes, batch_size=12, max_memory=budget, quiet=False)
    assert "3 of 7 circuits per call" in capsys.readouterr().out
    np.testing.assert_allclose(sized.faithfulness, fixed.faithfulness, rtol=1e-5, atol=1e-5)
    graph.apply_topn(20)
    one = evaluate(model, graph, ioi_csv, max_memory="1GB")
    assert abs(one.faithfulness - fixed.faithfulness[2]) <= 1e-5

    path = str(tmp_path / "g.json")
    graph.to_json(path)
    out = str(tmp_path / "curve.png")
    assert main(["curve", "--model", gpt2_dir, "--data", ioi_csv, "--graph", path, "--max-memory", "1kB",
                 "--out", out]) == 2
    assert "evaluating one circuit" in capsys.readouterr().err and not os.path.exists(out)


@slow("compiles an 8-layer per-input Gemma 2 evaluation: ~35 s under load")
def test_the_evaluation_estimate_bounds_per_input_gemma2_heads():
    """With MIB's Gemma 2 heads circuits run the unrolled forward, whose temporaries grow
    with depth: at 8 layers and 4 circuits at once XLA's figure was 1.16x the estimate
    before the estimate counted them (memory._per_input_copies)."""
    import dataclasses

    from jaxinterp.memory import evaluation_peak_bytes
    from test_memory_gemma2 import GEMMA2

    cfg = dataclasses.replace(GEMMA2, n_layers=8)
    m = compiled_memory(cfg, 8, 24, circuits=8, chunk=4)
    actual = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    estimate = evaluation_peak_bytes(cfg, 8, 24, 4, n_circuits=8)
    assert actual <= estimate <= 4 * actual, estimate / actual
