"""EAP-IG-activations and clean-corrupted scores against an independent computation:
``jax.grad`` of the hand-built forward (tests/handbuilt.py, no code shared with
jaxinterp.models) with a group's outputs overwritten at the reference's interpolation
points, contracted with the activation differences by hand, edge by edge.

On the shipped trained demo model (effects up to ~5 logits per edge), every edge must
agree within 1e-4 of the largest |score|. Wrong variants that an earlier check (Pearson
> 0.5 against EAP) let through all fail here: no gradient cut through the overwritten
group, points k = 0 .. steps-1 instead of 1 .. steps, a 5x scale, one interpolation of all
groups at once (for clean-corrupted: the clean run only, a 5x scale).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handbuilt
from jaxinterp import compiler, load_model, tasks
from jaxinterp.attribution import attribute
from jaxinterp.interventions import prepare_data
from jaxinterp.demo import demo_model_dir

STEPS = 2
TOL = 1e-4  # of the largest |score|


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    model = load_model(demo_model_dir())
    csv = tasks.write_pairs_csv("ioi", 6, str(tmp_path_factory.mktemp("values") / "ioi.csv"), model.tokenizer,
                                seed=3)
    pairs = prepare_data(model, csv, "logit_diff")[0]
    assert len(set(pairs.lengths)) > 1  # padded prompts in one batch
    return model, pairs


def _mean_logit_diff(logits, pairs):
    rows = np.arange(len(pairs))
    last = logits[rows, pairs.lengths - 1]
    return (last[rows, pairs.labels[:, 0]] - last[rows, pairs.labels[:, 1]]).mean()


_OUTPUTS = {}


def _outputs(model, pairs, which):
    """Node outputs ``{name: [batch, pos, d_model]}`` of the clean or corrupted prompts
    (both with the clean prompts' attention mask, as the reference runs them)."""
    key = (id(model), id(pairs), which)
    if key not in _OUTPUTS:
        tokens = pairs.clean if which == "clean" else pairs.corrupted
        _OUTPUTS[key] = handbuilt.forward(model.params, model.cfg, jnp.asarray(tokens),
                                          jnp.asarray(pairs.attention_mask))[1]
    return _OUTPUTS[key]


def _ablated(model, pairs, intervention):
    """What a node's output is moved to: the corrupted run's, zero, or (jaxinterp's
    ``mean``) the node's mean output over the clean prompts' real tokens."""
    clean = _outputs(model, pairs, "clean")
    if intervention == "patching":
        return _outputs(model, pairs, "corrupted")
    if intervention == "zero":
        return {u: jnp.zeros_like(a) for u, a in clean.items()}
    m = np.asarray(pairs.attention_mask, np.float64)[..., None]
    return {u: jnp.broadcast_to(jnp.asarray((np.asarray(a) * m).sum((0, 1)) / m.sum(), jnp.float32), a.shape)
            for u, a in clean.items()}


@functools.lru_cache(maxsize=None)
def _gradient_function(cfg, spec):
    """``grad(extra, tokens, mask, lengths, labels, values, sel, clean, cut)``:
    ``{downstream input: d mean metric / d input}`` at a run on ``tokens`` in which every
    node ``u`` with ``sel[u] = 1`` outputs ``values[u]``.

    ``cut``: the gradient through an overwritten node into its own inputs is cut (what the
    reference's overwriting hook does). Built without touching the forward: a first pass
    gives each node's output ``o_u``; the second adds ``sel_u (values_u - o_u)`` to every
    input downstream of ``u``. ``o_u`` is the same function of the inputs in both passes
    (what is added lies downstream of it), so those inputs see ``values_u`` and nothing
    flows back through ``u``. Without ``cut`` (a wrong variant) the fixed change
    ``values_u - clean_u`` is added instead and the gradient flows on through ``u``."""
    feeds = {v: [spec.forward_names[s] for s in np.nonzero(spec.real_edge_mask[:, d])[0]]
             for d, v in enumerate(spec.backward_names)}
    index = {u: i for i, u in enumerate(spec.forward_names)}

    def f(extra, tokens, mask, lengths, labels, params, values, sel, clean, cut):
        outs = handbuilt.forward(params, cfg, tokens, mask, extra=extra)[1] if cut else clean
        extra = {v: extra[v] + sum(sel[index[u]] * (values[u] - outs[u]) for u in feeds[v]) for v in extra}
        logits, _ = handbuilt.forward(params, cfg, tokens, mask, extra=extra)
        rows = jnp.arange(tokens.shape[0])
        last = logits[rows, lengths - 1]
        return (last[rows, labels[:, 0]] - last[rows, labels[:, 1]]).mean()

    return compiler.jit(jax.grad(f), static_argnames=("cut",))


def _input_gradients(model, pairs, tokens, overwrite=None, cut=True):
    """``{downstream input: gradient}`` at a run on ``tokens`` whose nodes in ``overwrite``
    ({name: value}) output those values (see :func:`_gradient_function`)."""
    spec = model.graph_spec
    clean = _outputs(model, pairs, "clean")
    overwrite = overwrite or {}
    values = {u: overwrite.get(u, clean[u]) for u in spec.forward_names}
    sel = jnp.asarray([u in overwrite for u in spec.forward_names], jnp.float32)
    zeros = {v: jnp.zeros(pairs.clean.shape + (model.cfg.d_model,), jnp.float32) for v in spec.backward_names}
    grads = _gradient_function(model.cfg, spec)(
        zeros, jnp.asarray(tokens), jnp.asarray(pairs.attention_mask), jnp.asarray(pairs.lengths),
        jnp.asarray(pairs.labels), model.params, values, sel, clean, cut=cut)
    return grads


def _edge_scores(model, grads, delta):
    """``[src, dst]``: -(sum over examples, positions of delta_u . grad_v) (the loss sign)."""
    spec = model.graph_spec
    d = np.stack([np.asarray(delta[u], np.float64) for u in spec.forward_names])
    g = np.stack([np.asarray(grads[v], np.float64) for v in spec.backward_names])
    return np.where(spec.real_edge_mask, -np.einsum("sbpd,tbpd->st", d, g), 0.0)


def _groups(cfg):
    """The reference's groups: the input, then per layer all its heads, then its MLP."""
    groups = [["input"]]
    for layer in range(cfg.n_layers):
        groups += [[f"a{layer}.h{h}" for h in range(cfg.n_heads)], [f"m{layer}"]]
    return groups


def handbuilt_ig_activations(model, pairs, intervention, steps=STEPS, points=None, groups=None, cut=True):
    """The reference's EAP-IG-activations: for each group and alpha = k / steps, k = 1 ..
    steps, the group's outputs set to alpha clean + (1 - alpha) ablated; the gradient at
    every downstream input, contracted with (ablated - clean); averaged over all runs.
    ``points``, ``groups``, ``cut``: for building the wrong variants."""
    clean, ablated = _outputs(model, pairs, "clean"), _ablated(model, pairs, intervention)
    delta = {u: ablated[u] - clean[u] for u in clean}
    points = range(1, steps + 1) if points is None else points
    groups = _groups(model.cfg) if groups is None else groups
    total, runs = 0.0, 0
    for group in groups:
        for k in points:
            a = k / steps
            values = {u: a * clean[u] + (1 - a) * ablated[u] for u in group}
            grads = _input_gradients(model, pairs, pairs.clean, values, cut=cut)
            total, runs = total + _edge_scores(model, grads, delta), runs + 1
    return total / runs


def handbuilt_clean_corrupted(model, pairs, runs=("clean", "corrupted")):
    """The reference's clean-corrupted: the gradient at every downstream input on the clean
    run and on the corrupted run (clean attention mask), averaged, contracted with
    (corrupted - clean)."""
    clean, corr = _outputs(model, pairs, "clean"), _outputs(model, pairs, "corrupted")
    delta = {u: corr[u] - clean[u] for u in clean}
    grads = [_input_gradients(model, pairs, pairs.clean if r == "clean" else pairs.corrupted) for r in runs]
    return sum(_edge_scores(model, g, delta) for g in grads) / len(grads)


def _assert_close(got, want, real, what):
    scale = np.abs(want[real]).max()
    assert scale > 1e-2, f"{what}: effects too small to test"
    err = np.abs(got - want)[real].max() / scale
    assert err <= TOL, f"{what}: max |diff| = {err:.2e} of max |score| {scale:.3g}"
    assert (got[~real] == 0).all()


def check_ig_activations(attribute_fn, model, pairs, intervention):
    got = attribute_fn(model, pairs, method="EAP-IG-activations", intervention=intervention, ig_steps=STEPS,
                       batch_size=4, quiet=True).scores
    want = handbuilt_ig_activations(model, pairs, intervention)
    _assert_close(got, want, model.graph_spec.real_edge_mask, f"EAP-IG-activations {intervention}")


def check_clean_corrupted(attribute_fn, model, pairs):
    got = attribute_fn(model, pairs, method="clean-corrupted", batch_size=4, quiet=True).scores
    _assert_close(got, handbuilt_clean_corrupted(model, pairs), model.graph_spec.real_edge_mask, "clean-corrupted")


@pytest.mark.parametrize("intervention", ["patching", "zero", "mean"])
def test_eap_ig_activations_equals_gradients_at_the_references_points(demo, intervention):
    """``mean`` interpolates toward the node means (jaxinterp's definition; the reference
    interpolates toward zero there, see the README)."""
    check_ig_activations(attribute, *demo, intervention)


def test_clean_corrupted_equals_the_average_of_the_clean_and_corrupted_gradients(demo):
    check_clean_corrupted(attribute, *demo)


def test_the_handbuilt_references_tell_the_wrong_variants_apart(demo):
    """Each wrong variant differs from the hand-built reference by far more than the
    tolerance on this model, so a jaxinterp that computed it would fail the tests above."""
    model, pairs = demo
    real = model.graph_spec.real_edge_mask
    right = handbuilt_ig_activations(model, pairs, "patching")
    all_at_once = [[u for g in _groups(model.cfg) for u in g]]
    variants = {
        "no gradient cut": handbuilt_ig_activations(model, pairs, "patching", cut=False),
        "k = 0 .. steps-1": handbuilt_ig_activations(model, pairs, "patching", points=range(STEPS)),
        "5x scale": 5 * right,
        "all groups at once": handbuilt_ig_activations(model, pairs, "patching", groups=all_at_once),
    }
    scale = np.abs(right[real]).max()
    for name, wrong in variants.items():
        assert np.abs(wrong - right)[real].max() > 100 * TOL * scale, name
    cc = handbuilt_clean_corrupted(model, pairs)
    for name, wrong in {"clean run only": handbuilt_clean_corrupted(model, pairs, runs=("clean",)),
                        "5x scale": 5 * cc}.items():
        assert np.abs(wrong - cc)[real].max() > 100 * TOL * np.abs(cc[real]).max(), name
