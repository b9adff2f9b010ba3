"""Causal tracing against ROME's own procedure: forward hooks on the Hugging Face model
that replace the embedding output with the corrupted one and overwrite a block's,
attention's or MLP's output at one position with the value recorded in the clean run."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxinterp import load_model
from devtools.testing import save_random_gpt2, save_random_gpt_neox
from jaxinterp.tracing import (causal_trace, embedding_std, find_subject, noisy_embeddings, plot_trace, token_embeddings,
                               trace_all, trace_one, window_layers)


@pytest.fixture(scope="module")
def sharp_gpt2(tmp_path_factory):
    """3 layers; a large initializer_range makes attention far from uniform, so that
    restoring one position visibly moves the prediction."""
    path = save_random_gpt2(str(tmp_path_factory.mktemp("gpt2_sharp")), n_layer=3, n_head=4, n_embd=32,
                            seed=1, initializer_range=0.2)
    return path


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """Parallel attention + MLP (``use_parallel_residual``), rotary positions."""
    return save_random_gpt_neox(str(tmp_path_factory.mktemp("neox")), num_hidden_layers=3, seed=2)


def _hf(path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _modules(hf, kind):
    if hf.config.model_type == "gpt2":
        embed, blocks, attn = hf.transformer.wte, hf.transformer.h, "attn"
    else:
        embed, blocks, attn = hf.gpt_neox.embed_in, hf.gpt_neox.layers, "attention"
    return embed, [b if kind == "resid" else getattr(b, attn if kind == "attn" else "mlp") for b in blocks]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def rome_restored_prob(hf, tokens, corrupted_emb, target, kind, layers, position):
    """ROME's ``trace_with_patch``, written with hooks: p(target) at the last position,
    mean over the corrupted samples, with ``kind``'s outputs of ``layers`` at
    ``position`` overwritten by the clean run's."""
    embed, mods = _modules(hf, kind)
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]
    clean = {}
    hooks = [mods[l].register_forward_hook(lambda m, i, o, l=l: clean.__setitem__(l, _first(o).detach().clone()))
             for l in layers]
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()

    def patch(layer):
        def hook(module, inputs, output):
            x = _first(output).clone()
            x[:, position] = clean[layer][0, position]
            return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x
        return hook

    emb = torch.as_tensor(np.array(corrupted_emb))
    hooks = [embed.register_forward_hook(lambda m, i, o: emb)] + [mods[l].register_forward_hook(patch(l))
                                                                  for l in layers]
    try:
        with torch.no_grad():
            logits = hf(ids.expand(emb.shape[0], -1)).logits
    finally:
        for h in hooks:
            h.remove()
    return float(torch.softmax(logits[:, -1], -1)[:, target].mean())


def _setup(path, n_pos=8, subject=(2, 3), samples=3, seed=0):
    model = load_model(path)
    tokens = np.random.default_rng(seed).integers(4, model.cfg.vocab_size, n_pos).astype(np.int32)
    tokens[0] = 1  # BOS
    emb = token_embeddings(model.params, model.cfg, tokens)
    corrupted = noisy_embeddings(emb, list(subject), 3 * embedding_std(model.params, model.cfg), samples, seed)
    target = int(np.argmax(model(tokens[None])[0, -1]))
    return model, tokens, corrupted, target


# (kind, window, layer, position); windows > 1 restore several layers (the fixed point)
CASES = {"sharp_gpt2": [("resid", 1, 0, 2), ("resid", 1, 1, 5), ("resid", 1, 2, 3), ("attn", 2, 1, 7),
                        ("attn", 2, 2, 3), ("mlp", 3, 1, 3), ("mlp", 3, 0, 7)],
         "neox": [("resid", 1, 1, 5), ("resid", 1, 0, 3), ("attn", 1, 1, 3), ("attn", 1, 2, 7),
                  ("mlp", 1, 2, 7), ("mlp", 1, 0, 3)]}


