"""ROME (and MEMIT) on the functional model, read as a specification.

* The rank-one update is ROME's closed form, recomputed here in numpy the way ROME's code
  does it (explicit inverse, normalised left vector, right vector divided by the prompt's
  key), and the edited matrix maps the prompt's key to v*.
* The second moment equals E[k k^T] of the keys that torch's GPT-2 feeds ``c_proj``
  (forward pre-hooks on the Hugging Face model), and is cached on disk.
* An edit of the shipped demo model makes the target the top-1 for its prompt and its
  paraphrases (other templates, places and objects of the same two names) while the top-1
  of unrelated prompts (other names; other tasks) stays.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch

from jaxinterp import editing, load_model, tasks
from jaxinterp.data import tokenize
from jaxinterp.demo import demo_model_dir

PROMPT = "When Mary and John went to the store , {} gave a drink to"  # the subject is the second mention
SUBJECT, TARGET = "John", "Kate"
HP = editing.RomeHParams(v_steps=60)  # ROME's GPT-2 XL defaults, with more steps for this small model
# ROME's generated prefixes are far outside what the demo model was trained on (it knows three task
# templates), so the demo edit averages the key over the plain prompt only.
CONTEXTS = ["{}"]


@pytest.fixture(scope="module")
def stats_env(tmp_path_factory):
    old = os.environ.get("JAXINTERP_STATS_DIR")
    os.environ["JAXINTERP_STATS_DIR"] = str(tmp_path_factory.mktemp("stats"))
    yield os.environ["JAXINTERP_STATS_DIR"]
    if old is None:
        del os.environ["JAXINTERP_STATS_DIR"]
    else:
        os.environ["JAXINTERP_STATS_DIR"] = old


@pytest.fixture(scope="module")
def demo():
    return load_model(demo_model_dir())


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """The demo model's 'Wikipedia': task prompts with their continuations, one per line."""
    rows = tasks.generate("ioi", 96, seed=1) + tasks.generate("greater_than", 48, seed=1) + \
        tasks.generate("induction", 48, seed=1)
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(r["clean"] + " " + r["target"] for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def edit(demo, text_file, stats_env):
    return editing.rome(demo, PROMPT, SUBJECT, TARGET, layer=0, hparams=HP, contexts=CONTEXTS, text_file=text_file,
                        return_info=True, progress=False)


def _top1(model, texts):
    """Top-1 next words (the batched, bucketed argmax the scores use: one compiled shape)."""
    return [model.tokenizer.decode([int(t)]) for t in editing.top1_ids(model, texts)]


def _rome_numpy(c, k_star, v_star, k_cur, cur_out):
    """ROME's compute_u / compute_v / upd_matrix, step by step."""
    u = np.linalg.inv(c) @ k_star
    u = u / np.linalg.norm(u)
    right = (v_star - cur_out) / np.dot(k_cur, u)
    return u[:, None] @ right[None, :]


def test_rank_one_update_is_romes_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(48, 48))
    c = a @ a.T / 48 + 0.1 * np.eye(48)
    k_star, k_cur = rng.normal(size=48), rng.normal(size=48)
    v_star, cur_out = rng.normal(size=16), rng.normal(size=16)
    got = editing.rank_one_update(c, k_star, v_star, k_cur, cur_out)
    want = _rome_numpy(c, k_star, v_star, k_cur, cur_out)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
    np.testing.assert_allclose(k_cur @ got, v_star - cur_out, atol=1e-10)  # the prompt's key now gives v*


