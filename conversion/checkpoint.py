"""Converted models on disk: orbax-checkpoint params + the jaxinterp config + tokenizer.

Layout of a converted directory::

    jaxinterp_config.json    {"format": 2, "model": ModelConfig fields (rope nested),
                              "origin": Origin fields (model_type, tied embeddings, BOS id) or null}
    params/                  orbax checkpoint of the parameter pytree
    tokenizer files          copied from the Hugging Face directory, if any

Directories written before format 2 hold the ModelConfig fields flat, with the conversion
facts (``tie_word_embeddings``, ``model_type``, ``bos_token_id``), the graph view
``group_kv_inputs`` (ignored: the view is chosen at load time) and the RoPE schedule as
``rope_theta``, ``rope_type``, ``rope_factor``, ... among them; :func:`read_config` reads
both. A key of neither format is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys

import numpy as np

from jaxinterp.config import ModelConfig, Origin
from jaxinterp.io import atomic_write_text, read_json, replace_dir, temp_dir_beside

CONFIG_NAME = "jaxinterp_config.json"
FORMAT = 2
# the flat format's keys that are not ModelConfig fields (any subset: older files lack newer keys)
_LEGACY_ORIGIN = ("model_type", "tie_word_embeddings", "bos_token_id")
_LEGACY_ROPE = {"rope_theta": "theta", "rope_type": "type", "rope_factor": "factor",
                "rope_low_freq_factor": "low_freq_factor", "rope_high_freq_factor": "high_freq_factor",
                "rope_original_max_position": "original_max_position"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def is_converted(path: str) -> bool:
    return os.path.exists(os.path.join(path, CONFIG_NAME))


def config_json(cfg: ModelConfig, origin: Origin | None = None) -> str:
    """The text of ``jaxinterp_config.json`` (module docstring)."""
    model = cfg.to_dict()
    del model["gemma2_heads"]  # the graph's head definition: chosen at load time, as the grouped-query view
    return json.dumps({"format": FORMAT, "model": model, "origin": None if origin is None else origin.to_dict()},
                      indent=2, sort_keys=True)


def read_config(d: dict) -> tuple[ModelConfig, Origin | None]:
    """``(ModelConfig, Origin or None)`` of a ``jaxinterp_config.json`` object, in format 2
    or the flat format before it (module docstring). Unknown keys raise ValueError."""
    if not isinstance(d, dict):
        raise TypeError(f"a JSON object, not a {type(d).__name__}")
    if "format" in d:
        if d["format"] != FORMAT:
            raise ValueError(f"format {d['format']!r} is not understood (this jaxinterp reads {FORMAT}); "
                             f"convert the model again")
        unknown = sorted(set(d) - {"format", "model", "origin"})
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        origin = d.get("origin")
        return ModelConfig.from_dict(d["model"]), None if origin is None else Origin.from_dict(origin)
    flat = dict(d)
    facts = {k: flat.pop(k) for k in _LEGACY_ORIGIN if k in flat}
    flat.pop("group_kv_inputs", None)  # a graph view: chosen at load time now
    rope = {new: flat.pop(old) for old, new in _LEGACY_ROPE.items() if old in flat}
    if rope:
        flat["rope"] = rope
    origin = Origin.from_dict(facts) if "model_type" in facts else None
    return ModelConfig.from_dict(flat), origin


def save_converted(out_dir: str, cfg: ModelConfig, params, tokenizer_dir: str | None = None,
                   extra_files: dict | None = None, origin: Origin | None = None) -> None:
    """Save ``params`` with orbax next to the config and ``origin`` (the checkpoint's
    conversion facts, :class:`jaxinterp.config.Origin`; None: not known) (and the
    tokenizer's files, and ``extra_files``: name -> text, e.g. the record of an edit,
    written in the same swap).

    The model is built in a temporary directory beside ``out_dir`` and swapped in when
    complete (:func:`jaxinterp.io.replace_dir`): an existing converted model there is
    replaced only then, so a kill or a full disk never leaves nothing (or half a model).
    An existing ``out_dir`` that is neither empty nor a converted model is refused.
    """
    import orbax.checkpoint as ocp

    from .hf import ConversionError

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConversionError(f"{out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not is_converted(out_dir):
            raise ConversionError(f"{out_dir} exists and is not a converted model (no {CONFIG_NAME}); refusing "
                                  f"to replace it: choose a new or empty directory")
    tmp = temp_dir_beside(out_dir)
    try:
        with _orbax_errors(f"cannot save the converted model to {out_dir}"), ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
            ckptr.wait_until_finished()
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(tmp, name))
        for name, text in (extra_files or {}).items():
            atomic_write_text(os.path.join(tmp, name), text)
        atomic_write_text(os.path.join(tmp, CONFIG_NAME), config_json(cfg, origin))  # last: marks it complete
        replace_dir(tmp, out_dir)
    except OSError as e:
        raise ConversionError(f"cannot save the converted model to {out_dir}: {e.strerror or e} (an existing "
                              f"model there is unchanged)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _orbax_errors(what: str):
    """Orbax's failures as one ConversionError naming ``what``; its worker threads' own
    tracebacks (logged through absl) are kept quiet unless JAXINTERP_DEBUG is set."""
    from .hf import ConversionError

    logger = logging.getLogger("absl")
    level = logger.level
    if not os.environ.get("JAXINTERP_DEBUG"):
        logger.setLevel(logging.CRITICAL)
        _drop_closed_loop_noise()
    try:
        yield
    except ConversionError:
        raise
    except Exception as e:  # orbax and tensorstore raise ValueError, FileNotFoundError, RuntimeError, ...
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if len(first) > 300:
            first = first[:300] + "..."
        raise ConversionError(f"{what}: {type(e).__name__}: {first}") from e
    finally:
        logger.setLevel(level)


def _drop_closed_loop_noise() -> None:
    """After orbax fails, tensorstore's callbacks still try to reach orbax's closed asyncio
    loop from other threads; each prints 'RuntimeError: Event loop is closed' through
    ``sys.unraisablehook``, sometimes after the error was reported. Drop exactly those
    (installed once; every other unraisable exception goes to the previous hook)."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxinterp", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxinterp = True
    sys.unraisablehook = hook


def load_converted(path: str) -> tuple[ModelConfig, dict, Origin | None]:
    """Restore ``(ModelConfig, params, Origin or None)`` saved by :func:`save_converted`
    (numpy leaves). A damaged directory raises ConversionError naming it."""
    import orbax.checkpoint as ocp

    from .hf import ConversionError

    path = os.path.abspath(path)
    if not is_converted(path):
        raise FileNotFoundError(f"{path}: not a converted jaxinterp model (no {CONFIG_NAME})")
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        cfg, origin = read_config(read_json(config_path))
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ConversionError(f"{config_path}: not a jaxinterp model config ({type(e).__name__}: {e})") from None
    with _orbax_errors(f"{path}: the converted parameters (params/) cannot be read; convert the model again"), \
            ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, "params"))
    import jax

    from .hf import check_layout

    params = jax.tree.map(np.asarray, params)
    check_layout(params, cfg, f"{path}: the converted parameters (convert the model again)")
    return cfg, params, origin
