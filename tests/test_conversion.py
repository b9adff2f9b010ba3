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
from jaxinterp.testing import save_random_gpt2

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
    _, a = load_hf_checkpoint(path)
    _, b = load_hf_checkpoint(sharded)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_orbax_round_trip_restores_identical_params(tmp_path, gpt2_dir):
    out = convert_hf(gpt2_dir, str(tmp_path / "converted"))
    cfg0, p0 = load_hf_checkpoint(gpt2_dir)
    cfg1, p1 = load_converted(out)
    assert cfg0 == cfg1
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
    _, p0 = load_hf_checkpoint(gpt2_dir)
    _, p1 = load_converted(out)
    jax.tree.map(np.testing.assert_array_equal, p0, p1)


def test_engine_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import jaxinterp, jaxinterp.attribution, jaxinterp.evaluation, jaxinterp.conversion\n")
    subprocess.run([sys.executable, "-c", code], check=True)