def test_demo_edit_applies_the_closed_form(demo, edit, text_file):
    edited, info = edit
    layer = info["layer"]
    c = editing.second_moment(demo, layer, editing.sample_tokens(demo, text_file))  # read from the cache
    want = _rome_numpy(c, info["k_star"], info["v_star"], info["k_cur"], info["cur_out"])
    w_before = np.asarray(demo.params["blocks"]["mlp"]["w_out"][layer])
    got = np.asarray(edited.params["blocks"]["mlp"]["w_out"][layer]) - w_before
    # float32 parameters: the difference is rounded at the scale of w_out
    scale = np.abs(np.asarray(demo.params["blocks"]["mlp"]["w_out"][layer])).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * scale + 1e-6 * np.abs(want).max())
    for name, leaf in jax.tree_util.tree_flatten_with_path(demo.params)[0]:
        other = edited.params
        for k in name:
            other = other[k.key]
        if "w_out" not in str(name):
            assert other is leaf  # every other leaf is shared, not copied
    # the MLP output at the subject's last token in the prompt is now v* (what the optimisation asked for)
    ids = tokenize(demo.tokenizer, [PROMPT.format(SUBJECT)])[0]
    at = [i for i, t in enumerate(ids) if demo.tokenizer.decode([int(t)]) == SUBJECT][-1]  # its second mention
    out = editing.capture_at(edited, [ids], [at], layer)["mlp_out"][0]
    np.testing.assert_allclose(out, info["v_star"], atol=1e-4 * np.abs(info["v_star"]).max())
    # the optimisation saw v* through the forward's node shift at the subject only; the edited weights give
    # nearly the same p(target) (not exactly: the update also moves the MLP output wherever another key,
    # e.g. the first "John", has a component along C^-1 k*)
    p_edited = np.exp(editing.target_logprobs(edited, [PROMPT.format(SUBJECT)], [TARGET])[0])
    assert p_edited == pytest.approx(info["history"][-1]["p_target"], abs=0.01)


def test_demo_edit_makes_the_target_top1_and_leaves_unrelated_prompts(demo, edit):
    edited, info = edit
    fill = dict(N1="Mary", N2="John", S2="John")
    paraphrases = [PROMPT.format(SUBJECT)] + [
        tasks.IOI_TEMPLATES[t].format(PLACE=p, OBJECT=o, **fill)
        for t, p, o in [(0, "park", "book"), (2, "school", "key"), (3, "garden", "ring"), (4, "office", "hat")]]
    unrelated = [r["clean"] for r in tasks.generate("ioi", 24, seed=5)
                 if not {"John", "Mary", TARGET} & set(r["clean"].split())]
    assert len(unrelated) >= 10
    before, after = _top1(demo, paraphrases + unrelated), _top1(edited, paraphrases + unrelated)  # one batch each
    k = len(paraphrases)
    assert set(before[:k]) == {"Mary"}  # before: the IOI answer
    assert after[:k] == [TARGET] * k
    assert after[k:] == before[k:]


def test_second_moment_equals_torch_keys_and_is_cached(demo, edit, text_file, stats_env):
    from transformers import AutoModelForCausalLM

    tokens = editing.sample_tokens(demo, text_file)  # the edit's sample: its layer-0 statistics are cached
    c = editing.second_moment(demo, 0, tokens, cache=False)
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir()).eval()
    keys = []
    hook = hf.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, i: keys.append(i[0].detach()))
    mask = tokens >= 0
    with torch.no_grad():
        hf(torch.tensor(np.where(mask, tokens, 0), dtype=torch.long),
           attention_mask=torch.tensor(mask.astype(np.int64)))
    hook.remove()
    k = keys[0].double().numpy()[mask]  # [real tokens, d_mlp]
    want = k.T @ k / len(k)
    np.testing.assert_allclose(c, want, rtol=0, atol=2e-5 * np.abs(want).max())
    files = os.listdir(stats_env)
    assert len(files) == 1 and files[0].endswith(".npz")  # the edit's layer-0 statistics, kept on disk
    np.testing.assert_allclose(editing.second_moment(demo, 0, tokens), c, rtol=1e-12, atol=0)
    # what is read back is the cached file: a planted value shows through
    np.savez(os.path.join(stats_env, files[0]), mom2=np.eye(3), n_tokens=1.0)
    assert editing.second_moment(demo, 0, tokens).shape == (3, 3)
    os.remove(os.path.join(stats_env, files[0]))


def test_context_templates_and_requests(demo):
    ctx = editing.context_templates(demo, ((3, 2),), seed=0)
    assert ctx[0] == "{}" and len(ctx) == 3 and all(c.endswith("{}") for c in ctx)
    for c in ctx:  # every prefix is text the tokenizer reads back
        tokenize(demo.tokenizer, [c.format(PROMPT.format(SUBJECT))])
    assert editing.subject_template("The Eiffel Tower is in", "Eiffel Tower") == "The {} is in"
    with pytest.raises(editing.EditError, match="does not occur"):
        editing.Request.make("When Mary went", "Bob", "Kate")
    with pytest.raises(editing.EditError, match="vocabulary"):
        editing.rome(demo, PROMPT, SUBJECT, "Zeppelin", layer=0, contexts=CONTEXTS, mom2=np.eye(demo.cfg.d_mlp))
    with pytest.raises(editing.EditError, match="layer"):
        editing.rome(demo, PROMPT, SUBJECT, TARGET, layer=3, contexts=CONTEXTS, mom2=np.eye(demo.cfg.d_mlp))


