"""gguf_header.read_header against the gguf package's GGUFReader on the same files: the
same metadata values, of the same Python types, and the same tensors (names, types,
shapes, data), for metadata of every value type and float32, float16, bfloat16 and
quantised tensors, with the default and a custom alignment; a file it does not read
(big-endian) is left to GGUFReader. (SmolLM2's real file: every test_gguf test of it reads
it this way, against transformers' own GGUF reader and tokenizer.)"""

import gguf
import numpy as np
import pytest

from jaxinterp.conversion.gguf import _metadata, _open
from jaxinterp.conversion.gguf_header import read_header


def _every_value_type(w):
    w.add_uint8("test.u8", 250)
    w.add_int8("test.i8", -7)
    w.add_uint16("test.u16", 65000)
    w.add_int16("test.i16", -3000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float32("test.f32", 0.1)  # not exactly a float32: both readers give its float32 value
    w.add_float64("test.f64", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "caf\u00e9 \u6771\u4eac")
    w.add_string("test.empty", "")
    w.add_array("test.strings", ["<|endoftext|>", "", "\u0120the", "caf\u00e9"])
    w.add_array("test.ints", [3, -1, 0])
    w.add_array("test.floats", [0.5, -1e-5])
    w.add_array("test.bools", [True, False])


def _typed(value):
    """A value with the type of every part, so that 1 == 1.0 == True cannot pass."""
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return type(value).__name__, value


def assert_reads_as_gguf_reader(path):
    meta, tensors = read_header(path)
    reader = gguf.GGUFReader(path)
    expected = _metadata(reader, path)
    assert list(meta) == list(expected)
    assert {k: _typed(v) for k, v in meta.items()} == {k: _typed(v) for k, v in expected.items()}
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert (ours.tensor_type, ours.shape.dtype, ours.shape.tolist()) == \
            (theirs.tensor_type, theirs.shape.dtype, theirs.shape.tolist()), ours.name
        assert (ours.data.dtype, ours.data.shape) == (theirs.data.dtype, theirs.data.shape), ours.name
        np.testing.assert_array_equal(ours.data, theirs.data)


def _write(path, endianess=gguf.GGUFEndian.LITTLE, alignment=None, pad=0):
    """A GGUF file as llama.cpp's writer lays it out: metadata of every value type and
    tensors of 1 to 3 dimensions, float32, float16 and the quantised types; ``pad`` more
    bytes of metadata move where the tensor data starts."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama", endianess=endianess)
    if alignment:
        w.add_custom_alignment(alignment)
    _every_value_type(w)
    w.add_string("test.pad", "x" * pad)
    w.add_tensor("norm.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("f32.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16.weight", rng.standard_normal((2, 3, 32)).astype(np.float16))
    if endianess == gguf.GGUFEndian.LITTLE:
        for name in ("Q8_0", "Q4_1", "Q5_0", "BF16"):
            qtype = gguf.GGMLQuantizationType[name]
            w.add_tensor(f"{name}.weight", gguf.quants.quantize(rng.standard_normal((4, 256)).astype(np.float32), qtype),
                         raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment, pad", [(None, 0), (None, 16), (None, 40), (64, 0)])
def test_reads_what_gguf_reader_reads(tmp_path, alignment, pad):
    path = _write(str(tmp_path / "m.gguf"), alignment=alignment, pad=pad)
    assert_reads_as_gguf_reader(path)
    assert {t.tensor_type.name for t in read_header(path)[1]} == {"F32", "F16", "Q8_0", "Q4_1", "Q5_0", "BF16"}


def test_a_big_endian_file_is_left_to_gguf_reader(tmp_path):
    path = _write(str(tmp_path / "be.gguf"), endianess=gguf.GGUFEndian.BIG)
    assert read_header(path) is None
    meta, tensors = _open(path)
    reader = gguf.GGUFReader(path)
    assert meta == _metadata(reader, path) and meta["test.u32"] == 4_000_000_000
    np.testing.assert_array_equal(tensors[1].data, reader.tensors[1].data)
