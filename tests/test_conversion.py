"""Conversion: HF GPT-2 checkpoints -> params; logits equal PyTorch's; orbax round trip; errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxinterp import load_model
from jaxinterp.conversion import ConversionError, convert_hf, load_converted, load_hf_checkpoint
from devtools.testing import save_random_gpt2

from conftest import padded_batch

torch = pytest.importorskip("torch")


def hf_logits(path, ids, mask):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("shape", [
    dict(n_layer=2, n_head=4, n_embd=64),
    dict(n_layer=3, n_head=3, n_embd=48, n_inner=100, tie=False),  # non-square MLP, untied
    dict(n_layer=1, n_head=2, n_embd=32, activation_function="gelu", layer_norm_epsilon=1e-6),
])
def test_logits_match_pytorch_on_padded_batch(tmp_path, shape):
    path = save_random_gpt2(str(tmp_path / "m"), seed=1, **shape)
    model = load_model(path)
    ids, mask, lengths = padded_batch(model.cfg.vocab_size)
    ours = np.asarray(model(ids, mask))
    ref = hf_logits(path, ids, mask)
    for b, n in enumerate(lengths):  # HF's outputs at padded positions are not meaningful
        np.testing.assert_allclose(ours[b, :n], ref[b, :n], rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_random_gpt2(str(tmp_path / "one"), n_layer=2, n_head=4, n_embd=64)
    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(sharded, max_shard_size="60KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    a = load_hf_checkpoint(path)[1]
    b = load_hf_checkpoint(sharded)[1]
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_orbax_round_trip_restores_identical_params(tmp_path, gpt2_dir):
    out = convert_hf(gpt2_dir, str(tmp_path / "converted"))
    cfg0, p0, origin0 = load_hf_checkpoint(gpt2_dir)
    cfg1, p1, origin1 = load_converted(out)
    assert cfg0 == cfg1 and origin0 == origin1
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    jax.tree.map(np.testing.assert_array_equal, p0, p1)
    m = load_model(out)  # a converted directory loads like an HF one, tokenizer included
    assert m.tokenizer is not None


def _rewrite_tensors(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path, gpt2_dir):
    bad = str(tmp_path / "bad")
    _rewrite_tensors(gpt2_dir, bad, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(ConversionError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.weight'"):
        load_hf_checkpoint(bad)


def test_misshaped_tensor_is_named(tmp_path, gpt2_dir):
    bad = str(tmp_path / "bad")

    def edit(t):
        t["transformer.h.0.attn.c_proj.weight"] = t["transformer.h.0.attn.c_proj.weight"][:, :10].copy()

    _rewrite_tensors(gpt2_dir, bad, edit)
    with pytest.raises(ConversionError, match=r"h\.0\.attn\.c_proj\.weight.*shape \(64, 10\)"):
        load_hf_checkpoint(bad)


def test_unknown_model_type_lists_supported(tmp_path, gpt2_dir):
    bad = str(tmp_path / "bad")
    shutil.copytree(gpt2_dir, bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(ConversionError, match=r"unsupported model_type 'mamba'.*gpt2"):
        load_hf_checkpoint(bad)


def test_unsupported_config_feature_is_refused(tmp_path):
    path = save_random_gpt2(str(tmp_path / "m"), scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ConversionError, match="scale_attn_by_inverse_layer_idx"):
        load_hf_checkpoint(path)


def test_cli_convert(tmp_path, gpt2_dir):
    out = str(tmp_path / "cli")
    subprocess.run([sys.executable, "-m", "jaxinterp", "convert", gpt2_dir, out], check=True)
    p0 = load_hf_checkpoint(gpt2_dir)[1]
    p1 = load_converted(out)[1]
    jax.tree.map(np.testing.assert_array_equal, p0, p1)


def test_engine_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import jaxinterp, jaxinterp.attribution, jaxinterp.evaluation, jaxinterp.conversion\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpt2_unknown_config_key_is_refused(tmp_path, gpt2_dir):
    """As the other families: a key the GPT-2 converter neither reads nor knows to be
    harmless may change the forward pass, so it is refused, naming it."""
    bad = str(tmp_path / "bad")
    shutil.copytree(gpt2_dir, bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["attn_window"] = 8
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(ConversionError, match=r"gpt2 config fields \['attn_window'\] are not understood"):
        load_hf_checkpoint(bad)


def test_gpt2_hub_config_is_understood():
    """The config.json of the hub's ``gpt2`` (dropouts, the summary head, generation
    defaults: none changes a causal LM's forward pass) and the shipped demo model's."""
    from jaxinterp.conversion.families import gpt2
    from jaxinterp.loading import demo_model_dir

    hub = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
           "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
           "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
           "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
           "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
           "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
           "vocab_size": 50257}
    assert gpt2.config(hub).d_mlp == 3072
    assert gpt2.config(json.load(open(os.path.join(demo_model_dir(), "config.json")))).n_layers == 3


# jaxinterp_config.json as jaxinterp wrote it before format 2 (ModelConfig's fields flat,
# with the conversion facts, the graph view and the RoPE schedule among them)
LEGACY_LLAMA3 = {
    "act_fn": "silu", "attn_logit_softcap": None, "attn_scale": None, "bos_token_id": 1, "d_head": 8, "d_mlp": 48,
    "d_model": 32, "embed_scale": 1.0, "final_logit_softcap": None, "gated_mlp": True, "group_kv_inputs": True,
    "mlp_bias": False, "model_type": "llama", "n_ctx": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
    "norm": "rmsnorm", "norm_eps": 1e-06, "norm_offset": 0.0, "out_bias": False, "parallel_attn_mlp": False,
    "positional": "rotary", "qkv_bias": False, "rope_factor": 8.0, "rope_high_freq_factor": 4.0,
    "rope_low_freq_factor": 1.0, "rope_original_max_position": 16, "rope_theta": 500000.0, "rope_type": "llama3",
    "rotary_dim": None, "sandwich_norms": False, "sliding_layers": None, "sliding_window": None,
    "tie_word_embeddings": False, "vocab_size": 64}


def test_legacy_flat_config_is_read():
    from jaxinterp.config import ModelConfig, Origin, Rope
    from jaxinterp.conversion.checkpoint import read_config

    cfg, origin = read_config(LEGACY_LLAMA3)
    assert cfg == ModelConfig(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=48, vocab_size=64, n_ctx=64,
                              n_kv_heads=2, norm="rmsnorm", norm_eps=1e-6, positional="rotary", act_fn="silu",
                              gated_mlp=True, qkv_bias=False, out_bias=False, mlp_bias=False,
                              rope=Rope(theta=500000.0, type="llama3", factor=8.0, original_max_position=16))
    assert origin == Origin(model_type="llama", tie_word_embeddings=False, bos_token_id=1)
    assert read_config(json.loads(json.dumps({"format": 2, "model": cfg.to_dict(), "origin": origin.to_dict()}))) \
        == (cfg, origin)
    for bad in ({**LEGACY_LLAMA3, "rope_yarn_factor": 2.0}, {"format": 2, "model": {**cfg.to_dict(), "x": 1}},
                {"format": 2, "model": cfg.to_dict(), "origin": None, "extra": 1}, {"format": 3, "model": {}}):
        with pytest.raises(ValueError, match=r"rope_yarn_factor|'x'|'extra'|format 3"):
            read_config(bad)


def test_legacy_converted_directory_loads(tmp_path, gpt2_dir):
    """A directory converted before format 2 (its flat jaxinterp_config.json, written out
    here in that format) loads as it did: same config, parameters and logits, with its
    conversion facts as the model's origin and the graph view chosen at load time."""
    out = convert_hf(gpt2_dir, str(tmp_path / "converted"))
    path = os.path.join(out, "jaxinterp_config.json")
    new = json.load(open(path))
    assert new["format"] == 2 and new["origin"]["model_type"] == "gpt2"
    rope = {f"rope_{k}": v for k, v in new["model"].pop("rope").items()}
    flat = {**new["model"], **rope, **new["origin"], "group_kv_inputs": False}
    assert len(flat) == len(LEGACY_LLAMA3) and set(flat) == set(LEGACY_LLAMA3)  # the old format's keys
    json.dump(flat, open(path, "w"))
    legacy, fresh = load_model(out), load_model(gpt2_dir)
    assert (legacy.cfg, legacy.origin) == (fresh.cfg, fresh.origin)
    assert legacy.origin.tie_word_embeddings and not legacy.grouped_kv
    ids, mask, _ = padded_batch(fresh.cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(legacy(ids, mask)), np.asarray(fresh(ids, mask)))
    flat["rope_yarn_factor"] = 2.0
    json.dump(flat, open(path, "w"))
    with pytest.raises(ConversionError, match=r"not a jaxinterp model config.*rope_yarn_factor"):
        load_converted(out)
