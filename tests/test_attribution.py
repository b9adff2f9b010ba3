"""Attribution scores against independent computations on the hand-built forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.attribution import AttributionError, attribute
from jaxinterp.interventions import prepare_data
from jaxinterp.loading import load_model
from jaxinterp.metrics import logit_diff

import handbuilt

N_SAMPLED = 12


@pytest.fixture(scope="module")
def pairs(model, ioi_csv):
    return prepare_data(model, ioi_csv, "logit_diff")[0]


def _metric_mean(logits, pairs):
    return logit_diff(logits, logits, jnp.asarray(pairs.lengths), jnp.asarray(pairs.labels)).mean()


def _runs(model, pairs):
    mask = jnp.asarray(pairs.attention_mask)
    _, clean = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask)
    _, corr = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.corrupted), mask)
    return mask, clean, corr


def _sampled_edges(spec, seed=0):
    rng = np.random.default_rng(seed)
    names = [e[0] for e in spec.edges]
    picks = list(rng.choice(names, N_SAMPLED, replace=False)) + ["input->logits", "m1->logits"]
    return [(n, *spec.edge_index(n)) for n in picks]


def _directional_derivative(model, pairs, mask, name, direction, emb=None):
    """d/dt of the mean logit difference when input ``dst`` of edge ``name`` gets ``t * direction``."""
    dst = name.split("->")[1]

    def f(t):
        logits, _ = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask,
                                      extra={dst: t * direction}, emb=emb)
        return _metric_mean(logits, pairs)

    return jax.jvp(f, (0.0,), (1.0,))[1]


SCORE_TOL = 1e-4  # of the largest |score| compared


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """``(model, pairs)``: a random GPT-2 whose edges matter (``initializer_range=0.2``:
    sampled scores up to ~0.04, median edge ~4e-3; the default init's median is ~1e-5,
    where a fixed ``atol`` lets through errors of tens of percent) and 12 ragged IOI pairs."""
    from devtools.testing import write_ioi_csv
    from devtools.testing import save_random_gpt2

    path = save_random_gpt2(str(tmp_path_factory.mktemp("sharp_gpt2")), n_layer=2, n_head=4, n_embd=32, seed=0,
                            initializer_range=0.2)
    model = load_model(path)
    csv = write_ioi_csv(tmp_path_factory.mktemp("sharp_data") / "ioi.csv", model.tokenizer, ragged=True)
    return model, prepare_data(model, csv, "logit_diff")[0]


def _assert_scores(got, want, names):
    """Every score within ``SCORE_TOL`` of the largest |wanted score| (effects not tiny)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    assert scale > 1e-2, f"effects too small to test ({scale:.2e})"
    worst = int(np.argmax(np.abs(got - want)))
    assert np.abs(got - want).max() <= SCORE_TOL * scale, (
        f"{names[worst]}: {got[worst]} != {want[worst]} (tolerance {SCORE_TOL * scale:.2e})")


def test_eap_equals_the_directional_derivative_along_each_edge(sharp):
    model, pairs = sharp
    graph = attribute(model, pairs, method="EAP", batch_size=5, quiet=True)  # 12 examples: a ragged last batch
    mask, clean, corr = _runs(model, pairs)
    edges = _sampled_edges(model.graph_spec)
    want = [-_directional_derivative(model, pairs, mask, name, corr[name.split("->")[0]] - clean[name.split("->")[0]])
            for name, _, _ in edges]  # loss sign
    _assert_scores([graph.scores[s, d] for _, s, d in edges], want, [n for n, _, _ in edges])


def test_eap_ig_inputs_averages_gradients_along_the_embedding_path(sharp):
    model, pairs = sharp
    steps = 3
    graph = attribute(model, pairs, method="EAP-IG-inputs", ig_steps=steps, batch_size=8, quiet=True)
    mask, clean, corr = _runs(model, pairs)
    edges = _sampled_edges(model.graph_spec, seed=1)[:6] + _sampled_edges(model.graph_spec)[-2:]
    wants = []
    for name, s, d in edges:
        src = name.split("->")[0]
        want = 0.0
        for k in range(steps):  # the reference's points: k / steps, k = 0 .. steps - 1
            emb = corr["input"] + (k / steps) * (clean["input"] - corr["input"])
            want += -_directional_derivative(model, pairs, mask, name, corr[src] - clean[src], emb) / steps
        wants.append(want)
    _assert_scores([graph.scores[s, d] for _, s, d in edges], wants, [n for n, _, _ in edges])


def test_exact_equals_a_handbuilt_patch_of_each_edge(sharp):
    model, pairs = sharp
    graph = attribute(model, pairs, method="exact", batch_size=8, exact_chunk=16, quiet=True)
    mask, clean, corr = _runs(model, pairs)
    base = _metric_mean(handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask)[0], pairs)
    edges, wants = _sampled_edges(model.graph_spec, seed=2), []
    for name, s, d in edges:
        src, dst = name.split("->")
        logits, _ = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask,
                                      extra={dst: corr[src] - clean[src]})
        wants.append(-(_metric_mean(logits, pairs) - base))
    _assert_scores([graph.scores[s, d] for _, s, d in edges], wants, [n for n, _, _ in edges])