def test_edit_command_writes_a_checkpoint_every_command_loads(demo, edit, text_file, tmp_path):
    from jaxinterp.cli import main

    req = tmp_path / "requests.json"
    req.write_text(json.dumps([{"requested_rewrite": {"prompt": PROMPT, "subject": SUBJECT,
                                                      "target_new": {"str": TARGET}, "target_true": {"str": "Mary"}}}]))
    out = tmp_path / "edited"
    args = ["edit", "--model", demo_model_dir(), "--requests", str(req), "--method", "rome", "--layers", "0",
            "--steps", str(HP.v_steps), "--no-contexts", "--text", text_file, "--quiet", "--no-compile-cache"]
    assert main(args + ["--out", str(out)]) == 0
    record = json.loads((out / "edit.json").read_text())
    assert record["top1_before"] == ["Mary"] and record["top1_after"] == [TARGET] and record["layers"] == [0]
    loaded = load_model(str(out))  # the converted-checkpoint reader every command uses
    tokens = np.asarray(tokenize(demo.tokenizer, [PROMPT.format(SUBJECT)]), np.int32)
    np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(edit[0](tokens)), rtol=0, atol=1e-5)


def test_edit_command_refuses_bad_input_before_work(tmp_path, capsys):
    from jaxinterp.cli import main

    model = demo_model_dir()
    before = sorted(os.listdir(model))
    good = tmp_path / "r.json"
    good.write_text(json.dumps([{"prompt": "When Mary went to the park", "subject": "Mary", "target_new": "Kate"}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "When Mary went", "subject": "Bob", "target_new": "Kate"}]))
    cases = [(["--requests", str(good), "--out", model], "--model input"),
             (["--requests", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")], "does not exist"),
             (["--requests", str(bad), "--out", str(tmp_path / "o")], "does not occur"),
             (["--requests", str(good), "--out", str(tmp_path / "o"), "--layers", "0,1"], "one layer"),
             (["--requests", str(good), "--out", str(tmp_path / "o"), "--mom2-weight", "5"], "MEMIT option")]
    for extra, message in cases:
        assert main(["edit", "--model", model] + extra) == 2
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(model)) == before and not (tmp_path / "o").exists()


def test_memit_update_is_memits_formula():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 40))
    c = a @ a.T / 40 + 0.05 * np.eye(40)
    keys, resid = rng.normal(size=(5, 40)), rng.normal(size=(5, 12))  # [request, d_mlp], [request, d_model]
    got = editing.memit_update(c, keys, resid, 7.0)
    k = keys.T  # MEMIT's layer_ks [d_mlp, n]; its targets [d_model, n]
    adj_k = np.linalg.solve(7.0 * c + k @ k.T, k)
    want = (resid.T @ adj_k.T).T  # MEMIT's upd_matrix [d_model, d_mlp], transposed to w_out's [d_mlp, d_model]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_memit_with_a_tiny_prior_weight_reaches_its_target_residual(demo, edit, text_file):
    """One request, one layer: as lambda -> 0 MEMIT's update maps the subject's key to the
    whole residual it asked for, so the block's output there becomes z."""
    c = editing.second_moment(demo, 0, editing.sample_tokens(demo, text_file))
    edited, info = editing.memit(demo, [(PROMPT, SUBJECT, TARGET)], layers=[0], mom2s={0: c}, contexts=CONTEXTS,
                                 hparams=editing.MemitHParams(v_steps=HP.v_steps, mom2_update_weight=1e-6),
                                 return_info=True, progress=False)
    ids, at = editing.subject_last_index(demo.tokenizer, PROMPT, SUBJECT)
    z_after = editing.capture_at(edited, [ids], [at], 0)["resid"][0]
    np.testing.assert_allclose(z_after, info["zs"][0], atol=1e-3 * np.abs(info["zs"][0]).max())
    assert _top1(edited, [PROMPT.format(SUBJECT)]) == [TARGET]


