"""Model families beyond GPT-2: llama, mistral, qwen2, gemma, gemma2, gpt_neox.

For each, a tiny random-init ``transformers`` model is built here and converted, and

* its logits equal PyTorch's on a right-padded batch (several shapes per family: MHA,
  GQA and MQA, rope scaling, biases, head_dim overrides, sliding windows, soft-caps);
* the circuit-graph forward equals the plain forward, and its node outputs equal an
  independent hand-wired PyTorch forward (``family_reference.py``);
* EAP scores equal the directional derivative, by torch autograd through that
  independent forward, of the mean logit difference along each sampled edge;
* Gemma 2's head nodes (shares of the normalised attention output) sum to Hugging Face's
  post-attention norm output;
* the grouped-query view (one ``<k>``/``<v>`` input per key/value head) keeps the logits,
  its scores are the default view's summed over each group, and EAP, exact patching
  and evaluation in it agree with the independent forward;
* unsupported model types and config features are refused by name.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from devtools import testing
from jaxinterp import load_model, ops
from jaxinterp.attribution import attribute
from jaxinterp.data import load_pairs
from jaxinterp.tokenizer import build_word_tokenizer
from jaxinterp.conversion import ConversionError, convert_hf, load_converted, load_hf_checkpoint
from jaxinterp.models import EdgeIntervention, forward

torch = pytest.importorskip("torch")

import family_reference  # noqa: E402
from conftest import padded_batch  # noqa: E402
from devtools.testing import write_ioi_csv  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (family, builder overrides); the builders' defaults are 2 layers, d_model 32,
# 4 query heads over 2 key/value heads (see devtools.testing).
SHAPES = {
    "llama": ("llama", {}),
    "llama-mha-tied-biases-headdim-linear": ("llama", dict(
        num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=16,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "llama-mqa-llama3": ("llama", dict(num_hidden_layers=3, num_key_value_heads=1, rope_parameters=LLAMA3)),
    "mistral": ("mistral", {}),
    "mistral-no-window-mqa": ("mistral", dict(sliding_window=None, num_key_value_heads=1)),
    "qwen2": ("qwen2", {}),
    "qwen2-tied-mha-full": ("qwen2", dict(use_sliding_window=False, num_key_value_heads=4, tie_word_embeddings=True)),
    "gemma": ("gemma", {}),
    "gemma-mqa-biases": ("gemma", dict(num_key_value_heads=1, attention_bias=True, head_dim=8)),
    "gemma2": ("gemma2", {}),
    "gemma2-no-caps": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                                      query_pre_attn_scalar=16, num_key_value_heads=4,
                                      layer_types=["full_attention", "sliding_attention"])),
    "gemma2-mqa-biases": ("gemma2", dict(num_key_value_heads=1, attention_bias=True)),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox-sequential-full-rotary-tied": ("gpt_neox", dict(
        use_parallel_residual=False, rotary_pct=1.0, rotary_emb_base=100.0, tie_word_embeddings=True,
        attention_bias=False, num_hidden_layers=3, hidden_act="gelu_new")),
}
GRAPH_SHAPES = ["llama", "llama-mha-tied-biases-headdim-linear", "mistral", "qwen2", "gemma", "gemma2",
                "gemma2-no-caps", "gemma2-mqa-biases", "gpt_neox"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny PyTorch ops are ~100x slower with two threads competing with JAX's for the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            family, overrides = SHAPES[name]
            path = str(tmp_path_factory.mktemp(name.replace("-", "_")))
            cache[name] = getattr(testing, f"save_random_{family}")(path, seed=1, **overrides)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def hf_model():
    cache = {}

    def get(path):
        if path not in cache:
            from transformers import AutoModelForCausalLM

            cache[path] = AutoModelForCausalLM.from_pretrained(path).eval()
        return cache[path]

    return get


def max_error(ours, ref, lengths):
    """Largest difference over the real (unpadded) positions."""
    return max(float(np.abs(ours[b, :n] - ref[b, :n]).max()) for b, n in enumerate(lengths))


# --- logits parity ---------------------------------------------------------------------

# at a realistic width, stored in bfloat16 (as most published checkpoints are): the
# converter's tiled copies of transposed matrices (sources of 256 x 256 elements and more)
# and its bfloat16 -> float32 conversion run, which the 32-wide shapes above never reach
WIDE = {
    "llama": dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
                  initializer_range=0.02),
    "gemma2": dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=64, query_pre_attn_scalar=64, initializer_range=0.02),
    "gpt_neox": dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, initializer_range=0.02),
}


@pytest.mark.parametrize("family", list(WIDE))
def test_wide_bfloat16_checkpoints_match_pytorch(family, tmp_path):
    from transformers import AutoModelForCausalLM

    src = getattr(testing, f"save_random_{family}")(str(tmp_path / "f32"), seed=2, num_hidden_layers=1,
                                                     **WIDE[family])
    path = str(tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(path)
    for name in os.listdir(src):  # the tokenizer files
        if not name.startswith(("config", "model", "generation")):
            shutil.copy(os.path.join(src, name), path)
    model = load_model(path)
    ids, mask, lengths = padded_batch(model.cfg.vocab_size)
    ours = np.asarray(model(ids, mask))
    with torch.no_grad():  # Hugging Face's model from the same bfloat16 files, computing in float32
        hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    scale = max(float(np.abs(ref[b, :n]).max()) for b, n in enumerate(lengths))
    assert max_error(ours, ref, lengths) <= 1e-4 * scale, (family, max_error(ours, ref, lengths), scale)


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_pytorch_on_padded_batch(name, family_dir, hf_model):
    path = family_dir(name)
    model = load_model(path)
    assert model.origin.model_type == SHAPES[name][0]
    ids, mask, lengths = padded_batch(model.cfg.vocab_size)  # 11 tokens: longer than every window
    ours = np.asarray(model(ids, mask))
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    for b, n in enumerate(lengths):  # HF's outputs at padded positions are not meaningful
        np.testing.assert_allclose(ours[b, :n], ref[b, :n], rtol=1e-4, atol=1e-4, err_msg=name)


def test_converted_configs_read_the_features(family_dir):
    cfg = load_hf_checkpoint(family_dir("llama-mqa-llama3"))[0]
    assert (cfg.n_kv_heads, cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position) == (1, "llama3", 8.0, 16)
    cfg = load_hf_checkpoint(family_dir("llama-mha-tied-biases-headdim-linear"))[0]
    assert (cfg.d_head, cfg.rope.type, cfg.rope.theta, cfg.qkv_bias, cfg.mlp_bias) == (16, "linear", 500.0, True, True)
    cfg = load_hf_checkpoint(family_dir("mistral"))[0]
    assert (cfg.sliding_window, cfg.sliding_layers, cfg.window(0)) == (4, None, 4)
    cfg = load_hf_checkpoint(family_dir("qwen2"))[0]
    assert (cfg.qkv_bias, cfg.out_bias, cfg.sliding_window, cfg.sliding_layers) == (True, False, 3, (1,))
    cfg = load_hf_checkpoint(family_dir("gemma"))[0]
    assert (cfg.norm_offset, cfg.embed_scale, cfg.d_head, cfg.act_fn) == (1.0, 32 ** 0.5, 16, "gelu_pytorch_tanh")
    cfg = load_hf_checkpoint(family_dir("gemma2"))[0]
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.attn_scale, cfg.sliding_layers) == (
        2.0, 3.0, 12 ** -0.5, (0,))
    cfg = load_hf_checkpoint(family_dir("gpt_neox"))[0]
    assert (cfg.rotary_dim, cfg.parallel_attn_mlp, cfg.norm) == (2, True, "layernorm")


def _rewrite_config(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        hf = json.load(f)
    edit(hf)
    with open(path, "w") as f:
        json.dump(hf, f)
    return dst


def test_legacy_config_layouts_convert_the_same(tmp_path, family_dir):
    """transformers 4.x files: top-level rope_theta + rope_scaling {type: ...}; GPT-NeoX's
    rotary_pct / rotary_emb_base; Gemma's legacy hidden_act "gelu" (the tanh GELU). Older
    GPT-NeoX tensor names (embed_out) are what transformers 5 itself writes."""
    def llama_legacy(hf):
        rope = hf.pop("rope_parameters")
        hf["rope_theta"] = rope.pop("rope_theta")
        rope["type"] = rope.pop("rope_type")
        hf["rope_scaling"] = rope

    def neox_legacy(hf):
        rope = hf.pop("rope_parameters")
        hf.update(rotary_emb_base=rope["rope_theta"], rotary_pct=rope["partial_rotary_factor"], rope_scaling=None)

    def gemma_legacy(hf):  # the official Gemma files: 5.x reads the first, 4.x the second
        hf.update(hidden_act="gelu", hidden_activation="gelu_pytorch_tanh")

    for name, edit in [("llama-mqa-llama3", llama_legacy), ("gpt_neox-sequential-full-rotary-tied", neox_legacy),
                       ("gpt_neox", neox_legacy), ("gemma", gemma_legacy)]:
        src = family_dir(name)
        legacy = _rewrite_config(src, str(tmp_path / name), edit)
        (cfg, _, origin), (want_cfg, _, want_origin) = load_hf_checkpoint(legacy), load_hf_checkpoint(src)
        assert (cfg, origin) == (want_cfg, want_origin), name


def test_orbax_round_trip_keeps_tuple_fields_hashable(tmp_path, family_dir):
    src = family_dir("qwen2")
    cfg0, p0, origin0 = load_hf_checkpoint(src)
    cfg1, p1, origin1 = load_converted(convert_hf(src, str(tmp_path / "converted")))
    assert cfg0 == cfg1 and origin0 == origin1 and cfg1.sliding_layers == (1,)
    hash(cfg1)  # a jit static argument
    jax.tree.map(np.testing.assert_array_equal, p0, p1)


# --- rotary helpers against Hugging Face -----------------------------------------------

@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
    {**LLAMA3, "original_max_position_embeddings": 64},
])
def test_rotary_matches_hugging_face(rope):
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ml

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=512,
                         rope_parameters=dict(rope))
    positions = torch.arange(300)
    x = torch.randn(1, 2, 300, 32, generator=torch.Generator().manual_seed(0))
    cos_ref, sin_ref = ml.LlamaRotaryEmbedding(config)(x, positions[None])
    scaling = dict(factor=rope.get("factor", 1.0), low_freq_factor=rope.get("low_freq_factor", 1.0),
                   high_freq_factor=rope.get("high_freq_factor", 4.0),
                   original_max_position=rope.get("original_max_position_embeddings", 8192))
    cos, sin = ops.rotary_tables(jnp.arange(300), 32, rope["rope_theta"], rope_type=rope["rope_type"], **scaling)
    np.testing.assert_allclose(cos, cos_ref[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(sin, sin_ref[0].numpy(), atol=1e-4)
    q_ref, _ = ml.apply_rotary_pos_emb(x, x, cos_ref, sin_ref)  # [batch, head, pos, d_head]
    q = ops.apply_rotary(jnp.asarray(x.numpy()).transpose(0, 2, 1, 3), cos, sin)  # [batch, pos, head, d_head]
    np.testing.assert_allclose(q, q_ref.numpy().transpose(0, 2, 1, 3), atol=1e-4)


def test_partial_rotary_matches_gpt_neox():
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox import modeling_gpt_neox as mn

    config = GPTNeoXConfig(hidden_size=64, num_attention_heads=2, rotary_pct=0.25, rotary_emb_base=1000)
    x = torch.randn(2, 2, 20, 32, generator=torch.Generator().manual_seed(1))
    cos_ref, sin_ref = mn.GPTNeoXRotaryEmbedding(config)(x, torch.arange(20)[None])
    q_ref, _ = mn.apply_rotary_pos_emb(x, x, cos_ref, sin_ref)
    cos, sin = ops.rotary_tables(jnp.arange(20), 8, 1000.0)
    q = ops.apply_rotary(jnp.asarray(x.numpy()).transpose(0, 2, 1, 3), cos, sin)
    np.testing.assert_allclose(q, q_ref.numpy().transpose(0, 2, 1, 3), atol=1e-5)


# --- the circuit graph ------------------------------------------------------------------

@pytest.mark.parametrize("name", GRAPH_SHAPES)
def test_graph_forward_is_the_plain_forward_and_matches_the_reference_nodes(name, family_dir, hf_model):
    path = family_dir(name)
    model = load_model(path)
    cfg, spec = model.cfg, model.graph_spec
    ids, mask, lengths = padded_batch(cfg.vocab_size, n_pos=9, seed=2)
    plain, outs = forward(model.params, cfg, jnp.asarray(ids), jnp.asarray(mask), return_node_outputs=True)
    source = jax.random.normal(jax.random.PRNGKey(0), (spec.n_forward, 3, 9, cfg.d_model))
    for mode in ["replace", "add", "grad"]:
        iv = EdgeIntervention(jnp.zeros((spec.n_forward, spec.n_backward)), source, mode=mode)
        got = forward(model.params, cfg, jnp.asarray(ids), jnp.asarray(mask), intervention=iv)
        np.testing.assert_allclose(got, plain, atol=1e-5, err_msg=f"{name} {mode}")
    with torch.no_grad():
        ref_logits, ref_outs = family_reference.forward(hf_model(path), torch.tensor(ids), torch.tensor(mask))
    assert max_error(np.asarray(plain), ref_logits.numpy(), lengths) < 1e-4
    for i, node in enumerate(spec.forward_names):
        ours, ref = np.asarray(outs[i]), ref_outs[node].numpy()
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(ours[b, :n], ref[b, :n], rtol=1e-4, atol=1e-4, err_msg=f"{name} {node}")


def _assert_scores(got, want, names, what):
    """Every score within 1e-4 of the largest |wanted score| (which must not be tiny)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    assert scale > 1e-3, f"{what}: effects too small to test ({scale:.2e})"
    worst = int(np.argmax(np.abs(got - want)))
    assert np.abs(got - want).max() <= 1e-4 * scale, (
        f"{what} {names[worst]}: {got[worst]} != {want[worst]} (tolerance {1e-4 * scale:.2e})")


