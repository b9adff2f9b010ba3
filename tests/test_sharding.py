"""Sharding over a ("data", "model") mesh and over several processes.

The multi-device runs happen in subprocesses (tests/multidevice_worker.py) with fake CPU
devices, since this process's jax already has one device: 8 devices as a 2 x 4 mesh, and
2 processes x 2 devices joined by jax.distributed. Their scores must equal this
process's single-device scores.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from devtools.testing import devices_env
from jaxinterp.config import ModelConfig
from jaxinterp.memory import abstract_params
from jaxinterp.sharding import MeshError, make_mesh, pad_batch, param_specs, parse_mesh

WORKER = os.path.join(os.path.dirname(__file__), "multidevice_worker.py")
BATCH = 5  # as the worker: 12 examples in batches of 5, padded to 6 on the 2-way data axis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(actual, expected):
    # float32: one device with different batch sizes already differs by ~1e-5 of the
    # largest score on this model (summation order), so that is the tolerance
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.fixture(scope="module")
def workers(gpt2_dir, ioi_csv, tmp_path_factory):
    """Start the 8-device run and the 2-process run; they work while the test computes
    its single-device references. Yields their output directories once finished."""
    mesh_dir, dist_dir = tmp_path_factory.mktemp("mesh"), tmp_path_factory.mktemp("dist")
    procs = [subprocess.Popen([sys.executable, WORKER, "mesh", gpt2_dir, ioi_csv, str(mesh_dir)], env=devices_env(8),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    port = _free_port()
    procs += [subprocess.Popen([sys.executable, WORKER, "distributed", gpt2_dir, ioi_csv, str(dist_dir), str(port),
                                str(i), "2"], env=devices_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
              for i in range(2)]
    yield procs, mesh_dir, dist_dir
    for p in procs:
        if p.poll() is None:
            p.kill()


def _wait(procs):
    for p in procs:
        out, _ = p.communicate(timeout=900)  # a hang guard: a loaded 2-core machine takes minutes
        assert p.returncode == 0, f"worker failed ({p.args[2]}):\n{out[-4000:]}"


@pytest.fixture(scope="module")
def single(model, ioi_csv, workers):
    from jaxinterp.attribution import attribute

    return {m: attribute(model, ioi_csv, method=m, ig_steps=3, batch_size=BATCH, quiet=True).scores
            for m in ("EAP", "EAP-IG-inputs")}


@pytest.fixture(scope="module")
def mesh_run(workers):
    procs, mesh_dir, _ = workers
    _wait(procs[:1])
    with open(mesh_dir / "info.json") as f:
        return json.load(f), dict(np.load(mesh_dir / "scores.npz"))


@pytest.fixture(scope="module")
def dist_run(workers):
    procs, _, dist_dir = workers
    _wait(procs[1:])
    infos = [json.load(open(dist_dir / f"info_{i}.json")) for i in range(2)]
    return infos, [np.load(dist_dir / f"scores_{i}.npy") for i in range(2)]


# --- on 8 devices -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs"])
def test_mesh_scores_equal_single_device(mesh_run, single, method):
    info, scores = mesh_run
    assert info["devices"] == 8
    assert np.abs(single[method]).max() > 0
    _close(scores[method], single[method])


def test_scanned_layers_on_mesh_equal_single_device(mesh_run, single):
    """The scanned layer loop, its node outputs split along d_model over the model axis
    (jaxinterp.sharding.split_nodes), gives the single device's (unrolled) EAP scores."""
    _close(mesh_run[1]["scanned-EAP"], single["EAP"])


def test_parameters_are_sharded(mesh_run):
    layout = mesh_run[0]["layout"]
    # the attention projections along d_model (sharding.LEAF_RULES) and the MLP units over the
    # 4-way model axis: 4 different shards on 8 devices
    assert layout["w_q"]["spec"] == [None, None, "model", None]
    assert layout["w_q"]["distinct_shards"] == 4 and layout["w_q"]["shard_shape"] == [2, 4, 16, 16]
    assert layout["w_k"]["spec"] == [None, None, "model", None]
    assert layout["w_in"]["spec"] == [None, None, "model"] and layout["w_in"]["shard_shape"] == [2, 64, 64]
    assert layout["w_out"]["spec"] == [None, "model", None] and layout["w_out"]["distinct_shards"] == 4
    # a vocabulary of 35 does not divide 4: replicated
    assert layout["w_e"]["spec"] == [None, None] and layout["w_e"]["distinct_shards"] == 1
    # node outputs [src, batch, pos, d_model] of a jitted forward on the sharded parameters:
    # batch over data, d_model over model, with no mesh entered by the caller
    assert layout["node_outputs"]["spec"] == [None, "data", None, "model"]


