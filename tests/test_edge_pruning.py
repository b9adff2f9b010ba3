"""Edge pruning: learned masks recover a circuit planted in the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import load_model
from jaxinterp.data import Pairs
from jaxinterp.edge_pruning import HardConcrete, learn_circuit
from jaxinterp.evaluation import evaluate_masks
from devtools.testing import save_random_gpt2

N_POS = 8


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A random 2-layer GPT-2 whose logits depend on two heads only: every other head's
    output projection and every MLP's output are zero, so only edges between the input,
    a0.h0, a1.h2 and the logits can carry anything. The two live heads are scaled up
    (output x8 / x40, queries and keys x8) so that every one of their edges matters.
    Data: random clean and corrupted tokens of one length (BOS first)."""
    model = load_model(save_random_gpt2(str(tmp_path_factory.mktemp("planted")), seed=0))
    attn, mlp = model.params["blocks"]["attn"], model.params["blocks"]["mlp"]
    out_scale = np.zeros(attn["w_o"].shape[:2])
    out_scale[0, 0], out_scale[1, 2] = 8.0, 40.0
    qk_scale = np.ones(attn["w_o"].shape[:2])
    qk_scale[0, 0] = qk_scale[1, 2] = 8.0
    attn["w_o"] = attn["w_o"] * jnp.asarray(out_scale)[:, :, None, None]
    for k in ("w_q", "w_k"):
        attn[k] = attn[k] * jnp.asarray(qk_scale)[:, :, None, None]
    mlp["w_out"] = jnp.zeros_like(mlp["w_out"])

    rng = np.random.default_rng(0)
    n, vocab = 32, model.cfg.vocab_size
    clean, corrupted = rng.integers(4, vocab, (2, n, N_POS)).astype(np.int32)
    clean[:, 0] = corrupted[:, 0] = model.tokenizer.bos_token_id
    pairs = Pairs(clean, corrupted, np.ones((n, N_POS), np.int32), np.full(n, N_POS, np.int32),
                  rng.integers(4, vocab, (n, 2)).astype(np.int32), np.full(n, N_POS, np.int32))
    edges = ({f"input->a0.h0<{x}>" for x in "qkv"} | {f"{s}->a1.h2<{x}>" for s in ("input", "a0.h0") for x in "qkv"}
             | {f"{s}->logits" for s in ("input", "a0.h0", "a1.h2")})
    return model, pairs, edges


def test_every_planted_edge_matters_and_no_other_does(planted):
    """The premise of the recovery tests, by evaluation: removing one planted edge
    changes the output; removing all other edges at once changes nothing."""
    model, pairs, edges = planted
    spec = model.graph_spec
    masks = [spec.real_edge_mask.copy() for _ in edges]
    for m, name in zip(masks, sorted(edges)):
        m[spec.edge_index(name)] = False
    only_planted = np.zeros_like(spec.real_edge_mask)
    for name in edges:
        only_planted[spec.edge_index(name)] = True
    kl = evaluate_masks(model, np.stack(masks + [only_planted]), pairs, metric="kl_div")
    assert (kl[:-1] > 1e-4).all(), dict(zip(sorted(edges), kl))
    assert abs(kl[-1]) < 1e-6


def test_mask_training_recovers_the_planted_circuit(planted):
    model, pairs, edges = planted
    result = learn_circuit(model, pairs, len(edges), steps=300, batch_size=16, quiet=True)
    assert set(result.graph.edges_in_graph()) == edges
    h = result.history
    assert h["density"][-1] < 0.2 and h["target"][-1] == pytest.approx(len(edges) / model.graph_spec.n_edges)
    # the learned circuit is faithful: its KL is a small fraction of the empty circuit's
    spec = model.graph_spec
    kl = evaluate_masks(model, np.stack([result.graph.in_graph, np.zeros_like(spec.real_edge_mask)]), pairs,
                        metric="kl_div")
    assert kl[0] < 0.01 * kl[1]


def test_position_aware_masks_recover_the_positions_that_matter(planted):
    """Per position: the logits read the last position only, and so does the last layer's
    query; BOS (position 0) is the same in both prompts, so nothing there matters."""
    model, pairs, edges = planted
    want = set()
    for name in edges:
        dst = name.split("->")[1]
        positions = [N_POS - 1] if dst in ("logits", "a1.h2<q>") else range(1, N_POS)
        want |= {(p, name) for p in positions}
    result = learn_circuit(model, pairs, len(want), steps=400, batch_size=16, quiet=True, positional=True)
    g = result.graph
    got = {(int(p), name) for name, s, d in model.graph_spec.edges for p in np.nonzero(g.in_graph[:, s, d])[0]}
    assert got == want
    assert result.log_alpha.shape == (N_POS,) + model.graph_spec.real_edge_mask.shape


def test_hard_concrete_keep_probability_is_the_sampled_frequency():
    hc = HardConcrete()
    log_alpha = jnp.linspace(-4.0, 4.0, 9)
    z = jax.vmap(lambda k: hc.sample(log_alpha, k))(jax.random.split(jax.random.key(0), 20000))
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0  # exact zeros and ones occur
    np.testing.assert_allclose((z > 0).mean(0), hc.keep_probability(log_alpha), atol=0.01)


def test_initialising_from_scores_puts_the_top_edges_in(planted):
    from jaxinterp.edge_pruning import _init_log_alpha

    model, _, _ = planted
    real = model.graph_spec.real_edge_mask
    scores = np.where(real, np.random.default_rng(0).normal(size=real.shape), 0.0)
    log_alpha = _init_log_alpha(real.shape, real, 10, 3.0, scores)
    top = np.argsort(-np.abs(np.where(real, scores, 0)).reshape(-1))[:10]
    assert set(np.flatnonzero((log_alpha > 0) & real)) == set(top)


def test_bad_requests_are_refused(planted):
    model, pairs, edges = planted
    with pytest.raises(ValueError, match="n_edges=0 is outside"):
        learn_circuit(model, pairs, 0, quiet=True)
    with pytest.raises(ValueError, match="unknown objective"):
        learn_circuit(model, pairs, 5, objective="accuracy", quiet=True)
    same = Pairs(pairs.clean, pairs.clean, pairs.attention_mask, pairs.lengths, pairs.labels, pairs.lengths)
    with pytest.raises(ValueError, match="no circuit to learn"):
        learn_circuit(model, same, 5, quiet=True)
