"""Attention knockout against hand-built masked forwards: the plain GPT-2 of
``handbuilt.py`` on the shipped demo model (both layer loops, unrolled and scanned), and
the independent PyTorch forward of ``family_reference.py`` on random-init Llama (rotary,
grouped-query attention) and Gemma 2 (sliding window, attention and final soft-caps)
checkpoints, where the cut has to meet the rotary scores, the key/value groups, the
window mask and the soft-cap in the right order; the blocked attention scores are masked
out by hand, layer by layer."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import compiler, load_model
from jaxinterp.data import tokenize
from jaxinterp.demo import demo_model_dir
from jaxinterp.knockout import knockout, knockout_probs, plot_knockout, source_sets
from jaxinterp.models import forward

sys.path.insert(0, os.path.dirname(__file__))
import handbuilt  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    return load_model(demo_model_dir())


def _prompts(model, texts):
    ids = tokenize(model.tokenizer, texts)
    P = max(map(len, ids))
    tokens = np.zeros((len(ids), P), np.int32)
    mask = np.zeros((len(ids), P), np.int32)
    for i, row in enumerate(ids):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    return tokens, mask


def _hand_blocked(n_layers, last, sources, start, window, n_pos):
    """{layer: [batch, pos_q, pos_k]}: the cut edges, written out with loops."""
    out = {}
    for layer in range(start, min(start + window, n_layers)):
        b = np.zeros((len(last), n_pos, n_pos), bool)
        for i, q in enumerate(last):
            b[i, q, np.flatnonzero(sources[i])] = True
        out[layer] = b
    return out


def test_demo_knockout_equals_a_hand_built_masked_forward(demo):
    tokens, mask = _prompts(demo, ["When Mary and John went to the store , John gave a drink to",
                                   "The war lasted from the year 13 52 to the year 13"])
    B, P = tokens.shape
    last = mask.sum(1) - 1
    targets = np.array([demo.tokenizer.convert_tokens_to_ids("Mary"), demo.tokenizer.convert_tokens_to_ids("60")])
    sets = np.zeros((2, B, P), np.float32)
    sets[0, 0, [2, 4]] = 1  # the two names of the IOI prompt
    sets[0, 1, [7, 8]] = 1  # the century and start year
    for i in range(B):
        sets[1, i, 1:last[i]] = 1  # every word before the last
    starts, window = [0, 1, 2], 2
    got = knockout_probs(demo.params, demo.cfg, tokens, targets, sets, starts, window, attention_mask=mask)
    assert got.shape == (3, 2, B)
    L = demo.cfg.n_layers
    # one compiled hand-built forward for every case (blocked given for every layer, maybe all False)
    hand = compiler.jit(lambda blocked: handbuilt.forward(demo.params, demo.cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                                     blocked=dict(enumerate(blocked)))[0])
    for i, s in enumerate(starts):
        for j in range(2):
            blocked = _hand_blocked(L, last, sets[j], s, window, P)
            logits = hand([jnp.asarray(blocked.get(l, np.zeros((B, P, P), bool))) for l in range(L)])
            probs = jax.nn.softmax(logits[np.arange(B), last], -1)[np.arange(B), targets]
            np.testing.assert_allclose(got[i, j], probs, rtol=2e-4, atol=1e-6 * float(probs.max()))
    clean = jax.nn.softmax(demo(tokens, mask)[np.arange(B), last], -1)[np.arange(B), targets]
    # scanned (the sweep above ran unrolled): the cut is one more per-layer input of the scan
    blocked = _hand_blocked(L, last, sets[0], 1, window, P)
    blocked = np.stack([blocked.get(l, np.zeros((B, P, P), bool)) for l in range(L)])
    scanned = forward(demo.params, demo.cfg, jnp.asarray(tokens), jnp.asarray(mask), scan=True,
                      attention_block=jnp.asarray(blocked))
    np.testing.assert_allclose(np.asarray(scanned)[np.arange(B), last],
                               np.asarray(hand(list(jnp.asarray(blocked))))[np.arange(B), last], rtol=0, atol=2e-4)
    # cutting the last token off its context in the first two layers destroys both answers: the check above
    # compares real changes, not the clean run twice
    assert (got[0, 1] < 0.5 * np.asarray(clean)).all()


def test_knockout_api_sets_and_picture(demo, tmp_path):
    prompt = "When Mary and John went to the store , John gave a drink to"
    res = knockout(demo, prompt, subject="Mary", window=2, starts=[0, 1])
    assert res.set_names == ["subject", "subject-last", "non-subject"]
    assert res.sets[0] == [2] and 2 not in res.sets[2] and 0 not in res.sets[2]
    assert res.sets[2][-1] == len(res.tokens) - 2  # every position before the last
    assert res.probs.shape == (2, 3) and res.target_text == "Mary"
    assert os.path.getsize(plot_knockout(res, str(tmp_path / "knockout.png"))) > 1000
    # the command: the same sweep (every window of 2 layers), its figures beside the picture
    from jaxinterp.cli import main

    png = tmp_path / "cli.png"
    assert main(["knockout", "--model", demo_model_dir(), "--prompt", prompt, "--subject", "Mary", "--window", "2",
                 "--out", str(png), "--no-compile-cache"]) == 0
    figures = json.loads((tmp_path / "cli.json").read_text())
    assert figures["set_names"] == res.set_names and figures["starts"] == [0, 1]
    np.testing.assert_allclose(figures["probs"], res.probs, rtol=1e-6)
    assert os.path.getsize(png) > 1000


def test_bad_knockouts_are_refused(demo):
    tokens = np.asarray(tokenize(demo.tokenizer, ["Then Mary had a long day"]), np.int32)
    with pytest.raises(ValueError, match="last position"):
        knockout_probs(demo.params, demo.cfg, tokens, [5], np.eye(tokens.shape[1])[None, -1], [0], 1)
    with pytest.raises(ValueError, match="window starts"):
        knockout_probs(demo.params, demo.cfg, tokens, [5], np.eye(tokens.shape[1])[None, 1], [3], 1)
    with pytest.raises(ValueError, match="subject"):
        knockout(demo, "Then Mary had a long day", subject="Bob")
    assert set(source_sets(5, [4])) == {"non-subject"}  # a subject at the last position is no source


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(num_hidden_layers=3)),  # rotary, 4 query heads over 2 key/value heads
    ("gemma2", dict(num_hidden_layers=3)),  # + sliding window 3 (layers 0, 2), soft-caps 2 and 3, GQA
])
def test_rotary_family_knockout_equals_the_independent_torch_forward(family, overrides, tmp_path):
    torch = pytest.importorskip("torch")
    import family_reference
    from transformers import AutoModelForCausalLM

    from devtools import testing

    path = getattr(testing, f"save_random_{family}")(str(tmp_path / family), seed=3, **overrides)
    model = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens, mask = _prompts(model, ["When Mary and John went to the store , John gave a drink to",
                                    "Then Tom had fun at the park"])
    B, P = tokens.shape
    last = mask.sum(1) - 1
    with torch.no_grad():
        clean = torch.softmax(family_reference.forward(hf, torch.tensor(tokens, dtype=torch.long),
                                                       torch.tensor(mask))[0], -1).numpy()[np.arange(B), last]
    targets = clean.argmax(-1)  # each prompt's own top-1
    sets = np.zeros((3, B, P), np.float32)
    sets[0, 0, [2, 4]], sets[0, 1, [2]] = 1, 1  # the names
    sets[1, 0, [last[0] - 1]], sets[1, 1, [last[1] - 1]] = 1, 1  # the previous token (inside every window)
    for i in range(B):
        sets[2, i, 1:last[i]] = 1  # every word before the last (BOS kept)
    starts, window = [0, 1, 2], 2
    got = knockout_probs(model.params, model.cfg, tokens, targets, sets, starts, window, attention_mask=mask)
    assert got.shape == (3, 3, B)
    want = np.zeros_like(got)
    with torch.no_grad():
        for i, s in enumerate(starts):
            for j in range(3):
                blocked = {l: torch.tensor(b) for l, b in _hand_blocked(model.cfg.n_layers, last, sets[j], s, window,
                                                                         P).items()}
                logits = family_reference.forward(hf, torch.tensor(tokens, dtype=torch.long), torch.tensor(mask),
                                                  blocked=blocked)[0]
                want[i, j] = torch.softmax(logits, -1).numpy()[np.arange(B), last, targets]
    # float32 in both: agreement to ~1e-6 of the probabilities' scale, far below the changes the cuts make
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.max()))
    change = np.abs(want - clean[np.arange(B), targets][None, None])
    assert change.max() > 0.05 * float(clean.max()), "the cuts should move p(target): otherwise this compares clean runs"