def _sampled_edges(spec, rng, n=10):
    names = [e[0] for e in spec.edges]
    last = spec.n_layers - 1
    must = ["input->logits", f"m{last}->logits", f"input->a{last}.h3<k>", f"a0.h1->a{last}.h2<v>",
            f"a0.h0->m{last}"]
    picks = list(rng.choice(names, n, replace=False)) + must
    return [(p, *spec.edge_index(p)) for p in picks]


@pytest.mark.parametrize("name", GRAPH_SHAPES)
def test_eap_equals_autograd_through_the_reference(name, family_dir, hf_model, tmp_path):
    path = family_dir(name)
    model = load_model(path)
    # the builders' word tokenizer, built directly: AutoTokenizer swaps in Qwen2's own
    # tokenizer class for model_type qwen2, which cannot read a word-level tokenizer.json
    tok = build_word_tokenizer(testing.small_vocab())
    pairs = load_pairs(write_ioi_csv(tmp_path / "ioi.csv", tok, n=6, seed=3, ragged=True), tok)
    assert (pairs.clean != pairs.corrupted).any(1).all() and pairs.clean.max() < model.cfg.vocab_size
    graph = attribute(model, pairs, method="EAP", batch_size=4, quiet=True)  # a ragged last batch

    hf = hf_model(path)
    mask = torch.tensor(pairs.attention_mask)
    clean_ids, corr_ids = torch.tensor(pairs.clean).long(), torch.tensor(pairs.corrupted).long()
    last = torch.tensor(pairs.lengths - 1).long()
    labels = torch.tensor(pairs.labels).long()
    rows = torch.arange(len(pairs))
    with torch.no_grad():
        _, clean = family_reference.forward(hf, clean_ids, mask)
        _, corr = family_reference.forward(hf, corr_ids, mask)  # the clean prompt's mask, as the reference

    edges, wants = _sampled_edges(model.graph_spec, np.random.default_rng(0)), []
    for edge, s, d in edges:
        src, dst = edge.split("->")
        t = torch.zeros((), requires_grad=True)
        logits, _ = family_reference.forward(hf, clean_ids, mask, extra={dst: t * (corr[src] - clean[src])})
        final = logits[rows, last]
        metric = (final[rows, labels[:, 0]] - final[rows, labels[:, 1]]).mean()
        (derivative,) = torch.autograd.grad(metric, t)
        wants.append(-float(derivative))  # scores carry the loss sign: the negated logit difference
    _assert_scores([graph.scores[s, d] for _, s, d in edges], wants, [e for e, _, _ in edges], name)


