"""Model families beyond GPT-2: llama, mistral, qwen2, gemma, gemma2, gpt_neox.

For each, a tiny random-init ``transformers`` model is built here and converted, and

* its logits equal PyTorch's on a right-padded batch (several shapes per family: MHA,
  GQA and MQA, rope scaling, biases, head_dim overrides, sliding windows, soft-caps);
* the circuit-graph forward equals the plain forward, and its node outputs equal an
  independent hand-wired PyTorch forward (``family_reference.py``);
* EAP scores equal the directional derivative, by torch autograd through that
  independent forward, of the mean logit difference along each sampled edge;
* unsupported model types and config features are refused by name.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import load_model, ops, testing
from jaxinterp.attribution import attribute
from jaxinterp.data import load_pairs
from jaxinterp.tokenizer import build_word_tokenizer
from jaxinterp.conversion import ConversionError, convert_hf, load_converted, load_hf_checkpoint
from jaxinterp.graph import GraphSpec
from jaxinterp.models import Intervention, forward

torch = pytest.importorskip("torch")

import family_reference  # noqa: E402
from conftest import padded_batch, write_ioi_csv  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (family, builder overrides); the builders' defaults are 2 layers, d_model 32,
# 4 query heads over 2 key/value heads (see jaxinterp.testing).
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
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox-sequential-full-rotary-tied": ("gpt_neox", dict(
        use_parallel_residual=False, rotary_pct=1.0, rotary_emb_base=100.0, tie_word_embeddings=True,
        attention_bias=False, num_hidden_layers=3, hidden_act="gelu_new")),
}
GRAPH_SHAPES = ["llama", "llama-mha-tied-biases-headdim-linear", "mistral", "qwen2", "gemma", "gpt_neox"]


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

@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_pytorch_on_padded_batch(name, family_dir, hf_model):
    path = family_dir(name)
    model = load_model(path)
    assert model.cfg.model_type == SHAPES[name][0]
    ids, mask, lengths = padded_batch(model.cfg.vocab_size)  # 11 tokens: longer than every window
    ours = np.asarray(model(ids, mask))
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    for b, n in enumerate(lengths):  # HF's outputs at padded positions are not meaningful
        np.testing.assert_allclose(ours[b, :n], ref[b, :n], rtol=1e-4, atol=1e-4, err_msg=name)


def test_converted_configs_read_the_features(family_dir):
    cfg = load_hf_checkpoint(family_dir("llama-mqa-llama3"))[0]
    assert (cfg.n_kv_heads, cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == (1, "llama3", 8.0, 16)
    cfg = load_hf_checkpoint(family_dir("llama-mha-tied-biases-headdim-linear"))[0]
    assert (cfg.d_head, cfg.rope_type, cfg.rope_theta, cfg.qkv_bias, cfg.mlp_bias) == (16, "linear", 500.0, True, True)
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
        assert load_hf_checkpoint(legacy)[0] == load_hf_checkpoint(src)[0], name


def test_orbax_round_trip_keeps_tuple_fields_hashable(tmp_path, family_dir):
    src = family_dir("qwen2")
    cfg0, p0 = load_hf_checkpoint(src)
    cfg1, p1 = load_converted(convert_hf(src, str(tmp_path / "converted")))
    assert cfg0 == cfg1 and cfg1.sliding_layers == (1,)
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
        iv = Intervention(jnp.zeros((spec.n_forward, spec.n_backward)), source, mode=mode)
        got = forward(model.params, cfg, jnp.asarray(ids), jnp.asarray(mask), intervention=iv)
        np.testing.assert_allclose(got, plain, atol=1e-5, err_msg=f"{name} {mode}")
    with torch.no_grad():
        ref_logits, ref_outs = family_reference.forward(hf_model(path), torch.tensor(ids), torch.tensor(mask))
    assert max_error(np.asarray(plain), ref_logits.numpy(), lengths) < 1e-4
    for i, node in enumerate(spec.forward_names):
        ours, ref = np.asarray(outs[i]), ref_outs[node].numpy()
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(ours[b, :n], ref[b, :n], rtol=1e-4, atol=1e-4, err_msg=f"{name} {node}")


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

    for edge, s, d in _sampled_edges(model.graph_spec, np.random.default_rng(0)):
        src, dst = edge.split("->")
        t = torch.zeros((), requires_grad=True)
        logits, _ = family_reference.forward(hf, clean_ids, mask, extra={dst: t * (corr[src] - clean[src])})
        final = logits[rows, last]
        metric = (final[rows, labels[:, 0]] - final[rows, labels[:, 1]]).mean()
        (derivative,) = torch.autograd.grad(metric, t)
        want = -float(derivative)  # scores carry the loss sign: the negated logit difference
        np.testing.assert_allclose(graph.scores[s, d], want, rtol=2e-3, atol=1e-6, err_msg=f"{name} {edge}")


# --- Gemma 2: plain forward only ------------------------------------------------------

def test_gemma2_has_no_circuit_graph(family_dir, tmp_path):
    model = load_model(family_dir("gemma2"))
    assert model.cfg.graph_unsupported_reason
    with pytest.raises(NotImplementedError, match="post_attention_layernorm"):
        model.graph_spec
    ids, mask, _ = padded_batch(model.cfg.vocab_size)
    with pytest.raises(NotImplementedError, match="sum of heads|summed"):
        forward(model.params, model.cfg, jnp.asarray(ids), jnp.asarray(mask), return_node_outputs=True)
    spec = GraphSpec(model.cfg.n_layers, model.cfg.n_heads)
    iv = Intervention(jnp.zeros((spec.n_forward, spec.n_backward)), jnp.zeros((spec.n_forward, 3, 11, 32)))
    with pytest.raises(NotImplementedError, match="no circuit-graph forward"):
        forward(model.params, model.cfg, jnp.asarray(ids), jnp.asarray(mask), intervention=iv)
    tok = build_word_tokenizer(testing.small_vocab())
    pairs = load_pairs(write_ioi_csv(tmp_path / "ioi.csv", tok, n=2), tok)
    with pytest.raises(NotImplementedError, match="gemma2"):
        attribute(model, pairs, method="EAP", quiet=True)


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
    from jaxinterp.config import ModelConfig

    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported; supported"):
        ModelConfig(n_layers=1, n_heads=2, d_model=8, d_head=4, d_mlp=8, vocab_size=10, n_ctx=8,
                    positional="rotary", rope_type="yarn")
    with pytest.raises(ValueError, match="sliding_layers"):
        ModelConfig(n_layers=1, n_heads=2, d_model=8, d_head=4, d_mlp=8, vocab_size=10, n_ctx=8,
                    sliding_layers=(0,))


def test_gqa_graph_keeps_one_kv_input_per_query_head(family_dir):
    model = load_model(family_dir("llama"))
    assert model.cfg.n_kv_heads == 2 and model.cfg.n_heads == 4
    spec = model.graph_spec
    assert spec.n_backward == model.cfg.n_layers * (3 * 4 + 1) + 1
    assert "a1.h3<k>" in spec.backward_names and "a1.h3<v>" in spec.backward_names