def test_counterfact_scores_of_the_demo_edit(demo, edit, tmp_path):
    record = {"requested_rewrite": {"prompt": PROMPT, "subject": SUBJECT, "target_new": {"str": TARGET},
                                    "target_true": {"str": "Mary"}},
              "paraphrase_prompts": ["After Mary and John arrived at the park , John handed a book to"],
              "neighborhood_prompts": ["When Mary and Tom went to the store , Tom gave a drink to",
                                       "When Mary and Paul went to the park , Paul gave a ring to"]}
    path = tmp_path / "counterfact.json"  # the records file, as CounterFact writes them
    path.write_text(json.dumps([record]))
    before = editing.evaluate_edits(demo, str(path), gen_length=0)
    after = editing.evaluate_edits(edit[0], str(path), gen_length=0)
    assert (before["efficacy"], before["paraphrase"], before["neighborhood"]) == (0.0, 0.0, 1.0)
    assert (after["efficacy"], after["paraphrase"], after["efficacy_top1"]) == (1.0, 1.0, 1.0)
    assert after["n_neighborhood"] == 2
    # the log-probabilities behind the scores: the model's own softmax at the prompt's last token
    ids = np.asarray(tokenize(demo.tokenizer, [PROMPT.format(SUBJECT)]), np.int32)
    logp = np.asarray(jax.nn.log_softmax(demo(ids)[0, -1]))
    got = editing.target_logprobs(demo, [PROMPT.format(SUBJECT)] * 2, [TARGET, "Mary"])
    want = logp[[demo.tokenizer.convert_tokens_to_ids(TARGET), demo.tokenizer.convert_tokens_to_ids("Mary")]]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_n_gram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab (p 2/3, 1/3); trigrams aba, bab (p 1/2 each)
    h2 = -(2 / 3 * np.log2(2 / 3) + 1 / 3 * np.log2(1 / 3))
    assert editing.n_gram_entropy(["a b a b"]) == pytest.approx((h2 * 2 / 3 + 1.0 * 4 / 3) / 2)
    assert editing.n_gram_entropy(["a a a a a a"]) == 0.0  # repetition: no entropy


def test_fact_rows_label_each_models_own_answer(demo):
    from jaxinterp.knowledge import fact_rows

    recs = editing.read_requests([{"prompt": PROMPT, "subject": s, "target_new": TARGET, "target_true": "Mary"}
                                  for s in ("John", "Tom")])
    ids = {w: demo.tokenizer.convert_tokens_to_ids(w) for w in (TARGET, "Mary")}
    before, after = fact_rows(demo.tokenizer, recs, edited=False), fact_rows(demo.tokenizer, recs, edited=True)
    assert [r["corrupted"] for r in before] == [PROMPT.format("Tom"), PROMPT.format("John")]  # the other subject
    assert all((r["correct_idx"], r["incorrect_idx"]) == (ids["Mary"], ids[TARGET]) for r in before)
    assert all((r["correct_idx"], r["incorrect_idx"]) == (ids[TARGET], ids["Mary"]) for r in after)
    with pytest.raises(editing.EditError, match="another record"):
        fact_rows(demo.tokenizer, recs[:1], edited=False)


# --- the default layer, the averaged key, MEMIT over layers, other families: against PyTorch ------------

def _torch_ids(tokenizer, text):
    """``[bos] + ids`` of ``text``, straight from the Hugging Face tokenizer."""
    return [tokenizer.bos_token_id] + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _hf_parts(hf):
    """(blocks, the MLP output matrix of block l, how its update adds to the torch weight)."""
    kind = hf.config.model_type
    if kind == "gpt2":  # Conv1D: weight [d_mlp, d_model], as w_out
        return hf.transformer.h, lambda l: hf.transformer.h[l].mlp.c_proj, lambda w, u: w + u
    if kind == "gpt_neox":
        return hf.gpt_neox.layers, lambda l: hf.gpt_neox.layers[l].mlp.dense_4h_to_h, lambda w, u: w + u.T
    return hf.model.layers, lambda l: hf.model.layers[l].mlp.down_proj, lambda w, u: w + u.T  # Linear [out, in]