# --- Gemma 2: head nodes are shares of the normalised attention output -------------------

def test_gemma2_head_nodes_sum_to_hugging_faces_post_attention_norm(family_dir, hf_model):
    """Each layer's head nodes add up to what Hugging Face's ``post_attention_layernorm``
    returns (captured by a hook, so nothing of jaxinterp's or the reference's is
    involved), and the graph forward's logits are Hugging Face's."""
    path = family_dir("gemma2")  # no attention bias: the heads' shares are the whole output
    model, hf = load_model(path), hf_model(path)
    assert model.cfg.sandwich_norms
    ids, mask, lengths = padded_batch(model.cfg.vocab_size)
    captured = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda module, args, out, l=l: captured.__setitem__(l, out.numpy()))
        for l, layer in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            ref_logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    spec = model.graph_spec
    logits, outs = forward(model.params, model.cfg, jnp.asarray(ids), jnp.asarray(mask), return_node_outputs=True)
    assert max_error(np.asarray(logits), ref_logits, lengths) < 1e-4
    for layer in range(model.cfg.n_layers):
        h0 = spec.head_index(layer)
        heads = np.asarray(outs[h0:h0 + model.cfg.n_heads].sum(0))
        assert max_error(heads, captured[layer], lengths) < 1e-4, layer
        # a head's share is not the whole output: the test would notice a single head
        assert max_error(np.asarray(outs[h0]), captured[layer], lengths) > 1e-2


