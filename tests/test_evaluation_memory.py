"""Evaluating circuits costs about a forward pass per circuit: no src x dst blow-up.

The unrolled forward once made XLA materialise an array of size src x dst x batch x pos
x d_model when circuits were evaluated (SmolLM2-135M: a 119 GB buffer for a curve at
batch 32). This bounds the compiled evaluation program's temporary memory, from XLA's own
memory analysis, by a small multiple of what a circuit run must hold: the node outputs of
this run and of the corrupted run, ``[src, batch, pos, d_model]`` each, per circuit.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxinterp.config import ModelConfig
from jaxinterp.graph import GraphSpec
from jaxinterp.interventions import TaskMetric, batch_circuit_metrics
from jaxinterp.memory import abstract_params

# SmolLM2's architecture (GQA, RMSNorm, gated MLP, rotary), narrower and shallower but deep
# enough for the layers to be scanned (models.SCAN_MIN_LAYERS)
CFG = ModelConfig(n_layers=16, n_heads=6, n_kv_heads=2, d_model=96, d_head=16, d_mlp=256, vocab_size=512,
                  n_ctx=128, norm="rmsnorm", positional="rotary", act_fn="silu", gated_mlp=True, qkv_bias=False,
                  out_bias=False, mlp_bias=False)


def compiled_temp_bytes(cfg: ModelConfig, batch: int, pos: int, circuits: int, chunk: int) -> int:
    spec = GraphSpec.from_config(cfg)
    S = jax.ShapeDtypeStruct
    tokens = S((batch, pos), jnp.int32)
    data = {"clean": tokens, "corrupted": tokens, "attention_mask": tokens, "lengths": S((batch,), jnp.int32),
            "labels": S((batch, 2), jnp.int32), "weight": S((batch,), jnp.float32)}
    masks = S((circuits, spec.n_forward, spec.n_backward), jnp.bool_)
    lowered = batch_circuit_metrics.lower(abstract_params(cfg), data, masks, cfg=cfg, metric=TaskMetric("logit_diff"),
                                          intervention="patching", chunk=chunk)
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("chunk", [1, 4])
def test_circuit_evaluation_memory_is_a_few_node_output_arrays_per_circuit(chunk):
    batch, pos = 8, 24
    spec = GraphSpec.from_config(CFG)
    node_outputs = spec.n_forward * batch * pos * CFG.d_model * 4  # one [src, batch, pos, d_model] float32 array
    temp = compiled_temp_bytes(CFG, batch, pos, circuits=8, chunk=chunk)
    # The corrupted run's outputs (and the scan's stacked copy of them) once, then this
    # run's outputs, their difference from the corrupted ones and the layer's edge inputs
    # per circuit evaluated at once. Measured at 10 layers: 4.4 (chunk 1) and 11.2 (chunk
    # 4); the unrolled forward needed 8.6 and 38.3 (and ~22 per circuit at SmolLM2's size).
    assert temp <= (3 + 3 * chunk) * node_outputs, (temp / node_outputs, chunk)