def test_ig_completeness_at_the_input_node(model, ioi_csv):
    """With many steps, the input node's EAP-IG-inputs attribution (summed over its
    outgoing edges) is m(clean) - m(corrupted): only the embeddings differ."""
    from jaxinterp.data import load_pairs

    pairs = load_pairs(ioi_csv, model.tokenizer)
    same_length = pairs.lengths == pairs.corrupted_lengths
    assert same_length.all()
    graph = attribute(model, pairs, method="EAP-IG-inputs", ig_steps=200, batch_size=16, quiet=True)
    mask = jnp.asarray(pairs.attention_mask)
    m_clean = _metric_mean(handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask)[0], pairs)
    m_corr = _metric_mean(handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.corrupted), mask)[0], pairs)
    # the left Riemann sum is off by O(1/steps) of the total change
    np.testing.assert_allclose(graph.nodes_scores[0], m_clean - m_corr, rtol=2e-2)
    np.testing.assert_allclose(graph.scores[0].sum(), graph.nodes_scores[0], rtol=1e-5)


def test_clean_corrupted_and_activations_methods_run_and_agree_in_sign(model, pairs):
    eap = attribute(model, pairs, method="EAP", batch_size=8, quiet=True).scores
    real = model.graph_spec.real_edge_mask
    for method in ["clean-corrupted", "EAP-IG-activations"]:
        s = attribute(model, pairs, method=method, ig_steps=3, batch_size=8, quiet=True).scores
        assert np.isfinite(s).all() and (s[~real] == 0).all()
        assert np.corrcoef(s[real], eap[real])[0, 1] > 0.5, method


def test_bad_arguments_are_refused(model, pairs):
    with pytest.raises(ValueError, match="unknown method"):
        attribute(model, pairs, method="EAP-IG", quiet=True)
    with pytest.raises(ValueError, match="patching"):
        attribute(model, pairs, method="EAP-IG-inputs", intervention="zero", quiet=True)


def test_nan_scores_raise(model, pairs):
    params = jax.tree.map(lambda a: a, model.params)
    params["ln_f"] = dict(params["ln_f"], w=params["ln_f"]["w"].at[0].set(jnp.nan))
    broken = type(model)(model.cfg, params, model.tokenizer)
    with pytest.raises(AttributionError, match="non-finite"):
        attribute(broken, pairs, method="EAP", batch_size=8, quiet=True)


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs"])
def test_remat_gives_the_same_scores(model, ioi_csv, method):
    plain = attribute(model, ioi_csv, method=method, batch_size=6, quiet=True)
    remat = attribute(model, ioi_csv, method=method, batch_size=6, quiet=True, remat=True)
    np.testing.assert_allclose(remat.scores, plain.scores, rtol=1e-5, atol=1e-5 * np.abs(plain.scores).max())


def test_bfloat16_model_gives_float32_scores_close_to_float32(gpt2_dir, model, ioi_csv):
    bf16 = load_model(gpt2_dir, dtype=jnp.bfloat16)
    assert bf16.params["blocks"]["attn"]["w_q"].dtype == jnp.bfloat16
    low = attribute(bf16, ioi_csv, method="EAP", batch_size=6, quiet=True)
    full = attribute(model, ioi_csv, method="EAP", batch_size=6, quiet=True)
    assert low.scores.dtype == np.float32
    real = model.graph_spec.real_edge_mask
    assert np.corrcoef(low.scores[real], full.scores[real])[0, 1] > 0.99


def _handbuilt_means(model, pairs):
    """Node means over the real tokens of the clean prompts, from the hand-built forward:
    ``({node: [d_model]}, {node: [pos, d_model]})``."""
    mask, clean, _ = _runs(model, pairs)
    m = np.asarray(mask, np.float64)[..., None]
    overall = {k: (np.asarray(v) * m).sum((0, 1)) / m.sum() for k, v in clean.items()}
    per_pos = {k: (np.asarray(v) * m).sum(0) / np.maximum(m.sum(0), 1) for k, v in clean.items()}
    return overall, per_pos


