"""Attribution scores against independent computations on the hand-built forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.attribution import AttributionError, attribute, prepare_data
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


def test_eap_equals_the_directional_derivative_along_each_edge(model, pairs):
    graph = attribute(model, pairs, method="EAP", batch_size=5, quiet=True)  # 12 examples: a ragged last batch
    mask, clean, corr = _runs(model, pairs)
    for name, s, d in _sampled_edges(model.graph_spec):
        src = name.split("->")[0]
        want = -_directional_derivative(model, pairs, mask, name, corr[src] - clean[src])  # loss sign
        np.testing.assert_allclose(graph.scores[s, d], want, rtol=2e-3, atol=1e-6, err_msg=name)


def test_eap_ig_inputs_averages_gradients_along_the_embedding_path(model, pairs):
    steps = 3
    graph = attribute(model, pairs, method="EAP-IG-inputs", ig_steps=steps, batch_size=8, quiet=True)
    mask, clean, corr = _runs(model, pairs)
    for name, s, d in _sampled_edges(model.graph_spec, seed=1)[:6]:
        src = name.split("->")[0]
        want = 0.0
        for k in range(steps):  # the reference's points: k / steps, k = 0 .. steps - 1
            emb = corr["input"] + (k / steps) * (clean["input"] - corr["input"])
            want += -_directional_derivative(model, pairs, mask, name, corr[src] - clean[src], emb) / steps
        np.testing.assert_allclose(graph.scores[s, d], want, rtol=2e-3, atol=1e-6, err_msg=name)


def test_exact_equals_a_handbuilt_patch_of_each_edge(model, pairs):
    graph = attribute(model, pairs, method="exact", batch_size=8, exact_chunk=16, quiet=True)
    mask, clean, corr = _runs(model, pairs)
    base = _metric_mean(handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask)[0], pairs)
    for name, s, d in _sampled_edges(model.graph_spec, seed=2):
        src, dst = name.split("->")
        logits, _ = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask,
                                      extra={dst: corr[src] - clean[src]})
        want = -(_metric_mean(logits, pairs) - base)
        np.testing.assert_allclose(graph.scores[s, d], want, rtol=2e-3, atol=1e-6, err_msg=name)


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
    np.testing.assert_allclose(remat.scores, plain.scores, rtol=1e-5, atol=1e-7)


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
    from jaxinterp.attribution import mean_activations

    assert len(set(pairs.lengths)) > 1  # ragged prompts: padding must be left out
    overall, per_pos = _handbuilt_means(model, pairs)
    means, counts = mean_activations(model, pairs, batch_size=5)
    by_pos, _ = mean_activations(model, pairs, per_position=True, batch_size=5)
    np.testing.assert_array_equal(counts, pairs.attention_mask.sum(0))
    for i, name in enumerate(model.graph_spec.forward_names):
        np.testing.assert_allclose(means[i], overall[name], rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(by_pos[i], per_pos[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("intervention", ["mean", "mean-positional"])
def test_exact_with_a_mean_intervention_patches_in_the_node_mean(model, pairs, intervention):
    graph = attribute(model, pairs, method="exact", intervention=intervention, batch_size=8, exact_chunk=16,
                      quiet=True)
    mask, clean, _ = _runs(model, pairs)
    overall, per_pos = _handbuilt_means(model, pairs)
    means = per_pos if intervention == "mean-positional" else {k: v[None] for k, v in overall.items()}
    base = _metric_mean(handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask)[0], pairs)
    for name, s, d in _sampled_edges(model.graph_spec, seed=3)[:6]:
        src, dst = name.split("->")
        logits, _ = handbuilt.forward(model.params, model.cfg, jnp.asarray(pairs.clean), mask,
                                      extra={dst: jnp.asarray(means[src], jnp.float32)[None] - clean[src]})
        want = -(_metric_mean(logits, pairs) - base)
        np.testing.assert_allclose(graph.scores[s, d], want, rtol=2e-3, atol=1e-6, err_msg=name)


def test_eap_with_a_mean_intervention_is_the_derivative_towards_the_mean(model, pairs):
    graph = attribute(model, pairs, method="EAP", intervention="mean", batch_size=8, quiet=True)
    mask, clean, _ = _runs(model, pairs)
    overall, _ = _handbuilt_means(model, pairs)
    for name, s, d in _sampled_edges(model.graph_spec, seed=4)[:6]:
        src = name.split("->")[0]
        direction = jnp.asarray(overall[src], jnp.float32) - clean[src]
        want = -_directional_derivative(model, pairs, mask, name, direction)
        np.testing.assert_allclose(graph.scores[s, d], want, rtol=2e-3, atol=1e-6, err_msg=name)


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
