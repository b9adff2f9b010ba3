"""The shipped demo checkpoint and the code that trains and exports it."""

import os

import numpy as np
import pytest

from devtools import train_demo
from jaxinterp import tasks
from jaxinterp.demo import demo_model_dir

MODEL_DIR = demo_model_dir()
HELD_OUT_SEED = 424242  # neither the training seed (0) nor the evaluation seed (1000)


@pytest.fixture(scope="module")
def demo():
    from jaxinterp import load_model

    return load_model(MODEL_DIR)


def _padded_batch(tok, texts):
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = max(map(len, ids))
    tokens = np.full((len(ids), n), tok.pad_token_id, np.int64)
    mask = np.zeros((len(ids), n), np.int64)
    for i, s in enumerate(ids):
        tokens[i, :len(s)], mask[i, :len(s)] = s, 1
    return tokens, mask


def _hf_logits(path, tokens, mask):
    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.float().numpy()


def test_shipped_files():
    names = set(os.listdir(MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in names)
    assert size <= 25 * 2 ** 20


def test_shipped_tokenizer_is_the_task_vocabulary(demo):
    tok = demo.tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == demo.cfg.vocab_size == len(tasks.task_vocabulary()) + 4
    assert tok.convert_ids_to_tokens(list(range(4, len(tok)))) == tasks.task_vocabulary()


def test_shipped_checkpoint_matches_transformers(demo):
    texts = [tasks.generate(t, 2, seed=11)[i]["clean"] for t in tasks.TASKS for i in range(2)]
    tokens, mask = _padded_batch(demo.tokenizer, texts)
    assert (mask == 0).any()  # a padded batch
    ours = np.asarray(demo(tokens, mask))
    theirs = _hf_logits(MODEL_DIR, tokens, mask)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_shipped_model_solves_held_out_prompts(demo):
    acc = train_demo.evaluate(demo.params, demo.cfg, demo.tokenizer, seed=HELD_OUT_SEED, n=64, batch_size=64)
    assert acc["ioi_accuracy"] >= 0.9, acc
    assert acc["greater_than_accuracy"] >= 0.9, acc
    assert acc["greater_than_near_accuracy"] >= 0.9, acc
    assert acc["induction_accuracy"] >= 0.9, acc
    assert acc["ioi_logit_diff"] > 0 and acc["greater_than_prob_diff"] > 0.5


def test_shipped_model_separates_clean_from_corrupted(demo, tmp_path):
    """The metric moves between clean and corrupted runs, which circuit discovery needs."""
    from jaxinterp.data import load_pairs
    from jaxinterp.metrics import logit_diff

    path = tasks.write_pairs_csv("ioi", 32, str(tmp_path / "ioi.csv"), demo.tokenizer, seed=HELD_OUT_SEED)
    pairs = load_pairs(path, demo.tokenizer, demo.cfg.vocab_size, demo.cfg.n_ctx)
    clean = np.asarray(logit_diff(demo(pairs.clean, pairs.attention_mask), None, pairs.lengths, pairs.labels))
    corrupted = np.asarray(logit_diff(demo(pairs.corrupted, pairs.attention_mask), None, pairs.lengths,
                                      pairs.labels))
    assert clean.mean() > abs(corrupted.mean()) + 1.0


def test_tiny_training_run_exports_and_loads(tmp_path):
    """The training code path end to end on a tiny model: train a few steps, evaluate,
    export, and read the export back with jaxinterp and transformers."""
    from jaxinterp import load_model

    params, cfg, tok, metrics = train_demo.train(seed=1, steps=3, batch_size=12, n_train=16, eval_every=3,
                                                 n_eval=8, quiet=True, n_layers=1, d_model=16, d_mlp=32)
    assert np.isfinite(metrics["loss"]) and len(metrics["history"]) == 1
    assert 0.0 <= metrics["ioi_accuracy"] <= 1.0
    out = train_demo.export_gpt2(params, cfg, str(tmp_path / "tiny"), tok)
    m = load_model(out)
    assert m.cfg == cfg
    import jax

    assert jax.tree.structure(params) == jax.tree.structure(m.params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(m.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    tokens, mask = _padded_batch(m.tokenizer, [r["clean"] for r in tasks.generate("ioi", 3, seed=2)])
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(m(tokens, mask))[real], _hf_logits(out, tokens, mask)[real],
                               atol=1e-4, rtol=0)


def test_main_writes_checkpoint(tmp_path, monkeypatch):
    """The command-line entry point with a stubbed (tiny) training run."""
    real_train = train_demo.train

    def tiny(**kw):
        return real_train(**{**kw, "steps": 2, "batch_size": 6, "n_train": 8, "eval_every": 2, "n_eval": 4,
                             "quiet": True, "n_layers": 1, "d_model": 16, "d_mlp": 32})

    monkeypatch.setattr(train_demo, "train", tiny)
    out = str(tmp_path / "m")
    status = train_demo.main(["--out", out, "--min-accuracy", "0"])
    assert status == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= set(os.listdir(out))