def test_cli_mesh_flag(mesh_run, single):
    info, scores = mesh_run
    assert info["cli_rc"] == 0
    _close(scores["cli-EAP"], single["EAP"])


def test_acdc_command_on_mesh(mesh_run, model, ioi_csv):
    from jaxinterp.acdc import acdc
    from multidevice_worker import ACDC_THRESHOLD

    info, scores = mesh_run
    assert info["acdc_rc"] == 0
    single = acdc(model, ioi_csv, ACDC_THRESHOLD, metric="logit_diff", absolute=True, batch_size=BATCH, quiet=True)
    real = model.graph_spec.real_edge_mask
    assert 0 < single.in_graph[real].sum() < real.sum()  # the threshold makes real decisions
    # a score is a difference of two mean logit differences of size ~1: float32 rounding
    # makes it uncertain by ~1e-6 absolute, whatever the score's own size
    margin = np.abs(np.abs(single.scores[real]) - ACDC_THRESHOLD).min()
    assert margin > 5e-6, "a decision this close to the threshold would hinge on float rounding"
    np.testing.assert_array_equal(scores["acdc-in-graph"], single.in_graph)
    np.testing.assert_allclose(scores["acdc-scores"], single.scores, rtol=1e-3, atol=2e-6)


def test_evaluation_on_mesh(mesh_run, model, ioi_csv):
    from jaxinterp.evaluation import evaluate_masks

    real = model.graph_spec.real_edge_mask
    expected = evaluate_masks(model, np.stack([real, np.zeros_like(real)]), ioi_csv, batch_size=BATCH)
    assert expected[0] != pytest.approx(expected[1])  # full and empty circuit differ
    np.testing.assert_allclose(mesh_run[1]["evaluate"], expected, rtol=1e-5)
    mean = evaluate_masks(model, np.stack([real, np.zeros_like(real)]), ioi_csv, "logit_diff", "mean-positional",
                          BATCH)
    assert mean[1] != pytest.approx(expected[1])  # mean ablation is not patching
    np.testing.assert_allclose(mesh_run[1]["evaluate-mean"], mean, rtol=1e-5)


