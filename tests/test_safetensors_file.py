"""conversion.safetensors_file: tensors are views of the mapped file, equal to what the
safetensors library (and torch, for BF16) reads; every damaged header is refused by name;
the converter's parameters are aligned arrays of their own."""

import json
import os

import numpy as np
import pytest

from jaxinterp.conversion.safetensors_file import SafetensorsError, tensor_views

torch = pytest.importorskip("torch")


def _write(path, header: dict, data: bytes, length=None) -> str:
    """A safetensors file written byte by byte from the format's description."""
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write((len(head) if length is None else length).to_bytes(8, "little") + head + data)
    return str(path)


def test_every_dtype_equals_the_safetensors_library(tmp_path):
    from safetensors.numpy import save_file, load_file

    rng = np.random.default_rng(0)
    tensors = {"f32": rng.normal(size=(3, 5)).astype(np.float32), "f16": rng.normal(size=(7,)).astype(np.float16),
               "f64": rng.normal(size=(2, 2, 2)), "i64": rng.integers(-9, 9, size=(4,)),
               "u8": rng.integers(0, 255, size=(5,)).astype(np.uint8), "scalar": np.array(2.5, np.float32),
               "empty": np.zeros((0, 4), np.float32)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    ours, theirs = tensor_views(path), load_file(path)
    assert ours.keys() == theirs.keys()
    for k, a in theirs.items():
        assert ours[k].dtype == a.dtype and ours[k].shape == a.shape, k
        np.testing.assert_array_equal(ours[k], a)
        assert not ours[k].flags.writeable, k  # a view of the file, which is never written


def test_bf16_equals_torch(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(33, 17, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    path = str(tmp_path / "b.safetensors")
    save_file({"w": t, "x": t[:2].float()}, path)
    v = tensor_views(path)
    assert str(v["w"].dtype) == "bfloat16"
    np.testing.assert_array_equal(v["w"].astype(np.float32), t.float().numpy())
    np.testing.assert_array_equal(v["x"], t[:2].float().numpy())


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("header, data, length, message", [
    (GOOD, bytes(12), None, None),  # the well-formed file the damaged ones below derive from
    (GOOD, bytes(11), None, r"tensor 'b': bytes \[8, 12\) outside the file's 11 bytes of data \(truncated\?\)"),
    (GOOD, bytes(16), None, r"the tensors cover 12 of the file's 16 bytes of data"),
    (GOOD, bytes(12), 10**12, r"header length 1000000000000 does not fit the file"),
    ({**GOOD, "a": {**GOOD["a"], "dtype": "F8"}}, bytes(12), None, r"tensor 'a': dtype 'F8' is not supported"),
    ({**GOOD, "a": {**GOOD["a"], "shape": [3]}}, bytes(12), None, r"tensor 'a': 8 bytes for shape \[3\] of F32"),
    ({**GOOD, "a": {**GOOD["a"], "shape": [-2]}}, bytes(12), None, r"shape \[-2\] is not a list of sizes"),
    ({**GOOD, "b": {**GOOD["b"], "data_offsets": [4, 8]}}, bytes(12), None, r"tensor 'b' starts at byte 4 .*overlap"),
    ({**GOOD, "b": {**GOOD["b"], "data_offsets": [8]}}, bytes(12), None, r"data_offsets \[8\] is not \[begin, end\]"),
    ({"a": [1, 2]}, bytes(0), None, r"tensor 'a': header entry \[1, 2\] lacks dtype"),
    ([1], bytes(0), None, r"the header is not a JSON object"),
])
def test_damaged_headers_are_refused_by_cause(tmp_path, header, data, length, message):
    path = _write(tmp_path / "f.safetensors", header, data, length)
    if message is None:
        assert sorted(tensor_views(path)) == ["a", "b"]
        return
    with pytest.raises(SafetensorsError, match=message):
        tensor_views(path)


def test_short_and_non_json_files_are_refused(tmp_path):
    (tmp_path / "s").write_bytes(b"\x08\x00")
    with pytest.raises(SafetensorsError, match="shorter than the 8-byte header length"):
        tensor_views(str(tmp_path / "s"))
    (tmp_path / "j").write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(SafetensorsError, match="the header is not JSON"):
        tensor_views(str(tmp_path / "j"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_with_hf_logits(tmp_path, dtype):
    """Most published checkpoints are BF16: they load (as float32, exactly the stored values)
    and give the logits of Hugging Face's model read from the same files."""
    from transformers import AutoModelForCausalLM

    from devtools.testing import save_random_gpt2
    from jaxinterp import load_model

    from conftest import padded_batch

    src = save_random_gpt2(str(tmp_path / "f32"), seed=3, n_layer=2, n_head=4, n_embd=64)
    half = str(tmp_path / dtype)
    AutoModelForCausalLM.from_pretrained(src).to(getattr(torch, dtype)).save_pretrained(half)
    for name in os.listdir(src):  # the tokenizer
        if name.startswith(("tokenizer", "vocab", "merges", "special")):
            os.link(os.path.join(src, name), os.path.join(half, name))
    hf = AutoModelForCausalLM.from_pretrained(half, torch_dtype=torch.float32).eval()
    model = load_model(half)
    ids, mask, lengths = padded_batch(model.cfg.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(model(ids, mask))
    scale = np.abs(ref).max()
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(ours[b, :n], ref[b, :n], atol=1e-5 * scale, rtol=0)
    assert not np.allclose(ours, np.asarray(load_model(src)(ids, mask)), atol=1e-5 * scale)  # rounding happened


def test_converted_parameters_are_aligned_arrays_of_their_own(gpt2_dir):
    """64-byte aligned (XLA:CPU then uses them as the device buffers, no copy), owning their
    memory: never a view of the mapped checkpoint, which the user may replace meanwhile."""
    import jax

    from jaxinterp.conversion import load_hf_checkpoint

    for leaf in jax.tree.leaves(load_hf_checkpoint(gpt2_dir)[1]):
        assert leaf.dtype == np.float32 and leaf.flags.c_contiguous and leaf.flags.writeable
        assert leaf.ctypes.data % 64 == 0
        base = leaf
        while base is not None:
            assert not isinstance(base, np.memmap)
            base = getattr(base, "base", None)


@pytest.mark.parametrize("make", [
    lambda w: w.T,  # an [out, in] matrix read as [in, out]: the tiled path
    lambda w: w.reshape(3, 100, 700).transpose(0, 2, 1),  # per-head weights [head, d_model, d_head]
    lambda w: w.reshape(300, 14, 50).transpose(1, 2, 0),  # o_proj's [head, d_head, d_model] view
    lambda w: w[:, ::2],  # strided, not transposed
    lambda w: w,  # contiguous
])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_copy_into_parameters_equals_numpy_assignment(make, dtype):
    """The converter's copy (tiles of 256 x 256 when the source's last axis is strided)
    gives exactly numpy's converted copy, at sizes that are no multiple of the tile."""
    import ml_dtypes

    from jaxinterp.conversion.hf import _copy_into, aligned_empty

    w = np.random.default_rng(0).standard_normal((300, 700), dtype=np.float32)
    w = w.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    src = make(w)
    out = aligned_empty(src.shape)
    out[...] = np.nan
    _copy_into(out, src)
    np.testing.assert_array_equal(out, src.astype(np.float32))