def test_mean_activations_average_each_node_over_the_real_tokens(model, pairs):
    from jaxinterp.interventions import mean_activations

    assert len(set(pairs.lengths)) > 1  # ragged prompts: padding must be left out
    overall, per_pos = _handbuilt_means(model, pairs)
    means, counts = mean_activations(model, pairs, batch_size=5)
    by_pos, _ = mean_activations(model, pairs, per_position=True, batch_size=5)
    np.testing.assert_array_equal(counts, pairs.attention_mask.sum(0))
    for i, name in enumerate(model.graph_spec.forward_names):
        np.testing.assert_allclose(means[i], overall[name], rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(by_pos[i], per_pos[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("intervention", ["mean", "mean-positional"])
def test_exact_with_a_mean_intervention_patches_in_the_node_mean(sharp, intervention):
    model, pairs = sharp
    graph = attribute(model, pairs, method="exact", intervention=intervention, batch_size=8, exact_chunk=16,
                      quiet=True)
    mask, clean, _ = _runs(model, pairs)
    overall, per_pos = _handbuilt_means(model, pairs)
    means = per_pos if intervention == "mean-positional" else {k: v[None] for k, v in overall.items()}
    base = _metric_mean(handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask)[0], pairs)
    edges, wants = _sampled_edges(model.graph_spec, seed=3)[:6] + _sampled_edges(model.graph_spec)[-2:], []
    for name, s, d in edges:
        src, dst = name.split("->")
        logits, _ = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask,
                                      extra={dst: jnp.asarray(means[src], jnp.float32)[None] - clean[src]})
        wants.append(-(_metric_mean(logits, pairs) - base))
    _assert_scores([graph.scores[s, d] for _, s, d in edges], wants, [n for n, _, _ in edges])


def test_eap_with_a_mean_intervention_is_the_derivative_towards_the_mean(sharp):
    model, pairs = sharp
    graph = attribute(model, pairs, method="EAP", intervention="mean", batch_size=8, quiet=True)
    mask, clean, _ = _runs(model, pairs)
    overall, _ = _handbuilt_means(model, pairs)
    edges = _sampled_edges(model.graph_spec, seed=4)[:6] + _sampled_edges(model.graph_spec)[-2:]
    wants = [-_directional_derivative(model, pairs, mask, name, jnp.asarray(overall[name.split("->")[0]], jnp.float32)
                                      - clean[name.split("->")[0]]) for name, _, _ in edges]
    _assert_scores([graph.scores[s, d] for _, s, d in edges], wants, [n for n, _, _ in edges])


def test_mean_positional_needs_intervention_data_that_reaches_every_position(model, pairs):
    short = pairs.head(12)
    keep = short.lengths == short.lengths.min()
    from jaxinterp.data import Pairs

    shorter = Pairs(*(None if a is None else a[keep] for a in (short.clean, short.corrupted, short.attention_mask,
                                                               short.lengths, short.labels, short.corrupted_lengths)))
    with pytest.raises(ValueError, match="mean-positional: the intervention data's prompts are at most"):
        attribute(model, pairs, method="EAP", intervention="mean-positional", intervention_data=shorter, quiet=True)
    with pytest.raises(ValueError, match="intervention_data is used by the mean interventions only"):
        attribute(model, pairs, method="EAP", intervention="zero", intervention_data=shorter, quiet=True)


def test_exact_from_the_destination_layer_equals_a_whole_patched_forward(tmp_path):
    """Exact patching resumes each patched run at its destination's layer from the clean
    residual stream (forward(resume=...), scanned). At scan depth, on an RMSNorm model with
    grouped-query attention, it equals the whole patched forward pass (add-one, unrolled,
    from the first layer) for edges into every layer and into the logits."""
    from devtools.testing import save_random_llama
    from jaxinterp.attribution import dst_layers
    from jaxinterp.data import Pairs
    from jaxinterp.interventions import corrupted_outputs
    from jaxinterp.models import SCAN_MIN_LAYERS, EdgeIntervention, forward

    model = load_model(save_random_llama(str(tmp_path / "deep"), num_hidden_layers=SCAN_MIN_LAYERS,
                                         initializer_range=0.2))
    rng = np.random.default_rng(0)
    n, n_pos, vocab = 4, 9, model.cfg.vocab_size
    clean = rng.integers(1, vocab, size=(n, n_pos)).astype(np.int32)
    corrupted = np.where(rng.random((n, n_pos)) < 0.5, rng.integers(1, vocab, size=(n, n_pos)), clean).astype(np.int32)
    pairs = Pairs(clean, corrupted, np.ones((n, n_pos), np.int32), np.full(n, n_pos, np.int32),
                  rng.integers(1, vocab, size=(n, 2)).astype(np.int32))
    graph = attribute(model, pairs, method="exact", batch_size=n, exact_chunk=32, quiet=True)

    spec = model.graph_spec
    batch = next(pairs.batches(n))
    _, clean_outs, corr_outs = corrupted_outputs(model.params, model.cfg, batch, "patching")
    base = _metric_mean(forward(model.params, model.cfg, clean, scan=False), pairs)
    src, dst = np.nonzero(spec.real_edge_mask)
    layer_of = dst_layers(spec)[dst]
    picks = [rng.choice(np.flatnonzero(layer_of == layer)) for layer in range(spec.n_layers + 1)]
    wants, got = [], []
    for i in picks:
        s, d = src[i], dst[i]
        iv = EdgeIntervention(jax.nn.one_hot(d, spec.n_backward)[None], (corr_outs - clean_outs)[s][None],
                              mode="add-one")
        logits = forward(model.params, model.cfg, clean, intervention=iv, scan=False)
        wants.append(-(_metric_mean(logits, pairs) - base))
        got.append(graph.scores[s, d])
    _assert_scores(got, wants, [f"src {src[i]} -> dst {dst[i]} (layer {layer_of[i]})" for i in picks])