def _torch_capture(hf, seqs, positions, layer):
    """Per sequence, run alone (no padding): the input of block ``layer``'s MLP output matrix
    (the key) ``[n, d_mlp]`` and the block's output (the residual after it) ``[n, d_model]``
    at ``positions``, float64."""
    blocks, out_matrix, _ = _hf_parts(hf)
    keys, resid = [], []
    h1 = out_matrix(layer).register_forward_pre_hook(lambda m, i: keys.append(i[0][0].detach()))
    h2 = blocks[layer].register_forward_hook(
        lambda m, i, o: resid.append((o[0] if isinstance(o, tuple) else o)[0].detach()))
    try:
        with torch.no_grad():
            for ids in seqs:
                hf(torch.tensor([ids], dtype=torch.long))
    finally:
        h1.remove()
        h2.remove()
    return (np.stack([k[p].double().numpy() for k, p in zip(keys, positions)]),
            np.stack([r[p].double().numpy() for r, p in zip(resid, positions)]))


def _subject_rows(tokenizer, template, subject, contexts):
    """Per context: token ids of the prefixed prompt and the position of the subject's last
    token (the templated occurrence), counted by tokenising the text up to it."""
    at = template.index("{}")
    seqs, pos = [], []
    for c in contexts:
        prefix = c[:-2]  # every context ends with "{}"
        seqs.append(_torch_ids(tokenizer, prefix + template.format(subject)))
        pos.append(len(_torch_ids(tokenizer, prefix + template[:at] + subject)) - 1)
    return seqs, pos


def test_default_layer_is_the_argmax_of_an_independent_causal_trace(tmp_path):
    """ROME's trace of the subject done with torch hooks on the Hugging Face model: noise on
    the subject's token embeddings, the clean MLP output of one layer put back at the
    subject's last token, p(top-1) at the end averaged over the noise samples."""
    from transformers import GPT2LMHeadModel

    from devtools.testing import save_random_gpt2
    from jaxinterp.tracing import noisy_embeddings

    # a 6-layer random model whose trace at the templated "John" peaks at layer 1 (and at the first "John",
    # which a trace of the first occurrence of the word would corrupt, at layer 0)
    path = save_random_gpt2(str(tmp_path / "g6"), n_layer=6, n_head=4, n_embd=64, seed=11, initializer_range=0.2)
    model = load_model(path)
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = _torch_ids(model.tokenizer, PROMPT.format(SUBJECT))
    mentions = [i for i, t in enumerate(ids) if t == model.tokenizer.convert_tokens_to_ids(SUBJECT)]
    assert len(mentions) == 2
    wte = hf.transformer.wte.weight.detach()
    std = 3 * float(wte.double().std(unbiased=False))
    tokens = torch.tensor([ids], dtype=torch.long)

    def trace(at):
        clean_mlp = {}
        hooks = [hf.transformer.h[l].mlp.register_forward_hook(
            lambda m, i, o, l=l: clean_mlp.__setitem__(l, o.detach())) for l in range(6)]
        with torch.no_grad():
            clean = torch.softmax(hf(tokens).logits[0, -1], -1)
        for h in hooks:
            h.remove()
        target = int(clean.argmax())
        # the corrupted inputs: Gaussian noise (the draw is an input, not what is tested) on the subject's embedding
        noisy = torch.tensor(np.asarray(noisy_embeddings(wte[tokens[0]].numpy(), [at], std, 10, 0)))
        scores = []
        for l in range(6):
            def restore(m, i, o, l=l):
                o = o.clone()
                o[:, at] = clean_mlp[l][0, at]
                return o
            h = hf.transformer.h[l].mlp.register_forward_hook(restore)
            with torch.no_grad():
                scores.append(float(torch.softmax(hf(inputs_embeds=noisy).logits[:, -1], -1)[:, target].mean()))
            h.remove()
        return np.array(scores)

    want, first = trace(mentions[1]), trace(mentions[0])
    best, second = np.sort(want)[::-1][:2]
    assert best - second > 1e-3 * best  # far above float32 disagreement between the two forwards
    assert np.argmax(first) != np.argmax(want)  # so tracing the wrong "John" would be caught
    request = editing.Request.make(PROMPT, SUBJECT, TARGET)
    assert editing.default_layer(model, request) == int(np.argmax(want))
    assert editing.subject_positions(model.tokenizer, request.template, SUBJECT)[1] == [mentions[1]]


