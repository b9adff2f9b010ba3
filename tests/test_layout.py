"""The one parameter table (jaxinterp.layout) and what is derived from it: abstract shapes,
sharding axes, the demo initialisation, and the check of every converted pytree."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxinterp import layout, sharding
from jaxinterp.config import ModelConfig
from jaxinterp.conversion import ConversionError, load_converted, save_converted
from jaxinterp.layout import LEAVES, SWITCHES, LayoutError, check_params

AXES = {"layer", "head", "kv_head", "d_head", "d_model", "d_mlp", "vocab", "ctx"}

GQA = ModelConfig(n_layers=2, n_heads=8, n_kv_heads=2, d_model=64, d_head=8, d_mlp=96, vocab_size=50, n_ctx=16,
                  norm="rmsnorm", positional="rotary", act_fn="silu", gated_mlp=True, qkv_bias=True, out_bias=False,
                  mlp_bias=True)


def test_table_uses_the_axis_vocabulary_and_known_switches():
    for path, leaf in LEAVES.items():
        assert set(leaf.axes) <= AXES, path
        assert set(leaf.when) <= set(SWITCHES), path
        assert (leaf.axes[0] == "layer") == (path[0] == "blocks"), path


def test_switches_decide_presence_and_sizes_come_from_the_config():
    shapes = layout.shapes(GQA)
    attn = {p[-1]: s for p, s in shapes.items() if p[:2] == ("blocks", "attn")}
    assert attn == {"w_q": (2, 8, 64, 8), "b_q": (2, 8, 8), "w_k": (2, 2, 64, 8), "b_k": (2, 2, 8),
                    "w_v": (2, 2, 64, 8), "b_v": (2, 2, 8), "w_o": (2, 8, 8, 64)}  # no b_o: out_bias=False
    mlp = {p[-1] for p in shapes if p[:2] == ("blocks", "mlp")}
    assert mlp == {"w_in", "b_in", "w_gate", "b_gate", "w_out", "b_out"}
    assert ("embed", "w_pos") not in shapes and ("ln_f", "b") not in shapes  # rotary, RMSNorm
    assert ("blocks", "ln1_post", "w") not in shapes and ("unembed", "b_u") not in shapes
    sandwich = dataclasses.replace(GQA, sandwich_norms=True)
    assert layout.shapes(sandwich)[("blocks", "ln2_post", "w")] == (2, 64)
    assert layout.param_count(GQA) == sum(np.prod(s) for s in shapes.values())
    abstract = layout.abstract_params(GQA, np.float16)
    assert abstract["blocks"]["attn"]["w_k"] == jax.ShapeDtypeStruct((2, 2, 64, 8), np.float16)


def test_converted_models_match_the_table(model, tmp_path):
    from jaxinterp import load_model
    from devtools.testing import save_random_llama

    check_params(model.params, model.cfg)
    llama = load_model(save_random_llama(str(tmp_path / "llama")))
    check_params(llama.params, llama.cfg)
    assert set(layout.flatten(llama.params)) == set(layout.shapes(llama.cfg))


def test_check_names_the_missing_extra_or_misshapen_leaf(model):
    params = jax.tree.map(np.asarray, model.params)
    missing = {**params, "blocks": {**params["blocks"], "attn": dict(params["blocks"]["attn"])}}
    del missing["blocks"]["attn"]["b_o"]
    with pytest.raises(LayoutError, match=r"src: missing parameter blocks/attn/b_o \['layer', 'd_model'\] "
                                          r"\(present when out_bias\)"):
        check_params(missing, model.cfg, "src")
    extra = {**params, "unembed": {**params["unembed"], "b_u": np.zeros(model.cfg.vocab_size)}}
    with pytest.raises(LayoutError, match=r"unexpected parameter unembed/b_u: it is not expected for this "
                                          r"config \(present when unembed_bias\)"):
        check_params(extra, model.cfg)
    unknown = {**params, "embed": {**params["embed"], "w_type": np.zeros(3)}}
    with pytest.raises(LayoutError, match=r"unexpected parameter embed/w_type: it is not a leaf of "
                                          r"jaxinterp.layout.LEAVES"):
        check_params(unknown, model.cfg)
    c = model.cfg
    bad = {**params, "blocks": {**params["blocks"], "mlp": {**params["blocks"]["mlp"],
                                                            "w_in": np.zeros((c.n_layers, c.d_mlp, c.d_model))}}}
    with pytest.raises(LayoutError, match=rf"parameter blocks/mlp/w_in has shape \(2, {c.d_mlp}, 64\), expected "
                                          rf"\(2, 64, {c.d_mlp}\) \[layer=2, d_model=64, d_mlp={c.d_mlp}\]"):
        check_params(bad, c)


def test_a_converter_whose_rules_disagree_with_the_table_is_refused(gpt2_dir, monkeypatch):
    from jaxinterp.conversion import hf

    gpt2 = hf.family_for(hf.read_hf_config(gpt2_dir))
    # rules that forget the attention output bias (its tensor ignored, so only the layout check can see it)
    broken = dataclasses.replace(
        gpt2, rules=lambda cfg, tied: [r for r in gpt2.rules(cfg, tied) if r.outputs != (("blocks", "attn", "b_o"),)],
        ignore=gpt2.ignore + (r"h\.\d+\.attn\.c_proj\.bias",))
    monkeypatch.setitem(hf.FAMILIES, "gpt2", broken)
    with pytest.raises(ConversionError, match=r"the gpt2 converter's output: missing parameter blocks/attn/b_o"):
        hf.load_hf_checkpoint(gpt2_dir)


def test_a_restored_checkpoint_is_checked(model, tmp_path):
    params = jax.tree.map(np.asarray, model.params)
    short = {**params, "ln_f": {"w": params["ln_f"]["w"]}}  # LayerNorm without its bias
    save_converted(str(tmp_path / "m"), model.cfg, short)
    with pytest.raises(ConversionError, match=r"convert the model again\): missing parameter ln_f/b"):
        load_converted(str(tmp_path / "m"))


def test_sharding_axes_are_the_table():
    assert sharding.PARAM_AXES == {p: leaf.axes for p, leaf in LEAVES.items()}
    assert sharding.logical_axes(("blocks", "ln2_post", "w"), 2) == ("layer", "d_model")
    assert sharding.logical_axes(("ln_f", "b"), 1) == ("d_model",)
    specs = sharding.param_specs(layout.abstract_params(GQA), {"data": 1, "model": 2})
    assert specs["blocks"]["attn"]["b_k"] == sharding.P(None, "model", None)


def test_demo_initialisation_covers_the_table():
    from devtools import train_demo

    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=32, vocab_size=20, n_ctx=8)
    params = train_demo.init_params(cfg, 0)
    assert set(layout.flatten(params)) == set(layout.shapes(cfg)) - {("unembed", "w_u")}  # tied
    check_params(train_demo.full_params(params), cfg)
    assert float(np.abs(params["blocks"]["ln1"]["w"] - 1).max()) == 0
    assert float(params["blocks"]["attn"]["w_o"].std()) < 0.02  # residual projections scaled down


def test_describe_lists_present_leaves_with_sizes():
    text = layout.describe(GQA)
    assert "blocks/attn/w_k      [layer=2, kv_head=2, d_model=64, d_head=8]" in text
    assert "attn/b_o" not in text and "mlp_bias" in text
    assert "blocks/attn/b_o" in layout.describe()