def test_edge_pruning_on_mesh(mesh_run, model, ioi_csv):
    from jaxinterp.edge_pruning import learn_circuit
    from multidevice_worker import PRUNE_STEPS

    # the logit difference: KL on this random model is ~1e-5, where float32 rounding is ~1e-3 of it
    single = learn_circuit(model, ioi_csv, 20, objective="logit_diff", steps=PRUNE_STEPS, batch_size=BATCH, quiet=True)
    np.testing.assert_allclose(mesh_run[1]["prune-loss"], single.history["loss"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(mesh_run[1]["prune-log_alpha"], single.log_alpha, atol=1e-4)


def test_optimal_ablation_on_mesh(mesh_run, model, ioi_csv):
    """The learned constants, per-step losses and final per-node losses on the 2x4 mesh are
    one device's (the steps' programs traced with the node outputs split)."""
    from jaxinterp.optimal_ablation import learn_optimal_ablation
    from multidevice_worker import OA_LR, OA_STEPS

    single = learn_optimal_ablation(model, ioi_csv, steps=OA_STEPS, lr=OA_LR, batch_size=BATCH, patience=None,
                                    quiet=True)
    np.testing.assert_allclose(mesh_run[1]["oa-loss"], single.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(mesh_run[1]["oa-losses"], single.losses, rtol=1e-5)
    scale = np.abs(single.values).max()
    np.testing.assert_allclose(mesh_run[1]["oa-values"], single.values, rtol=0, atol=1e-5 * scale)


def test_position_aware_scores_on_mesh(mesh_run, model, ioi_csv):
    from jaxinterp.attribution import attribute
    from multidevice_worker import one_length

    single = attribute(model, one_length(model, ioi_csv), method="EAP", batch_size=BATCH, quiet=True, positional=True)
    assert single.scores.ndim == 3
    # per-position scores are sums over fewer terms: rounding is a larger part of the small ones
    np.testing.assert_allclose(mesh_run[1]["positional-EAP"], single.scores, rtol=1e-4,
                               atol=1e-4 * np.abs(single.scores).max())


# --- 2 processes x 2 devices ------------------------------------------------------------

def test_two_processes_equal_single_process(dist_run, single):
    infos, scores = dist_run
    for i, info in enumerate(infos):
        assert info == {"process_index": i, "process_count": 2, "devices": 4, "local_devices": 2,
                        "mesh_processes": [0, 1]}
    np.testing.assert_array_equal(scores[0], scores[1])  # every process holds the whole result
    _close(scores[0], single["EAP"])


# --- in this process --------------------------------------------------------------------

def test_parse_mesh():
    assert parse_mesh("2x4") == (2, 4) and parse_mesh("1X8") == (1, 8)
    for bad in ("2x", "8", "2x4x1", "0x4", "axb"):
        with pytest.raises(MeshError, match="mesh"):
            parse_mesh(bad)


def test_mesh_larger_than_devices_is_refused():
    with pytest.raises(MeshError, match=r"2x4 mesh needs 8 devices.*1 cpu device.*XLA_FLAGS"):
        make_mesh(data=2, model=4)
    assert make_mesh(1, 1).shape == {"data": 1, "model": 1}


def test_specs_fall_back_to_replication():
    # GQA with 2 kv heads and 342 MLP units on a 4-way model axis: neither divides; the
    # attention projections are split along d_model (sharding.LEAF_RULES), which 4 divides
    cfg = ModelConfig(n_layers=2, n_heads=8, n_kv_heads=2, d_model=64, d_head=8, d_mlp=342, vocab_size=512,
                      n_ctx=64, norm="rmsnorm", positional="rotary", act_fn="silu", gated_mlp=True,
                      qkv_bias=False, out_bias=False, mlp_bias=False)
    specs = param_specs(abstract_params(cfg), {"data": 2, "model": 4})
    attn, mlp = specs["blocks"]["attn"], specs["blocks"]["mlp"]
    assert attn["w_q"] == P(None, None, "model", None) and attn["w_o"] == P(None, None, None, "model")
    assert attn["w_k"] == P(None, None, "model", None) and attn["w_v"] == P(None, None, "model", None)
    assert mlp["w_in"] == P(None, None, None) and mlp["w_out"] == P(None, None, None)
    assert specs["embed"]["w_e"] == P("model", None) and specs["unembed"]["w_u"] == P(None, "model")
    assert specs["blocks"]["ln1"]["w"] == P(None, None) and specs["ln_f"]["w"] == P(None)
    # on a 2-way model axis the MLP units divide
    specs2 = param_specs(abstract_params(cfg), {"data": 4, "model": 2})
    assert specs2["blocks"]["mlp"]["w_gate"] == P(None, None, "model")
    # a model axis that does not divide d_model: the attention projections replicated, not
    # split by heads instead
    specs128 = param_specs(abstract_params(cfg), {"data": 1, "model": 128})["blocks"]["attn"]
    assert all(specs128[w] == P(None, None, None, None) for w in ("w_q", "w_k", "w_v", "w_o"))
    # no model axis: everything replicated
    assert all(all(a is None for a in spec) for spec in
               __import__("jax").tree.leaves(param_specs(abstract_params(cfg), {"data": 8, "model": 1}),
                                             is_leaf=lambda x: isinstance(x, P)))


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="blocks/attn/w_qkv is not in jaxinterp.sharding.PARAM_AXES"):
        param_specs({"blocks": {"attn": {"w_qkv": np.zeros((2, 3, 4))}}}, {"data": 1, "model": 2})
    with pytest.raises(ValueError, match="has 2 dimensions"):
        param_specs({"blocks": {"attn": {"w_q": np.zeros((2, 3))}}}, {"data": 1, "model": 2})


def test_pad_batch_adds_zero_weight_rows():
    batch = {"clean": np.arange(10).reshape(5, 2), "lengths": np.arange(5), "weight": np.ones(5, np.float32)}
    out = pad_batch(batch, 4)
    assert out["clean"].shape == (8, 2) and out["lengths"].shape == (8,)
    np.testing.assert_array_equal(out["weight"], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["clean"][5:], np.repeat(batch["clean"][:1], 3, 0))
    assert pad_batch(batch, 5) is batch
