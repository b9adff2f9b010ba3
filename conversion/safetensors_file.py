"""Read-only numpy views of the tensors in a safetensors file, mapped, not copied.

The format (huggingface/safetensors): an 8-byte little-endian header length ``n``, ``n``
bytes of JSON naming each tensor's ``dtype``, ``shape`` and ``data_offsets`` (a byte range
of the data that follows the header), an optional ``__metadata__`` object, then the data.

Why not safetensors' own numpy reader: ``get_tensor`` copies every tensor out of the file,
so a checkpoint sat in memory twice more than it must (the file's pages, the copy, then
the stacked parameters); and it reads BF16, the dtype of most checkpoints published since
2023, only if something registered ``ml_dtypes`` with numpy first (jax does). Here a tensor
is a view of the mapped file (``ml_dtypes.bfloat16`` for BF16, named, not looked up); the
converter's one copy is the parameter itself.
Every check safetensors makes on a header is made here, each failure a message naming the
file and the cause.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a larger length is a damaged file


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file (the message names the cause)."""


def tensor_views(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file ``path`` as a read-only view of the mapped file
    (the mapping lives as long as a view does). Raises :class:`SafetensorsError`."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError("the header is not a JSON object")
    n_data = size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if n_data else np.zeros(0, np.uint8)
    views, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = _entry(name, entry)
        begin, end = offsets
        if not 0 <= begin <= end <= n_data:
            raise SafetensorsError(f"tensor {name!r}: bytes [{begin}, {end}) outside the file's {n_data} bytes of data "
                                   f"(truncated?)")
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise SafetensorsError(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} of {entry['dtype']}")
        views[name] = data[begin:end].view(dtype).reshape(shape)
        ranges.append((begin, end, name))
    # safetensors' validation: the tensors tile the data exactly, in order, no gap, no overlap
    at = 0
    for begin, end, name in sorted(ranges):
        if begin != at:
            raise SafetensorsError(f"tensor {name!r} starts at byte {begin} of the data, expected {at} "
                                   f"(tensors overlap or leave a gap)")
        at = end
    if at != n_data:
        raise SafetensorsError(f"the tensors cover {at} of the file's {n_data} bytes of data")
    return views


def _entry(name: str, entry) -> tuple[type, tuple[int, ...], tuple[int, int]]:
    """``(numpy dtype, shape, (begin, end))`` of one header entry, checked."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SafetensorsError(f"tensor {name!r}: header entry {entry!r} lacks dtype, shape or data_offsets")
    if entry["dtype"] not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: dtype {entry['dtype']!r} is not supported ({', '.join(DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise SafetensorsError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    return DTYPES[entry["dtype"]], tuple(shape), (offsets[0], offsets[1])
