"""Multi-device and multi-process checks, run by test_sharding.py in subprocesses.

jax fixes its device count when it starts, and the test process has one CPU device, so
these run in fresh interpreters with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
and write their results as JSON/npz for the test to compare.

    python multidevice_worker.py mesh MODEL CSV OUT_DIR
    python multidevice_worker.py distributed MODEL CSV OUT_DIR PORT PROCESS_ID NUM_PROCESSES
"""

import json
import os
import sys

import numpy as np

BATCH = 5  # does not divide the 2-way data axis: batches are padded with zero-weight rows
METHODS = ("EAP", "EAP-IG-inputs")
PRUNE_STEPS = 4
OA_STEPS, OA_LR = 4, 3e-2
ACDC_THRESHOLD = 3e-4  # logit difference: keeps 18 of this model's 110 edges, no score within 5e-5 of it


def one_length(model, csv: str):
    """The examples of ``csv`` whose prompts have the most common token length."""
    from jaxinterp.interventions import prepare_data
    from jaxinterp.data import Pairs

    pairs = prepare_data(model, csv, "logit_diff")[0]
    keep = pairs.lengths == np.bincount(pairs.lengths).argmax()
    n_pos = int(pairs.lengths[keep][0])
    return Pairs(pairs.clean[keep, :n_pos], pairs.corrupted[keep, :n_pos], pairs.attention_mask[keep, :n_pos],
                 pairs.lengths[keep], pairs.labels[keep], pairs.corrupted_lengths[keep])


