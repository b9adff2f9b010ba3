"""Optimal ablation: learned per-node constants, checked against a hand-built forward that
substitutes them, and used as the ``optimal`` intervention."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handbuilt
from devtools.testing import save_random_gpt2, write_ioi_csv
from jaxinterp.cli import main
from jaxinterp.data import bucket_length
from jaxinterp.evaluation import evaluate_masks
from jaxinterp.graph import Graph
from jaxinterp.interventions import load_data, mean_activations
from jaxinterp.optimal_ablation import OptimalAblation, learn_optimal_ablation, load, save

STEPS, LR = 8, 3e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model, its directory, 12 IOI pairs)``: a random GPT-2 of 1 layer, 2 heads and
    width 32 (4 nodes; compiling the training step dominates these tests' time)."""
    from jaxinterp import load_model

    d = save_random_gpt2(str(tmp_path_factory.mktemp("tiny")), n_layer=1, n_head=2, n_embd=32, seed=0)
    model = load_model(d)
    return model, d, write_ioi_csv(tmp_path_factory.mktemp("data") / "ioi.csv", model.tokenizer, ragged=True)


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def model_dir(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def ioi_csv(tiny):
    return tiny[2]


@pytest.fixture(scope="module")
def learned(model, ioi_csv):
    """8 full-batch Adam steps (the 12 prompts are one batch) from the node means."""
    return learn_optimal_ablation(model, ioi_csv, steps=STEPS, lr=LR, batch_size=12, patience=None, quiet=True)


def _handbuilt_losses(model, pairs, values):
    """``([src] losses, [src, batch, pos, d_model] node outputs)``: the mean next-token
    cross-entropy over the real predictions with node ``u`` replaced by ``values[u]``, by
    the plain forward of tests/handbuilt.py: every input downstream of ``u`` gets
    ``values[u] - out_u`` added (``out_u`` from the plain run: ``u``'s own inputs come
    before it). Eager, vmapped over ``u`` (compiling it would cost more than running it)."""
    spec, cfg = model.graph_spec, model.cfg
    tokens, mask = jnp.asarray(pairs.clean), jnp.asarray(pairs.attention_mask)
    rows = jnp.asarray(spec.real_edge_mask, jnp.float32)  # [src, dst]: u's downstream inputs

    def run(params, values):
        _, outs = handbuilt.forward(params, cfg, tokens, mask)
        outs = jnp.stack([outs[n] for n in spec.forward_names])

        def one(delta, row):
            extra = {name: row[v] * delta for v, name in enumerate(spec.backward_names)}
            return handbuilt.forward(params, cfg, tokens, mask, extra=extra)[0]

        return jax.vmap(one)(values[:, None, None, :] - outs, rows), outs

    logits, outs = (np.asarray(x, np.float64) for x in run(model.params, jnp.asarray(values, jnp.float32)))
    logp = logits[:, :, :-1] - np.log(np.exp(logits[:, :, :-1]).sum(-1, keepdims=True))
    target = np.asarray(pairs.clean)[:, 1:]
    nll = -np.take_along_axis(logp, np.broadcast_to(target[None, ..., None], logp.shape[:3] + (1,)), -1)[..., 0]
    real = np.asarray(pairs.attention_mask)[:, 1:] > 0
    return np.array([n[real].mean() for n in nll]), outs


def test_learned_constants_beat_the_node_means_by_a_handbuilt_forward(model, ioi_csv, learned):
    pairs = load_data(model, ioi_csv)
    spec = model.graph_spec
    assert learned.values.shape == (spec.n_forward, model.cfg.d_model) and learned.node_names == spec.forward_names
    end, outs = _handbuilt_losses(model, pairs, learned.values)
    # the start: every node's mean output over the real tokens, by hand
    means = outs[:, np.asarray(pairs.attention_mask, bool)].mean(1)
    start, _ = _handbuilt_losses(model, pairs, means)
    # jaxinterp's losses are the hand-built ones, at the means and at the learned values
    np.testing.assert_allclose(learned.start_losses, start, rtol=1e-5)
    np.testing.assert_allclose(learned.losses, end, rtol=1e-5)
    # every node's constant lowers its loss, by far more than float rounding
    assert (end < start - 1e-3).all(), (start, end)
    assert start.mean() - end.mean() > 0.05
    assert learned.history["loss"].shape == (STEPS,) and learned.history["loss"][-1] < learned.history["loss"][0]


def test_optimal_intervention_is_the_mean_data_path_with_the_learned_values(model, model_dir, ioi_csv, learned,
                                                                            tmp_path, capsys):
    """``evaluate`` and ``mib score`` with ``--intervention optimal --intervention-data
    FILE`` give what evaluation with the file's constants passed as node means gives, for
    every circuit they evaluate; the node means themselves give other values."""
    path = str(tmp_path / "oa.npz")
    save(learned, path)
    back = load(path, model)
    np.testing.assert_array_equal(back.values, learned.values)
    np.testing.assert_array_equal(back.losses, learned.losses)
    spec = model.graph_spec
    real = spec.real_edge_mask
    graph_file = str(tmp_path / "scores.json")
    Graph(spec, np.where(real, np.random.default_rng(0).normal(size=real.shape), 0)).to_json(graph_file)
    common = ["--model", model_dir, "--data", ioi_csv, "--graph", graph_file, "--batch-size", "12",
              "--intervention", "optimal", "--intervention-data", path]
    assert main(["evaluate", "--top-n", "6"] + common) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert main(["mib", "score", "--out", str(tmp_path / "score.json")] + common) == 0
    scored = json.load(open(tmp_path / "score.json"))

    # the same circuits, by hand from the scores: evaluate's top 6 by |score|, MIB's top-n
    # by signed and by |score| at int(pct * 13) edges, then the full and the empty circuit
    circuit = Graph.from_json(graph_file, spec=spec)
    circuit.apply_topn(6)
    circuit.prune()
    sizes = [int(p * spec.n_edges) for p in scored["signed"]["percentages"]]
    masks = [circuit.in_graph]
    for absolute in (False, True):
        for n in sizes:
            g = Graph.from_json(graph_file, spec=spec)
            g.apply_topn(n, absolute=absolute)
            g.prune()
            masks.append(g.in_graph)
    masks = np.stack(masks + [real, np.zeros_like(real)])
    pairs = bucket_length(load_data(model, ioi_csv), model.cfg.n_ctx)  # as both commands run them
    kw = dict(metric="logit_diff", batch_size=12, intervention="mean")
    as_means = evaluate_masks(model, masks, pairs, means=learned.values[:, None], **kw)
    got = np.array([evaluated["circuit"]] + scored["signed"]["metric"] + scored["absolute"]["metric"]
                   + [scored["model"], scored["empty"]])
    np.testing.assert_allclose(got, as_means, rtol=0, atol=1e-5 * np.abs(as_means).max())
    assert [evaluated["model"], evaluated["empty"]] == pytest.approx(as_means[-2:], abs=1e-5 * np.abs(as_means).max())
    node_means = evaluate_masks(model, masks, pairs, **kw)
    assert node_means[-2] == pytest.approx(as_means[-2], rel=1e-5)  # the full model ablates nothing
    assert abs(node_means[-1] - as_means[-1]) > 1e-2 * np.abs(as_means).max()


def test_cli_learns_constants(model, model_dir, ioi_csv, learned, tmp_path, capsys):
    out = str(tmp_path / "cli.npz")
    assert main(["optimal-ablation", "--model", model_dir, "--data", ioi_csv, "--steps", "2", "--lr", str(LR),
                 "--batch-size", "12", "--quiet", "--out", out]) == 0
    assert "optimal ablation of 4 nodes on 12 prompts, 2 steps" in capsys.readouterr().out
    got = load(out, model)
    assert got.values.shape == learned.values.shape and got.history["loss"].shape == (2,)
    # two Adam steps from the means: each value moved, by at most ~3.2 lr per step
    means = mean_activations(model, ioi_csv, batch_size=12)[0]
    moved = np.abs(got.values - means)
    assert moved.max() <= 2 * 3.2 * LR and np.median(moved) > 0.5 * LR


def _bad_files(tmp_path, model):
    spec = model.graph_spec
    good = OptimalAblation(np.zeros((spec.n_forward, model.cfg.d_model), np.float32), spec.forward_names,
                           {"n_layers": spec.n_layers})
    files = {"text": tmp_path / "text.npz", "other_model": tmp_path / "other.npz", "nan": tmp_path / "nan.npz",
             "plain_npz": tmp_path / "plain.npz"}
    files["text"].write_text("clean,corrupted\n")
    save(OptimalAblation(np.zeros((5, 32), np.float32), ["input", "a0.h0", "a0.h1", "a0.h2", "m0"], {"n_layers": 1}),
         str(files["other_model"]))
    np.savez(files["plain_npz"], values=good.values)
    save(good, str(files["nan"]))
    with np.load(files["nan"]) as f:  # the same file with one NaN (save refuses to write one)
        arrays = dict(f)
    arrays["values"][3, 5] = np.nan
    np.savez(files["nan"], **arrays)
    return {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize("case, message", [
    ("missing", "--intervention optimal needs --intervention-data FILE.npz"),
    ("text", r"--intervention-data .*text.npz: not an optimal-ablation file"),
    ("plain_npz", r"--intervention-data .*plain.npz: not an optimal-ablation file .*missing \['cfg', 'format'"),
    ("other_model", r"other.npz: constants for 5 nodes of a graph .* but the model's graph has 4 nodes"),
    ("nan", r"nan.npz: the constants hold NaN or infinity"),
])
def test_bad_constants_exit_2_with_one_line(model, model_dir, ioi_csv, tmp_path, capsys, case, message):
    files = _bad_files(tmp_path, model)
    graph = str(tmp_path / "g.json")
    Graph(model.graph_spec).to_json(graph)
    argv = ["evaluate", "--model", model_dir, "--data", ioi_csv, "--graph", graph, "--intervention", "optimal"]
    if case != "missing":
        argv += ["--intervention-data", files[case]]
    before = {p: open(p, "rb").read() for p in files.values()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert {p: open(p, "rb").read() for p in files.values()} == before


def test_library_refusals(model, ioi_csv):
    with pytest.raises(ValueError, match="intervention 'optimal' needs its learned constants"):
        evaluate_masks(model, model.graph_spec.real_edge_mask[None], ioi_csv, intervention="optimal")
    with pytest.raises(ValueError, match=r"intervention_data: constants of shape \(3, 32\) .* \[4, 32\]"):
        evaluate_masks(model, model.graph_spec.real_edge_mask[None], ioi_csv, intervention="optimal",
                       intervention_data=np.zeros((3, 32), np.float32))
    with pytest.raises(ValueError, match="need steps, check_every, patience >= 1 and lr > 0"):
        learn_optimal_ablation(model, ioi_csv, steps=0)


def test_sweeps_refuse_optimal(tmp_path):
    """A sweep file has no place for per-model constants: refused when it is read."""
    from jaxinterp.sweep import SweepError, parse_sweep

    (tmp_path / "hf").mkdir()
    toml = ('[sweep]\nmethods = ["EAP"]\nintervention = "optimal"\n[models]\ntiny = "hf"\n'
            '[tasks.gen]\ngenerate = "ioi"\nn = 8\n')
    with pytest.raises(SweepError, match=r"\[sweep\].intervention 'optimal' is not offered in sweeps"):
        parse_sweep(toml, str(tmp_path))
    parse_sweep(toml.replace('"optimal"', '"mean"'), str(tmp_path))  # the same file with mean is fine