def test_rome_key_is_the_mean_over_prefixed_contexts_of_torch_mlp_inputs(demo):
    """k*: the mean over the context prefixes (generated by the model, of different lengths)
    of the input of c_proj at the subject's last token, each prefixed prompt run alone."""
    from transformers import GPT2LMHeadModel

    contexts = editing.context_templates(demo, ((3, 2), (6, 2)), seed=0)
    assert len(contexts) == 5 and len({len(c) for c in contexts}) > 2
    layer = 1  # past an attention layer: the key depends on the prefix
    _, info = editing.rome(demo, PROMPT, SUBJECT, TARGET, layer=layer, hparams=editing.RomeHParams(v_steps=1),
                           mom2=np.eye(demo.cfg.d_mlp), contexts=contexts, return_info=True, progress=False)
    hf = GPT2LMHeadModel.from_pretrained(demo_model_dir()).eval()
    seqs, pos = _subject_rows(demo.tokenizer, PROMPT, SUBJECT, contexts)
    keys, _ = _torch_capture(hf, seqs, pos, layer)  # [context, d_mlp]
    scale = np.abs(keys).max()
    assert np.abs(keys - keys.mean(0)).max() > 1e-2 * scale  # the prefixes move the key: the mean is not any one
    np.testing.assert_allclose(info["k_star"], keys.mean(0), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(info["k_cur"], keys[0], rtol=0, atol=1e-5 * scale)  # contexts[0] is "{}"


MEMIT_REQUESTS = [(PROMPT, "John", "Kate"), ("When Alice and Tom went to the park , {} gave a book to", "Tom", "Emma"),
                  ("Then {} had fun at the", "Bob", "school")]
MEMIT_CONTEXTS = ["{}", "Then Mark had fun . {}", "Anna went to school and had a ball . {}"]


def _memit_by_torch(hf, tokenizer, requests, layers, contexts, zs, mom2s, weight):
    """MEMIT's layer loop, independently: keys and residuals from torch hooks (each prompt run
    alone) on a copy of the Hugging Face model that takes each layer's update in turn;
    ``(the updates {layer: [d_mlp, d_model]}, the edited torch model)``."""
    import copy

    hf = copy.deepcopy(hf)
    _, out_matrix, add = _hf_parts(hf)
    rows = [_subject_rows(tokenizer, t, s, contexts) for t, s, _ in requests]
    plain = ([r[0][0] for r in rows], [r[1][0] for r in rows])
    updates = {}
    for i, layer in enumerate(layers):
        keys = np.stack([_torch_capture(hf, seqs, pos, layer)[0] for seqs, pos in rows])  # [request, context, d_mlp]
        # MEMIT's mean over context types: the plain prompt, the prefixed ones
        k = keys[:, 0] if len(contexts) == 1 else (keys[:, 0] + keys[:, 1:].mean(1)) / 2
        cur_z = _torch_capture(hf, plain[0], plain[1], layers[-1])[1]
        share = (zs - cur_z) / (len(layers) - i)  # [request, d_model]: this layer's share of what is left
        a = np.linalg.solve(weight * mom2s[layer] + k.T @ k, k.T)  # [d_mlp, request]
        updates[layer] = a @ share
        w = out_matrix(layer).weight
        with torch.no_grad():
            w.copy_(add(w.double(), torch.tensor(updates[layer])).to(w.dtype))
    return updates, hf


def _check_memit(model, hf, layers, weight, v_steps=30, contexts=MEMIT_CONTEXTS, clamp=0.75):
    tokens = editing.sample_tokens(model, n_samples=24, length=15, seed=3)
    mom2s = {l: editing.second_moment(model, l, tokens, cache=False, progress=False) for l in layers}
    edited, info = editing.memit(model, MEMIT_REQUESTS, layers=layers, mom2s=mom2s, contexts=contexts,
                                 hparams=editing.MemitHParams(v_steps=v_steps, mom2_update_weight=weight,
                                                              clamp_norm_factor=clamp),
                                 return_info=True, progress=False)
    want, hf_edited = _memit_by_torch(hf, model.tokenizer, MEMIT_REQUESTS, layers, contexts, info["zs"], mom2s, weight)
    for l in layers:  # each layer's update: its own least squares for its share of the residual
        scale = np.abs(want[l]).max()
        np.testing.assert_allclose(info["updates"][l], want[l], rtol=0, atol=2e-4 * scale, err_msg=f"layer {l}")
    w0, w1 = np.asarray(model.params["blocks"]["mlp"]["w_out"]), np.asarray(edited.params["blocks"]["mlp"]["w_out"])
    untouched = [l for l in range(model.cfg.n_layers) if l not in layers]
    assert (w0[untouched] == w1[untouched]).all()
    # the edited matrices are the family's MLP output matrices: torch with the updates added gives the logits
    ids = [_torch_ids(model.tokenizer, t.format(s)) for t, s, _ in MEMIT_REQUESTS]
    for row in ids:
        with torch.no_grad():
            ref = hf_edited(torch.tensor([row], dtype=torch.long)).logits[0].numpy()
        ours = np.asarray(edited(np.asarray([row], np.int32)))[0]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    return edited, info


@pytest.fixture(scope="module")
def gpt2_4(tmp_path_factory):
    from transformers import GPT2LMHeadModel

    from devtools.testing import save_random_gpt2

    path = save_random_gpt2(str(tmp_path_factory.mktemp("g4")), n_layer=4, n_head=4, n_embd=64, seed=2,
                            initializer_range=0.1)
    return load_model(path), GPT2LMHeadModel.from_pretrained(path).eval()


def test_memit_spreads_the_residual_over_three_layers_as_memit_does(gpt2_4):
    """Layers 0-2, three requests, lambda where both the prior and the new keys count."""
    model, hf = gpt2_4
    _check_memit(model, hf, [0, 1, 2], weight=2.0)


def test_memit_over_three_layers_reaches_its_targets(gpt2_4):
    """As lambda -> 0 the last layer takes whatever the first two left: each subject's
    residual after layer 2 becomes its z, and its target gains. (With
    keys averaged over prefixed contexts the plain prompt's own key is not the one solved
    for, so the plain prompt alone is used here.)"""
    model, hf = gpt2_4
    edited, info = _check_memit(model, hf, [0, 1, 2], weight=1e-6, v_steps=60, contexts=["{}"],
                                clamp=4.0)  # ROME's norm ball: a larger z for this random model
    plain = [editing.subject_last_index(model.tokenizer, t, s) for t, s, _ in MEMIT_REQUESTS]
    z = editing.capture_at(edited, [p[0] for p in plain], [p[1] for p in plain], 2)["resid"]
    np.testing.assert_allclose(z, info["zs"], rtol=0, atol=1e-3 * np.abs(info["zs"]).max())
    # the first layers did move the residual (their shares), so the last one did not do it all
    z0 = editing.capture_at(model, [p[0] for p in plain], [p[1] for p in plain], 2)["resid"]
    assert np.abs(info["updates"][0]).max() > 0 and np.abs(z - z0).max() > 1e-2 * np.abs(z0).max()
    # a random model's residual after layer 2 only nudges its answer (the optimisation reaches p ~ 0.03), but
    # every request's target gained
    prompts, targets = [t.format(s) for t, s, _ in MEMIT_REQUESTS], [t for _, _, t in MEMIT_REQUESTS]
    assert (editing.target_logprobs(edited, prompts, targets) > editing.target_logprobs(model, prompts, targets)).all()


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def family(request, tmp_path_factory):
    """Random-init Llama (gated MLP, down_proj, RMSNorm, rotary, 4 query heads over 2 key/value
    heads) and GPT-NeoX (parallel residual, partial rotary, dense_4h_to_h with a bias), 3 layers."""
    from transformers import AutoModelForCausalLM

    from devtools import testing

    path = getattr(testing, f"save_random_{request.param}")(str(tmp_path_factory.mktemp(request.param)), seed=1,
                                                             num_hidden_layers=3)
    return path, load_model(path), AutoModelForCausalLM.from_pretrained(path).eval()


def test_rome_on_other_families_is_the_closed_form_on_their_mlp_output_matrix(family):
    path, model, hf = family
    layer, contexts = 1, MEMIT_CONTEXTS[:2]
    c = editing.second_moment(model, layer, editing.sample_tokens(model, n_samples=24, length=15, seed=3),
                              cache=False, progress=False)
    edited, info = editing.rome(model, PROMPT, SUBJECT, TARGET, layer=layer, hparams=editing.RomeHParams(v_steps=10),
                                mom2=c, contexts=contexts, return_info=True, progress=False)
    # k* and the prompt's key are what torch feeds down_proj / dense_4h_to_h at the subject's last token
    seqs, pos = _subject_rows(model.tokenizer, PROMPT, SUBJECT, contexts)
    keys, _ = _torch_capture(hf, seqs, pos, layer)
    kscale = np.abs(keys).max()
    np.testing.assert_allclose(info["k_star"], keys.mean(0), rtol=0, atol=1e-5 * kscale)
    np.testing.assert_allclose(info["k_cur"], keys[0], rtol=0, atol=1e-5 * kscale)
    # the update is ROME's closed form from the same k*, v*, C (float32 weights: rounded at w_out's scale)
    w0, w1 = np.asarray(model.params["blocks"]["mlp"]["w_out"]), np.asarray(edited.params["blocks"]["mlp"]["w_out"])
    want = _rome_numpy(c, info["k_star"], info["v_star"], info["k_cur"], info["cur_out"])
    np.testing.assert_allclose(w1[layer] - w0[layer], want, rtol=0,
                               atol=4e-7 * np.abs(w0[layer]).max() + 1e-6 * np.abs(want).max())
    assert (w1[[0, 2]] == w0[[0, 2]]).all()
    # and it is the family's MLP output matrix: torch with the update added there gives the edited logits
    _, out_matrix, add = _hf_parts(hf)
    import copy

    hf_edited = copy.deepcopy(hf)
    w = hf_edited.get_submodule([n for n, m in hf.named_modules() if m is out_matrix(layer)][0]).weight
    with torch.no_grad():
        w.copy_(add(w.double(), torch.tensor(want)).to(w.dtype))
        for row in seqs:
            ref = hf_edited(torch.tensor([row], dtype=torch.long)).logits[0].numpy()
            ours = np.asarray(edited(np.asarray([row], np.int32)))[0]
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    out = editing.capture_at(edited, [seqs[0]], [pos[0]], layer)["mlp_out"][0]  # the prompt's MLP output is v*
    np.testing.assert_allclose(out, info["v_star"], rtol=0, atol=1e-4 * np.abs(info["v_star"]).max())


def test_memit_on_other_families_spreads_over_their_layers(family):
    """Layers 1-2: NeoX's layer-0 MLP reads the token embedding only (parallel attention), so
    with this 35-word vocabulary its C has rank <= 35 < d_mlp = 48, and the solve's answer in
    the directions no key takes is float rounding, different in any two implementations."""
    path, model, hf = family
    _check_memit(model, hf, [1, 2], weight=2.0, v_steps=10)


def test_edit_command_on_other_families_writes_a_checkpoint_other_commands_load(family, stats_env, tmp_path):
    from jaxinterp.cli import main

    path, model, hf = family
    req = tmp_path / "requests.json"
    req.write_text(json.dumps([{"prompt": PROMPT, "subject": SUBJECT, "target_new": TARGET}]))
    out = tmp_path / "edited"
    assert main(["edit", "--model", path, "--requests", str(req), "--method", "rome", "--layers", "1", "--steps", "5",
                 "--no-contexts", "--quiet", "--no-compile-cache", "--out", str(out)]) == 0
    assert json.loads((out / "edit.json").read_text())["layers"] == [1]
    # the same edit through the API (the command's statistics: generated text, cached)
    mom2 = editing.second_moment(model, 1, editing.sample_tokens(model), progress=False)
    want = editing.rome(model, PROMPT, SUBJECT, TARGET, layer=1, hparams=editing.RomeHParams(v_steps=5), mom2=mom2,
                        contexts=["{}"], progress=False)
    loaded = load_model(str(out))
    assert loaded.cfg == model.cfg
    assert loaded.origin == model.origin and loaded.origin is not None  # the conversion facts travel along
    tokens = np.asarray(tokenize(model.tokenizer, [PROMPT.format(SUBJECT)]), np.int32)
    ref = np.asarray(want(tokens))
    np.testing.assert_allclose(np.asarray(loaded(tokens)), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.abs(np.asarray(model(tokens)) - ref).max() > 1e-3 * np.abs(ref).max()  # the edit did change them
    png = tmp_path / "knockout.png"  # another command on the edited checkpoint
    assert main(["knockout", "--model", str(out), "--prompt", PROMPT.format(SUBJECT), "--subject", "Mary",
                 "--out", str(png), "--no-compile-cache"]) == 0
    assert os.path.getsize(png) > 1000