def mesh_checks(model_dir: str, csv: str, out: str) -> None:
    import jax

    from jaxinterp import load_model
    from jaxinterp.attribution import attribute
    from jaxinterp.cli import main
    from jaxinterp.evaluation import evaluate_masks
    from jaxinterp.graph import Graph
    from jaxinterp.sharding import make_mesh, shard_params

    mesh = make_mesh(data=2, model=4)
    model = load_model(model_dir)
    # loaded onto the mesh directly: each device gets only its shards from host memory
    params = load_model(model_dir, mesh=mesh).params
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.sharding == b.sharding, params,
                                            shard_params(model.params, mesh))))
    layout = {}
    for name, a in (("w_q", params["blocks"]["attn"]["w_q"]), ("w_in", params["blocks"]["mlp"]["w_in"]),
                    ("w_out", params["blocks"]["mlp"]["w_out"]), ("w_e", params["embed"]["w_e"]),
                    ("w_k", params["blocks"]["attn"]["w_k"])):
        layout[name] = {"spec": [None if s is None else str(s) for s in a.sharding.spec],
                        "distinct_shards": len({tuple((s.start, s.stop) for s in sh.index)
                                                for sh in a.addressable_shards}),
                        "shard_shape": list(a.addressable_shards[0].data.shape), "shape": list(a.shape)}
    # a program of jaxinterp.compiler.jit given sharded parameters is traced for their mesh,
    # without its caller entering it (sharding.mesh_of): node outputs split along d_model
    from jaxinterp import compiler, models

    ids = np.arange(12).reshape(2, 6) % model.cfg.vocab_size
    outs = compiler.jit(lambda p, t: models.forward(p, model.cfg, t, return_node_outputs=True)[1])(params, ids)
    layout["node_outputs"] = {"spec": [None if s is None else str(s) for s in outs.sharding.spec]}
    scores = {}
    for method in METHODS:
        scores[method] = attribute(model, csv, method=method, ig_steps=3, batch_size=BATCH, mesh=mesh,
                                   quiet=True).scores
    # the scanned layer loop on the mesh too (this 2-layer model runs unrolled by default):
    # its node outputs and edge contraction split over the model axis
    shallow, models.SCAN_MIN_LAYERS = models.SCAN_MIN_LAYERS, 1
    jax.clear_caches()  # the depth is read when a program is traced
    scores["scanned-EAP"] = attribute(model, csv, method="EAP", batch_size=BATCH, mesh=mesh, quiet=True).scores
    models.SCAN_MIN_LAYERS = shallow
    jax.clear_caches()
    # the CLI flag goes the same way
    graph_path = os.path.join(out, "cli_graph.json")
    rc = main(["attribute", "--model", model_dir, "--data", csv, "--method", "EAP", "--ig-steps", "3",
               "--batch-size", str(BATCH), "--mesh", "2x4", "--out", graph_path])
    scores["cli-EAP"] = Graph.from_json(graph_path).scores
    # ACDC on the mesh, through the command line
    acdc_path = os.path.join(out, "acdc.json")
    rc_acdc = main(["acdc", "--model", model_dir, "--data", csv, "--metric", "logit_diff", "--threshold",
                    str(ACDC_THRESHOLD), "--absolute", "--batch-size", str(BATCH), "--mesh", "2x4", "--out", acdc_path])
    acdc_graph = Graph.from_json(acdc_path)
    scores["acdc-scores"], scores["acdc-in-graph"] = acdc_graph.scores, acdc_graph.in_graph
    # circuit evaluation on the mesh: the full and the empty circuit
    masks = np.stack([model.graph_spec.real_edge_mask, np.zeros_like(model.graph_spec.real_edge_mask)])
    scores["evaluate"] = evaluate_masks(model, masks, csv, batch_size=BATCH, mesh=mesh)
    # node means summed over a sharded batch, then replicated into the evaluation
    scores["evaluate-mean"] = evaluate_masks(model, masks, csv, "logit_diff", "mean-positional", BATCH, mesh=mesh)
    # learned masks on the mesh: a few optimisation steps (compared with one device)
    from jaxinterp.edge_pruning import learn_circuit

    pruned = learn_circuit(model, csv, 20, objective="logit_diff", steps=PRUNE_STEPS, batch_size=BATCH, mesh=mesh,
                           quiet=True)
    scores["prune-log_alpha"] = pruned.log_alpha
    scores["prune-loss"] = pruned.history["loss"]
    # optimal ablation on the mesh: a few Adam steps of every node's constant (node outputs split)
    from jaxinterp.optimal_ablation import learn_optimal_ablation

    ablation = learn_optimal_ablation(model, csv, steps=OA_STEPS, lr=OA_LR, batch_size=BATCH, patience=None, mesh=mesh,
                                      quiet=True)
    scores["oa-values"], scores["oa-losses"] = ablation.values, ablation.losses
    scores["oa-loss"] = ablation.history["loss"]
    # position-aware scores on the mesh, on the prompts of one length
    scores["positional-EAP"] = attribute(model, one_length(model, csv), method="EAP", batch_size=BATCH, mesh=mesh,
                                         quiet=True, positional=True).scores
    np.savez(os.path.join(out, "scores.npz"), **scores)
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump({"devices": jax.device_count(), "cli_rc": rc, "acdc_rc": rc_acdc,
                   "layout": layout}, f)


def distributed_checks(model_dir: str, csv: str, out: str, port: int, process_id: int, n: int) -> None:
    from jaxinterp import distributed

    distributed.initialize(f"127.0.0.1:{port}", n, process_id, initialization_timeout=60)
    import jax

    from jaxinterp import load_model
    from jaxinterp.attribution import attribute
    from jaxinterp.sharding import make_mesh

    # data over the processes, model within each: every collective crosses processes
    mesh = make_mesh(data=n, model=jax.local_device_count())
    scores = attribute(load_model(model_dir, mesh=mesh), csv, method="EAP", batch_size=BATCH, mesh=mesh,
                       quiet=True).scores
    info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "mesh_processes": sorted({d.process_index for d in mesh.devices.flat})}
    np.save(os.path.join(out, f"scores_{process_id}.npy"), scores)
    with open(os.path.join(out, f"info_{process_id}.json"), "w") as f:
        json.dump(info, f)
    distributed.shutdown()


if __name__ == "__main__":
    mode, model_dir, csv, out = sys.argv[1:5]
    if mode == "mesh":
        mesh_checks(model_dir, csv, out)
    elif mode == "distributed":
        distributed_checks(model_dir, csv, out, *map(int, sys.argv[5:8]))
    else:
        sys.exit(f"unknown mode {mode!r}")