@pytest.mark.parametrize("model_dir", ["sharp_gpt2", "neox"])
def test_single_restoration_equals_rome_hooks(model_dir, request):
    path = request.getfixturevalue(model_dir)
    model, tokens, corrupted, target = _setup(path)
    hf = _hf(path)
    moved = 0.0
    p_corrupted = rome_restored_prob(hf, tokens, corrupted, target, "resid", [], 0)
    for kind, window, layer, position in CASES[model_dir]:
        layers = list(window_layers(layer, window, model.cfg.n_layers))
        ref = rome_restored_prob(hf, tokens, corrupted, target, kind, layers, position)
        ours = trace_one(model.params, model.cfg, tokens, corrupted, target, layer, position, kind, window)
        np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4, err_msg=f"{kind} window {window} "
                                   f"layer {layer} position {position}")
        moved = max(moved, abs(ref - p_corrupted))
    assert moved > 1e-3  # 50x the tolerance: the restorations must matter for the check to mean anything


def test_window_layers_follow_rome():
    # ROME: range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))
    assert list(window_layers(5, 10, 12)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert list(window_layers(11, 10, 12)) == [6, 7, 8, 9, 10, 11]
    assert list(window_layers(3, 1, 12)) == [3]
    assert list(window_layers(0, 3, 2)) == [0, 1]


def test_sweep_equals_a_loop_of_single_restorations(sharp_gpt2):
    model, tokens, corrupted, target = _setup(sharp_gpt2)
    scores, p_clean, p_corr = trace_all(model.params, model.cfg, jnp.asarray(tokens), corrupted, target,
                                        kind="mlp", window=3, chunk=4)
    loop = np.array([[trace_one(model.params, model.cfg, tokens, corrupted, target, l, p, "mlp", 3)
                      for p in range(len(tokens))] for l in range(model.cfg.n_layers)])
    assert scores.shape == (model.cfg.n_layers, len(tokens))
    np.testing.assert_allclose(scores, loop, atol=1e-6, rtol=1e-5)
    assert np.ptp(loop) > 1e-3


def test_restoring_the_last_residual_recovers_the_clean_prediction(sharp_gpt2):
    model, tokens, corrupted, target = _setup(sharp_gpt2)
    scores, p_clean, p_corr = trace_all(model.params, model.cfg, jnp.asarray(tokens), corrupted, target)
    probs = np.asarray(jnp.exp(model(tokens[None])[0, -1] - model(tokens[None])[0, -1].max()))
    np.testing.assert_allclose(p_clean, probs[target] / probs.sum(), rtol=1e-5)
    np.testing.assert_allclose(scores[-1, -1], p_clean, rtol=1e-5)  # the final state at the read position
    # positions before the subject never see the corruption: restoring them does nothing
    np.testing.assert_allclose(scores[:, :2], p_corr, rtol=1e-5)
    assert abs(p_clean - p_corr) > 1e-2


def test_noise_only_at_subject_positions_and_seedable():
    emb = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    a = noisy_embeddings(emb, [1, 4], 0.5, samples=200, seed=3)
    assert a.shape == (200, 6, 64)
    np.testing.assert_array_equal(a[:, [0, 2, 3, 5]], np.broadcast_to(emb[[0, 2, 3, 5]], (200, 4, 64)))
    noise = np.asarray(a[:, [1, 4]] - emb[[1, 4]])
    assert abs(noise.std() - 0.5) < 0.01 and abs(noise.mean()) < 0.01
    np.testing.assert_array_equal(a, noisy_embeddings(emb, [1, 4], 0.5, samples=200, seed=3))
    assert not np.allclose(a, noisy_embeddings(emb, [1, 4], 0.5, samples=200, seed=4))


def test_causal_trace_finds_the_subject_and_draws(sharp_gpt2, tmp_path):
    model = load_model(sharp_gpt2)
    prompt = "When Mary and John went to the store , John gave a drink to"
    ids = [1] + model.tokenizer(prompt)["input_ids"]
    assert find_subject(model.tokenizer, ids, "Mary and") == [2, 3]
    assert find_subject(model.tokenizer, ids, "store , John") == [8, 9, 10]
    # samples=1: the same shapes as a corrupted prompt's, so both share one compiled program
    trace = causal_trace(model, prompt, subject="John went", kind="attn", samples=1)
    assert trace.subject == [4, 5] and trace.scores.shape == (model.cfg.n_layers, len(ids))
    assert trace.target == int(np.argmax(model(np.array([ids]))[0, -1]))
    np.testing.assert_allclose(trace.noise_std, 3 * float(np.std(np.asarray(model.params["embed"]["w_e"]))),
                               rtol=1e-5)
    path = plot_trace(trace, str(tmp_path / "trace.png"))
    assert os.path.getsize(path) > 1000

    swapped = causal_trace(model, prompt, corrupted_prompt=prompt.replace("Mary", "Kate"), target="Mary",
                           kind="attn")
    assert swapped.subject is None and swapped.target == model.tokenizer.convert_tokens_to_ids("Mary")
    assert swapped.scores.shape == trace.scores.shape


def test_bad_input_is_refused(sharp_gpt2):
    model, tokens, corrupted, target = _setup(sharp_gpt2)
    args = (model.params, model.cfg, tokens, corrupted, target)
    with pytest.raises(ValueError, match="unknown kind"):
        trace_one(*args, 0, 0, kind="heads")
    with pytest.raises(ValueError, match="position 8 is outside"):
        trace_one(*args, 0, 8)
    with pytest.raises(ValueError, match="layer 3 is outside"):
        trace_one(*args, 3, 0)
    with pytest.raises(ValueError, match="window"):
        trace_one(*args, 0, 0, window=0)
    with pytest.raises(ValueError, match="unknown kind"):
        trace_all(*args, kind="block")
    with pytest.raises(ValueError, match="chunk"):
        trace_all(*args, chunk=0)
    with pytest.raises(ValueError, match="target token"):
        trace_all(model.params, model.cfg, tokens, corrupted, model.cfg.vocab_size)
    with pytest.raises(ValueError, match="corrupted_embeddings"):
        trace_one(model.params, model.cfg, tokens, corrupted[:, :4], target, 0, 0)
    with pytest.raises(ValueError, match="outside the prompt"):
        noisy_embeddings(corrupted[0], [9], 1.0)
    prompt = "When Mary and John went to the store"
    with pytest.raises(ValueError, match="does not occur"):
        causal_trace(model, prompt, subject="Alice")
    with pytest.raises(ValueError, match="same number"):
        causal_trace(model, prompt, corrupted_prompt="When Mary went to the store")
    with pytest.raises(ValueError, match="subject"):
        causal_trace(model, prompt)


def test_trace_command_writes_the_picture_and_the_figures(sharp_gpt2, tmp_path, capsys):
    """``jaxinterp trace``: the JSON holds the same trace as the API call, p_clean is the
    plain forward's softmax at the last position, and the PNG is drawn; a missing
    subject is refused before any work, with exit code 2 and nothing written."""
    import json

    from jaxinterp.cli import main

    prompt = "When Mary and John went to the store , John gave a drink to"
    out = str(tmp_path / "trace.png")
    assert main(["trace", "--model", sharp_gpt2, "--prompt", prompt, "--subject", "John went", "--kind", "attn",
                 "--samples", "1", "--window", "1", "--quiet", "--out", out]) == 0
    assert os.path.getsize(out) > 1000
    with open(str(tmp_path / "trace.json")) as f:
        saved = json.load(f)
    (t,) = saved["traces"]
    model = load_model(sharp_gpt2)
    api = causal_trace(model, prompt, subject="John went", kind="attn", samples=1, window=1)
    np.testing.assert_allclose(np.array(t["scores"]), api.scores, rtol=1e-5, atol=1e-6)
    ids = [1] + model.tokenizer(prompt)["input_ids"]
    logits = np.asarray(model(np.array([ids]))[0, -1], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert t["target"] == int(np.argmax(p)) and abs(t["p_clean"] - p.max()) <= 1e-5
    assert t["subject"] == [4, 5] and t["kind"] == "attn" and t["window"] == 1
    assert "best restoration" in capsys.readouterr().out

    bad = str(tmp_path / "bad.png")
    assert main(["trace", "--model", sharp_gpt2, "--prompt", prompt, "--out", bad]) == 2
    assert "--subject" in capsys.readouterr().err and not os.path.exists(bad)