@testing.slow("Gemma 2's methods are checked by value against the reference in test_gemma2_heads.py and "
              "test_grouped_view_eap_and_exact_equal_the_reference[gemma2]; this is a smoke run of four more")
def test_gemma2_attribution_runs_end_to_end(family_dir, tmp_path):
    from jaxinterp.evaluation import faithfulness_curve

    model = load_model(family_dir("gemma2"))
    tok = build_word_tokenizer(testing.small_vocab())
    pairs = load_pairs(write_ioi_csv(tmp_path / "ioi.csv", tok, n=4, seed=4), tok)
    real = model.graph_spec.real_edge_mask
    eap = attribute(model, pairs, method="EAP", batch_size=4, quiet=True)
    for method in ["EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted"]:
        scores = attribute(model, pairs, method=method, ig_steps=2, batch_size=4, quiet=True).scores
        assert np.isfinite(scores).all() and (scores[~real] == 0).all(), method
        assert np.corrcoef(scores[real], eap.scores[real])[0, 1] > 0.5, method
    curve = faithfulness_curve(model, eap, pairs, [5, model.graph_spec.n_edges], batch_size=4)
    # every edge kept is the model itself (faithfulness 1)
    np.testing.assert_allclose(curve.metric[-1], curve.clean, rtol=1e-4, atol=1e-5)


