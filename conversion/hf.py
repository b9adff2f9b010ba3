"""Read a Hugging Face checkpoint directory into a parameter pytree, without torch.

A family (``families/*.py``) is data: ``config(hf_config) -> ModelConfig`` plus a list of
:class:`Rule` saying which HF tensors fill which parameters through which named
transform. This module only reads files, checks names and shapes, and stacks layers.
What the checkpoint says beyond the architecture (``model_type``, tied embeddings, the
BOS id) becomes an :class:`jaxinterp.config.Origin` (:func:`origin`), not config fields.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import mmap
import os
import re
from typing import Callable, Optional, Sequence

import numpy as np

from jaxinterp.config import ModelConfig, Origin


class ConversionError(ValueError):
    """A checkpoint that cannot be converted faithfully (the message names the cause)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Fill ``outputs`` (paths in the param tree) from HF tensor ``key``.

    ``key`` may contain ``{layer}``: the rule is then applied per layer and the results
    stacked on a new leading ``layer`` axis. ``shape`` is the HF tensor's expected shape.
    ``transform(array) -> tuple of arrays``, one per output: a change of layout only
    (reshape, transpose, split; views where numpy allows), since it sees the stored dtype
    (e.g. bfloat16) and float32 comes with the copy into the parameter.
    """

    outputs: tuple[tuple[str, ...], ...]
    key: str
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], tuple[np.ndarray, ...]] = lambda a: (a,)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` maps to jaxinterp."""

    model_types: tuple[str, ...]
    config: Callable[[dict], ModelConfig]
    rules: Callable[[ModelConfig, bool], Sequence[Rule]]  # (config, tied embeddings) -> rules
    tied_by_default: bool  # Hugging Face's tie_word_embeddings default for the family
    prefixes: tuple[str, ...] = ()  # optional key prefixes, e.g. "transformer."
    ignore: tuple[str, ...] = ()  # regexes of tensors that are not parameters (buffers)
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement): older names of a tensor


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for t in family.model_types:
        FAMILIES[t] = family
    return family


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{model_dir}: no config.json (is this a Hugging Face checkpoint directory?)")
    from jaxinterp.io import read_json

    config = read_json(path)  # errors name the file; a byte-order mark is accepted
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: not a model config (a JSON {type(config).__name__}, not an object)")
    return config


def family_for(hf_config: dict) -> Family:
    importlib.import_module(f"{__package__}.families")  # registers the families

    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def origin(family: Family, hf_config: dict) -> Origin:
    """The conversion facts of ``hf_config`` (a config ``family`` accepted)."""
    return Origin(model_type=hf_config["model_type"],
                  tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", family.tied_by_default)),
                  bos_token_id=hf_config.get("bos_token_id"))


