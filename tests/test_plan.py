"""``jaxinterp plan``: XLA's figures of a method's program compiled from abstract arrays.

The memory figure must be the real program's (the same jitted batch function on real
arrays), the FLOP count must multiply loop bodies by their trip counts (the layers run as
a scan, which XLA's cost_analysis counts once), and a 2x4 mesh of virtual CPU devices
must compile from the command line, which sets the device count itself.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from devtools.testing import devices_env
from jaxinterp import compiler, models
from jaxinterp.cli import main
from jaxinterp.config import ModelConfig
from jaxinterp.memory import abstract_params
from jaxinterp.plan import PlanError, forward_flops, hlo_costs, memory_figures, plan
from jaxinterp.shapes import ShapeError, model_config

# Llama-shaped (RMSNorm, rotary, gated MLP, grouped-query attention), small enough to compile quickly
TINY = ModelConfig(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=48, vocab_size=64, n_ctx=32, n_kv_heads=2,
                   norm="rmsnorm", positional="rotary", act_fn="silu", gated_mlp=True, qkv_bias=False,
                   out_bias=False, mlp_bias=False)


@pytest.mark.parametrize("scan", [True, False])
def test_dot_flops_multiply_loop_bodies(scan):
    """A plain forward's dot FLOPs, counted from the compiled HLO, equal the analytic count
    whether the layers are a scan (one body, trip count 3) or unrolled; XLA's own
    cost_analysis counts the scanned body once, so it falls short there."""
    import dataclasses

    cfg = dataclasses.replace(TINY, n_layers=3)
    fn = compiler.jit(lambda p, t: models.forward(p, cfg, t, scan=scan))
    compiled = fn.lower(abstract_params(cfg), jax.ShapeDtypeStruct((2, 16), jnp.int32)).compile()
    counted = hlo_costs(compiled.as_text())
    assert counted["unknown_trip_counts"] == 0
    assert counted["flops"] == forward_flops(cfg, 2, 16)
    if scan:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        assert cost["flops"] < 0.75 * counted["flops"]


def test_dot_flops_count_a_conditional_as_its_costliest_branch():
    """A conditional runs one branch: it is counted as its costliest (an upper bound), each
    time its loop runs, not as the first branch nor as all of them (the scanned layers'
    per-segment branches, models._segments, are conditionals inside the layer loop)."""
    def f(x, w):
        def body(c, i):  # branch 0: one [4, 16] x [16, 16] product; branch 1: two
            return jax.lax.switch(i % 2, [lambda: c @ w, lambda: c @ w @ w]), None

        return jax.lax.scan(body, x, jnp.arange(6))[0]

    compiled = compiler.jit(f).lower(jnp.ones((4, 16)), jnp.ones((16, 16))).compile()
    assert "conditional(" in compiled.as_text()
    assert hlo_costs(compiled.as_text())["flops"] == 6 * 2 * (2 * 4 * 16 * 16)


def test_dot_bytes_are_each_dots_operands_and_result_times_its_loop():
    """The dots' bytes: each dot's two operands and its result, once per run of its loop
    body (two dots of different shapes, five iterations), here 35,840 bytes."""
    def f(x, w, v):
        def body(c, _):  # [8, 32] @ [32, 16] -> [8, 16]; then @ [16, 32] -> [8, 32]
            return jnp.tanh(c @ w) @ v, None

        return jax.lax.scan(body, x, None, length=5)[0]

    compiled = compiler.jit(f).lower(jnp.ones((8, 32)), jnp.ones((32, 16)), jnp.ones((16, 32))).compile()
    per_iteration = (8 * 32 + 32 * 16 + 8 * 16) + (8 * 16 + 16 * 32 + 8 * 32)  # float32 elements
    assert hlo_costs(compiled.as_text())["dot_bytes"] == 5 * 4 * per_iteration


def _real_batch(cfg, batch_size, n_pos, seed=0):
    from jaxinterp.data import Pairs

    rng = np.random.default_rng(seed)
    clean = rng.integers(1, cfg.vocab_size, (batch_size, n_pos)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 1] = rng.integers(1, cfg.vocab_size, batch_size)
    pairs = Pairs(clean, corrupted, np.ones_like(clean), np.full(batch_size, n_pos, np.int32),
                  rng.integers(1, cfg.vocab_size, (batch_size, 2)).astype(np.int32))
    return next(pairs.batches(batch_size))


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs"])
def test_plan_memory_is_the_real_programs(method):
    """plan's per-device memory equals memory_analysis() of batch_scores compiled on real
    weights and a real batch of the same shape (as attribute() calls it)."""
    from jaxinterp.attribution import batch_scores
    from jaxinterp.interventions import TaskMetric

    r = plan(TINY, method, batch_size=3, n_pos=8, ig_steps=2, peak_tflops=1.0)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    params = jax.tree.map(lambda a: 0.02 * jax.random.normal(next(keys), a.shape, a.dtype), abstract_params(TINY))
    steps = 2 if "IG" in method else 1
    real = batch_scores.lower(params, _real_batch(TINY, 3, 8), cfg=TINY, method=method,
                              metric=TaskMetric("logit_diff"), ig_steps=steps, remat=False).compile()
    assert r["memory_per_device"] == memory_figures(real)
    assert r["memory_per_device"]["peak"] > 0
    assert r["flops_per_device"] > 0 and r["hlo_unknown_trip_counts"] == 0
    assert r["seconds_at_mfu"] == pytest.approx(r["flops_per_device"] / 1e12 / 0.4)
    assert r["estimate_peak_bytes"] > 0


def test_plan_refuses_bad_requests(capsys):
    with pytest.raises(ShapeError, match="unknown shape"):
        model_config("llama-9")
    with pytest.raises(PlanError, match="does not divide"):
        plan(TINY, "EAP", n_pos=8, mesh_shape=(1, 3))
    with pytest.raises(PlanError, match="context"):
        plan(TINY, "EAP", n_pos=33)
    assert main(["plan", "--shape", "llama-9", "--method", "EAP"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    # 8 heads: a 3-way model axis is refused before any device is asked for
    assert main(["plan", "--shape", "tiny", "--mesh", "1x3"]) == 2
    assert "does not divide" in capsys.readouterr().err


_COLLECTIVES_SCRIPT = """
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxinterp import compiler
from jaxinterp.plan import hlo_costs
mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,))
def f(a):  # each of 5 loop steps gathers the [64, 32] float32 carry whole: one all-gather of 8 KiB
    def body(c, _):
        whole = jax.lax.with_sharding_constraint(jnp.sin(c), NamedSharding(mesh, P()))
        return jax.lax.with_sharding_constraint(whole[::-1] + c, NamedSharding(mesh, P("x"))), None
    return jax.lax.scan(body, a, None, length=5)[0]
a = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("x")))
print(hlo_costs(compiler.jit(f).lower(a).compile().as_text())["collective_bytes"])
"""


def test_collective_bytes_multiply_loop_bodies():
    """The collectives' traffic of a compiled program is counted like its FLOPs: each loop
    body times its trip count, each collective at its result's size (an all-gather: the
    gathered array, here 64 x 32 x 4 bytes, five times)."""
    proc = subprocess.run([sys.executable, "-c", _COLLECTIVES_SCRIPT], env=devices_env(4), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str({"all-gather": 5 * 64 * 32 * 4})


_SPLIT_SCRIPT = """
import json, sys
from jaxinterp.config import ModelConfig
from jaxinterp.plan import plan
cfg = ModelConfig.from_dict(json.loads(sys.argv[1]))
print(json.dumps({f"{m} {c} {d}x{w}": plan(cfg, m, batch_size=4, n_pos=32, mesh_shape=(d, w), n_circuits=c)
                  for m, c in (("EAP", 1), ("evaluate", 1), ("evaluate", 4), ("exact", 1)) for d, w in ((1, 1), (1, 4))}))
"""


def test_a_model_axis_splits_the_node_outputs():
    """On a 4-way model axis each device holds a quarter of the node outputs and of the edge
    contraction (d_model split, jaxinterp.sharding.split_nodes), for attribution and circuit
    evaluation alike (one circuit per call, and four at once: their patched runs' buffers
    too), with the layers scanned (6 of them). Left to jit they were replicated: XLA's
    temporaries per device were 0.88x (EAP) and 0.96x (evaluate) of one device's. And no
    node input is moved or gathered whole for want of a layout (below)."""
    cfg = dataclasses.replace(TINY, n_layers=6, n_heads=8, d_model=128, d_head=16, d_mlp=192, n_ctx=64)
    assert models.use_scan(cfg)
    proc = subprocess.run([sys.executable, "-c", _SPLIT_SCRIPT, cfg.to_json()],
                          env=devices_env(4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for method in ("EAP 1", "evaluate 1", "evaluate 4"):
        one, four = r[f"{method} 1x1"], r[f"{method} 1x4"]
        assert four["memory_per_device"]["temp"] < 0.5 * one["memory_per_device"]["temp"], method
        # no operand gathered whole for a replicated contraction: a quarter of the work each
        assert four["flops_per_device"] < 0.3 * one["flops_per_device"], method
    # nothing the size of a layer's node inputs or outputs moves between devices. EAP: each
    # group's probe broadcast on its own (one broadcast split into q, k and v moved its pieces,
    # 7.5 MiB of collective-permute here); the attention projections split along d_model like
    # the nodes they read and write (sharding.LEAF_RULES; split by heads, the head outputs
    # [head, batch, pos, d_model] and the q/k/v inputs' gradients went from the heads' split
    # to d_model's in every layer: 3.75 MiB of all-to-all, 1.25x one run's head outputs);
    # evaluation: the 8 per-query-head k and v inputs are regrouped by the 2 key/value heads,
    # which 4 devices do not divide, without gathering them whole (7.1 and 26.3 MiB of
    # all-gather for 1 and 4 circuits, against 1.5 and 2.3)
    eap = r["EAP 1 1x4"]["collective_bytes_per_device"]
    head_outputs = cfg.n_layers * 4 * 32 * cfg.n_heads * cfg.d_model * 4  # one run's, in bytes
    assert sum(eap.values()) > 0 and eap.get("collective-permute", 0) == 0, eap
    assert eap.get("all-to-all", 0) < 0.25 * head_outputs, eap
    kv_inputs = 2 * head_outputs  # one run's k and v inputs, one per query head
    for c in (1, 4):
        collectives = r[f"evaluate {c} 1x4"]["collective_bytes_per_device"]
        assert sum(collectives.values()) > 0 and collectives.get("all-gather", 0) < 0.5 * c * kv_inputs, c
    # nor is anything regathered whole for want of a layout (XLA warns when it must: the k/v
    # weights, split along d_model, were regathered in every layer of EAP's backward until the
    # k/v inputs were constrained to d_model's split too, models._block)
    assert "Involuntary full rematerialization" not in proc.stderr
    # the memory estimate counts the split, and stays an upper bound on the mesh (exact's
    # patched runs too: counted replicated, its estimate barely fell (0.99x of one device's) where
    # XLA's peak fell to 0.28x, 27x XLA's figure at Llama-3.2-1B on 1x8)
    for method in ("EAP 1", "exact 1"):
        one, four = r[f"{method} 1x1"], r[f"{method} 1x4"]
        assert one["memory_per_device"]["peak"] <= one["estimate_peak_bytes"], method
        assert four["memory_per_device"]["peak"] <= four["estimate_peak_bytes"] < 0.5 * one["estimate_peak_bytes"], method


def test_plan_cli_2x4_virtual_mesh(tmp_path):
    """The command sets the virtual device count from --mesh itself (no XLA_FLAGS given);
    the batch is padded to the data axis and each device holds a quarter of the sharded
    parameters or less."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)))
    outs = {}
    for mesh in ("1x1", "2x4"):
        out = tmp_path / f"plan_{mesh}.json"
        proc = subprocess.run([sys.executable, "-m", "jaxinterp", "plan", "--shape", str(config), "--method", "EAP",
                               "--batch-size", "3", "--pos", "8", "--mesh", mesh, "--json", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[mesh] = json.loads(out.read_text())
    r, one = outs["2x4"], outs["1x1"]
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "model": 4}
    assert r["batch_size_padded"] == 4 and one["batch_size_padded"] == 3
    assert 0 < r["memory_per_device"]["argument"] < one["memory_per_device"]["argument"] / 2
    assert r["flops_total"] >= 0.9 * one["flops_per_device"]