# --- refusals -------------------------------------------------------------------------

@pytest.mark.parametrize("name, edit, match", [
    ("llama", lambda hf: hf.update(model_type="mixtral"), r"unsupported model_type 'mixtral'.*gemma.*gpt_neox.*llama"),
    ("llama", lambda hf: hf["rope_parameters"].update(rope_type="yarn", factor=2.0),
     r"rope_type 'yarn' is not supported; supported: \['default', 'linear', 'llama3'\]"),
    ("llama", lambda hf: hf.update(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"rope_type 'dynamic' is not supported"),
    ("llama", lambda hf: hf["rope_parameters"].update(rope_type="linear"), r"'linear' needs \['factor'\]"),
    ("llama", lambda hf: hf["rope_parameters"].update(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ("llama", lambda hf: hf.update(quantization_config={"bits": 4}), r"\['quantization_config'\].*not understood"),
    ("llama", lambda hf: hf.update(hidden_act="gelu_10"), r"activation 'gelu_10' is not supported"),
    ("mistral", lambda hf: hf.update(layer_types=["full_attention"] * 2), r"\['layer_types'\].*not understood"),
    ("qwen2", lambda hf: hf.update(layer_types=["chunked_attention"] * 2), "layer_types must list"),
    ("gemma", lambda hf: hf.update(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("gemma", lambda hf: hf.update(hidden_act="silu", hidden_activation="gelu_pytorch_tanh"), "disagree"),
    ("gpt_neox", lambda hf: hf["rope_parameters"].update(partial_rotary_factor=0.4), "must be even"),
    ("gpt_neox", lambda hf: hf.update(head_dim=4), r"\['head_dim'\].*not understood"),
])
def test_unsupported_config_features_are_refused(name, edit, match, family_dir, tmp_path):
    bad = _rewrite_config(family_dir(name), str(tmp_path / "bad"), edit)
    with pytest.raises(ConversionError, match=match):
        load_hf_checkpoint(bad)


def test_model_config_refuses_unknown_rope_types():
    from jaxinterp.config import ModelConfig, Rope

    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported; supported"):
        ModelConfig(n_layers=1, n_heads=2, d_model=8, d_head=4, d_mlp=8, vocab_size=10, n_ctx=8,
                    positional="rotary", rope=Rope(type="yarn"))
    with pytest.raises(ValueError, match="sliding_layers"):
        ModelConfig(n_layers=1, n_heads=2, d_model=8, d_head=4, d_mlp=8, vocab_size=10, n_ctx=8,
                    sliding_layers=(0,))


def test_gqa_graph_keeps_one_kv_input_per_query_head(family_dir):
    model = load_model(family_dir("llama"))
    assert model.cfg.n_kv_heads == 2 and model.cfg.n_heads == 4
    spec = model.graph_spec
    assert spec.n_backward == model.cfg.n_layers * (3 * 4 + 1) + 1
    assert "a1.h3<k>" in spec.backward_names and "a1.h3<v>" in spec.backward_names


# --- the grouped-query view -------------------------------------------------------------

def test_grouped_view_has_kv_inputs_per_kv_head_and_the_same_logits(family_dir):
    path = family_dir("llama")
    flat, grouped = load_model(path), load_model(path, grouped_kv=True)
    spec = grouped.graph_spec
    L, H, K = 2, 4, 2
    assert spec.n_backward == L * (H + 2 * K + 1) + 1 < flat.graph_spec.n_backward
    assert "a1.kv1<k>" in spec.backward_names and "a1.h3<k>" not in spec.backward_names
    assert spec.forward_names == flat.graph_spec.forward_names
    ids, mask, lengths = padded_batch(flat.cfg.vocab_size, n_pos=9, seed=2)
    plain = np.asarray(flat(ids, mask))
    assert max_error(np.asarray(grouped(ids, mask)), plain, lengths) < 1e-6
    source = jax.random.normal(jax.random.PRNGKey(0), (spec.n_forward, 3, 9, grouped.cfg.d_model))
    for mode in ["replace", "add", "grad", "grad-replace"]:
        iv = EdgeIntervention(jnp.zeros((spec.n_forward, spec.n_backward)), source, mode=mode)
        got = forward(grouped.params, grouped.cfg, jnp.asarray(ids), jnp.asarray(mask), intervention=iv)
        assert max_error(np.asarray(got), plain, lengths) < 1e-5, mode
    # multi-head attention has one view only: the reference's graph
    mha = load_model(family_dir("llama-mha-tied-biases-headdim-linear"), grouped_kv=True)
    assert mha.graph_spec == load_model(family_dir("llama-mha-tied-biases-headdim-linear")).graph_spec


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs", "EAP-IG-activations"])
def test_grouped_scores_are_the_ungrouped_scores_summed_over_each_group(method, family_dir, tmp_path):
    """The shared k/v input's gradient is the sum of its per-query-head copies'
    gradients (at coef = 0 the runs are identical), so for the gradient methods the
    grouped score of ``u->a{l}.kv{g}<k>`` is the sum of ``u->a{l}.h{h}<k>`` over the
    query heads ``h`` of group ``g``; every other edge keeps its score."""
    path = family_dir("llama")
    flat, grouped = load_model(path), load_model(path, grouped_kv=True)
    tok = build_word_tokenizer(testing.small_vocab())
    pairs = load_pairs(write_ioi_csv(tmp_path / "ioi.csv", tok, n=5, seed=6, ragged=True), tok)
    a = attribute(flat, pairs, method=method, ig_steps=2, batch_size=4, quiet=True).scores
    b = attribute(grouped, pairs, method=method, ig_steps=2, batch_size=4, quiet=True).scores
    fs, gs = flat.graph_spec, grouped.graph_spec
    want = np.zeros_like(b)
    for layer in range(fs.n_layers):
        for h in range(fs.n_heads):
            want[:, gs.qkv_index(layer, "q", h)] = a[:, fs.qkv_index(layer, "q", h)]
            for letter in "kv":
                want[:, gs.qkv_index(layer, letter, h // 2)] += a[:, fs.qkv_index(layer, letter, h)]
        want[:, gs.mlp_in_index(layer)] = a[:, fs.mlp_in_index(layer)]
    want[:, gs.logits_index] = a[:, fs.logits_index]
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(b, want, rtol=1e-4, atol=1e-6)


def _reference_runs(hf, pairs):
    mask = torch.tensor(pairs.attention_mask)
    clean_ids, corr_ids = torch.tensor(pairs.clean).long(), torch.tensor(pairs.corrupted).long()
    last, labels = torch.tensor(pairs.lengths - 1).long(), torch.tensor(pairs.labels).long()
    rows = torch.arange(len(pairs))

    def metric(extra=None):
        logits, _ = family_reference.forward(hf, clean_ids, mask, extra=extra)
        final = logits[rows, last]
        return (final[rows, labels[:, 0]] - final[rows, labels[:, 1]]).mean()

    with torch.no_grad():
        _, clean = family_reference.forward(hf, clean_ids, mask)
        _, corr = family_reference.forward(hf, corr_ids, mask)
    return metric, clean, corr


def _grouped_edges(spec, rng, n=8):
    last = spec.n_layers - 1
    kv = [e for e in spec.edges if ".kv" in e[0]]
    picks = [kv[i] for i in rng.choice(len(kv), n, replace=False)]
    return picks + [(name, *spec.edge_index(name)) for name in
                    [f"input->a{last}.kv1<k>", f"a0.h1->a{last}.kv0<v>", f"input->a{last}.h3<q>", "input->logits"]]


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_grouped_view_eap_and_exact_equal_the_reference(name, family_dir, hf_model, tmp_path):
    """EAP: the directional derivative of the metric along ``corrupted - clean`` added to
    the shared input of every query head of the group (torch autograd). Exact: the
    metric change when that input alone carries it."""
    path = family_dir(name)
    model = load_model(path, grouped_kv=True)
    assert model.graph_spec.grouped_kv
    tok = build_word_tokenizer(testing.small_vocab())
    pairs = load_pairs(write_ioi_csv(tmp_path / "ioi.csv", tok, n=5, seed=7, ragged=True), tok)
    eap = attribute(model, pairs, method="EAP", batch_size=4, quiet=True)
    exact = attribute(model, pairs, method="exact", batch_size=4, exact_chunk=32, quiet=True)
    metric, clean, corr = _reference_runs(hf_model(path), pairs)
    with torch.no_grad():
        base = float(metric())
    edges, want_eap, want_exact = _grouped_edges(model.graph_spec, np.random.default_rng(1)), [], []
    for edge, s, d in edges:
        src, dst = edge.split("->")
        t = torch.zeros((), requires_grad=True)
        (derivative,) = torch.autograd.grad(metric({dst: t * (corr[src] - clean[src])}), t)
        want_eap.append(-float(derivative))
        with torch.no_grad():
            want_exact.append(-(float(metric({dst: corr[src] - clean[src]})) - base))
    names = [e for e, _, _ in edges]
    _assert_scores([eap.scores[s, d] for _, s, d in edges], want_eap, names, f"{name} EAP")
    _assert_scores([exact.scores[s, d] for _, s, d in edges], want_exact, names, f"{name} exact")


def test_grouped_view_evaluation_and_graph_files(family_dir, tmp_path):
    from jaxinterp.evaluation import evaluate_baseline, evaluate_graph, faithfulness_curve
    from jaxinterp.graph import Graph

    path = family_dir("llama")
    flat, grouped = load_model(path), load_model(path, grouped_kv=True)
    tok = build_word_tokenizer(testing.small_vocab())
    pairs = load_pairs(write_ioi_csv(tmp_path / "ioi.csv", tok, n=4, seed=8), tok)
    graph = attribute(grouped, pairs, method="EAP", batch_size=4, quiet=True)
    out = str(tmp_path / "grouped.json")
    graph.to_json(out)
    again = Graph.from_json(out, spec=grouped.graph_spec)
    assert again.spec == grouped.graph_spec and json.load(open(out))["cfg"]["n_kv_heads"] == 2
    np.testing.assert_array_equal(again.scores, graph.scores)

    # all edges kept: the model; none: every input carries the corrupted activations
    curve = faithfulness_curve(grouped, again, pairs, [10, grouped.graph_spec.n_edges], batch_size=4)
    np.testing.assert_allclose(curve.metric[-1], curve.clean, rtol=1e-4, atol=1e-5)
    empty = Graph(grouped.graph_spec)
    np.testing.assert_allclose(evaluate_graph(grouped, empty, pairs, batch_size=4),
                               evaluate_baseline(flat, pairs, batch_size=4, run_corrupted=True), rtol=1e-4, atol=1e-5)

    # a file of one view is refused against the other, saying which view to load
    with pytest.raises(ValueError, match=r"grouped view.*grouped_kv=True.*--grouped-kv"):
        Graph.from_json(out, spec=flat.graph_spec)
    with pytest.raises(ValueError, match=r"82 edges.*110 edges"):
        evaluate_graph(flat, again, pairs, batch_size=4)
    flat_out = str(tmp_path / "flat.json")
    attribute(flat, pairs, method="EAP", batch_size=4, quiet=True).to_json(flat_out)
    with pytest.raises(ValueError, match=r"ungrouped view.*grouped_kv=False"):
        faithfulness_curve(grouped, Graph.from_json(flat_out), pairs, [10], batch_size=4)


def test_grouped_view_on_the_command_line(family_dir, tmp_path, capsys):
    from jaxinterp.cli import main
    from jaxinterp.graph import Graph

    path = family_dir("llama")
    tok = build_word_tokenizer(testing.small_vocab())
    data = write_ioi_csv(tmp_path / "ioi.csv", tok, n=4, seed=9)
    out = str(tmp_path / "g.json")
    assert main(["attribute", "--model", path, "--data", data, "--method", "EAP", "--grouped-kv",
                 "--batch-size", "4", "--out", out]) == 0
    assert Graph.from_json(out).spec.n_kv_inputs == 2
    capsys.readouterr()
    assert main(["evaluate", "--model", path, "--data", data, "--graph", out, "--top-n", "10", "--grouped-kv",
                 "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["edges"] <= 10
    assert main(["evaluate", "--model", path, "--data", data, "--graph", out, "--top-n", "10",
                 "--batch-size", "4"]) == 2
    assert "--grouped-kv" in capsys.readouterr().err