def _open_tensors(model_dir: str) -> dict[str, Callable[[], np.ndarray]]:
    """Loaders for every tensor of ``model.safetensors`` or a sharded index: views of the
    mapped files in their stored dtype (:mod:`.safetensors_file`); the converter's copy into
    the float32 parameters converts them."""
    from .safetensors_file import SafetensorsError, tensor_views

    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        from jaxinterp.io import read_json

        index_json = read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        present = sorted(os.listdir(model_dir))
        raise ConversionError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                              f"(found {present}); convert .bin checkpoints to safetensors first")
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    for name in files:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            raise ConversionError(f"{model_dir}: shard {name} listed in the index is missing")
        try:
            views = tensor_views(path)
        except (SafetensorsError, OSError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
        for key, view in views.items():
            loaders[key] = (lambda a=view: a)
    return loaders


def load_hf_checkpoint(model_dir: str) -> tuple[ModelConfig, dict, Origin]:
    """Convert ``model_dir`` to ``(ModelConfig, params, Origin)``, params with numpy float32 leaves."""
    hf_config = read_hf_config(model_dir)
    family = family_for(hf_config)
    cfg, facts = family.config(hf_config), origin(family, hf_config)
    return cfg, convert_tensors(family, cfg, facts, _open_tensors(model_dir), model_dir), facts


def convert_tensors(family: Family, cfg: ModelConfig, facts: Origin, loaders: dict[str, Callable[[], np.ndarray]],
                    source: str, config_name: str = "config.json", names: Optional[dict[str, str]] = None) -> dict:
    """Apply ``family``'s rules to HF-named tensors: the parameter pytree (numpy float32).
    ``facts``: the checkpoint's :func:`origin` (its tied embeddings choose rules).

    ``loaders``: HF tensor name -> a function returning the array (any real dtype; copied
    into float32 parameters, :func:`_copy_into`). ``source`` starts every
    error message; ``config_name`` names where the expected shapes came from; ``names``
    maps an HF tensor name to the name an error message should use (the GGUF reader
    passes its own tensor names, so that a message names what is in the user's file).
    """
    model_dir = source
    names = names or {}

    def strip(key: str) -> str:
        for prefix in family.prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        for pattern, replacement in family.renames:
            if re.fullmatch(pattern, key):
                return re.sub(pattern, replacement, key)
        return key

    available: dict[str, str] = {}
    for k in loaders:
        if strip(k) in available:
            raise ConversionError(f"{model_dir}: tensors {available[strip(k)]!r} and {k!r} both fill {strip(k)!r}")
        available[strip(k)] = k
    used: set[str] = set()

    def fetch(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in available:
            raise ConversionError(f"{model_dir}: missing tensor {names.get(key, key)!r} (model_type {facts.model_type})")
        a = loaders[available[key]]()
        if tuple(a.shape) != tuple(shape):
            raise ConversionError(f"{model_dir}: tensor {names.get(available[key], key)!r} has shape "
                                  f"{tuple(a.shape)}, expected {tuple(shape)} from {config_name}")
        used.add(key)
        return a

    from jaxinterp.layout import unflatten

    flat: dict = {}  # parameter path -> array
    with _Copies() as copies:
        for rule in family.rules(cfg, facts.tie_word_embeddings):
            # per layer: each layer's parts written straight into the stacked arrays
            layered = "{layer}" in rule.key
            values = None
            for i in range(cfg.n_layers) if layered else (None,):
                parts = rule.transform(fetch(rule.key.format(layer=i) if layered else rule.key, rule.shape))
                if values is None:
                    values = tuple(aligned_empty(((cfg.n_layers,) if layered else ()) + np.shape(a)) for a in parts)
                for out, a in zip(values, parts, strict=True):
                    copies.add(out if i is None else out[i], a)
            flat.update(zip(rule.outputs, values, strict=True))
    params = unflatten(flat)

    leftover = [k for k in available if k not in used and not any(re.fullmatch(p, k) for p in family.ignore)]
    if leftover:
        raise ConversionError(f"{model_dir}: tensors not understood by the {facts.model_type} converter: "
                              f"{sorted(names.get(available[k], k) for k in leftover)[:10]}")
    check_layout(params, cfg, f"{model_dir}: the {facts.model_type} converter's output")
    return params


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array in fresh pages of its own: the converter's
    parameters. Page-aligned, so XLA:CPU takes it as the device buffer itself (it copies a
    host array that is not 64-byte aligned). An anonymous mapping, not ``np.empty``:
    numpy asks for transparent huge pages (MADV_HUGEPAGE) for large arrays, and in a VM
    their first touch can be slow: writing 6 GB fresh took 6.1-14.4 s with them, 2.7-5.7 s
    without (the 2-core Xeon VM, 4 runs each); 340 MB (GPT-2 small) 0.05 s, but 0.4-0.8 s
    in a quarter of the runs, with them, 0.12-0.13 s without."""
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype).reshape(shape)


class _Copies:
    """:func:`_copy_into` on every core: numpy copies without the GIL, and writing fresh
    pages is most of a load (Llama-3.2-1B from float16, 2 cores: 8-9.5 s in one thread).
    At most two copies per thread wait, so sources a loader computed (GGUF's dequantised
    tensors) are not all held at once; leaving the block waits for every copy."""

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.workers = os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="jaxinterp-load")
        self.pending: collections.deque = collections.deque()
        return self

    def add(self, out: np.ndarray, a: np.ndarray) -> None:
        self.pending.append(self.pool.submit(_copy_into, out, a))
        while len(self.pending) > 2 * self.workers:
            self.pending.popleft().result()

    def __exit__(self, *exc):
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(cancel_futures=True)
        return False


def _copy_into(out: np.ndarray, a: np.ndarray, tile: int = 256) -> None:
    """``out[...] = a`` (converted to ``out``'s dtype). A source whose last axis is strided
    (the transposed ``[out, in]`` matrices of a checkpoint) is copied in tiles of its last
    two axes: in numpy's element order every element came from another cache line
    (Llama-3.2-1B's unembedding, the float16 embedding's transpose, 263 M elements: 4.4-4.5 s
    untiled, 0.75-0.78 s tiled, output pages already written)."""
    if a.ndim < 2 or a.strides[-1] == a.itemsize or a.size < tile * tile:
        out[...] = a
        return
    for i in range(0, a.shape[-2], tile):
        for j in range(0, a.shape[-1], tile):
            out[..., i:i + tile, j:j + tile] = a[..., i:i + tile, j:j + tile]


def check_layout(params, cfg: ModelConfig, source: str) -> None:
    """:func:`jaxinterp.layout.check_params` as a ConversionError: every converted or restored
    pytree has exactly the leaves and shapes of the one layout table."""
    from jaxinterp.layout import LayoutError, check_params

    try:
        check_params(params, cfg, source)
    except LayoutError as e:
        raise ConversionError(str(e)) from None


def convert_hf(model_dir: str, out_dir: str) -> str:
    """Convert an HF checkpoint directory and save it with orbax (see ``checkpoint.py``)."""
    from .checkpoint import save_converted

    cfg, params, facts = load_hf_checkpoint(model_dir)
    save_converted(out_dir, cfg, params, tokenizer_dir=model_dir, origin=facts)
    return out_dir
