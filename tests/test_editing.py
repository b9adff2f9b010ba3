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
