"""Converted models on disk: orbax-checkpoint params + the jaxinterp config + tokenizer.

Layout of a converted directory::

    jaxinterp_config.json    ModelConfig fields
    params/                  orbax checkpoint of the parameter pytree
    tokenizer files          copied from the Hugging Face directory, if any
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys

import numpy as np

from jaxinterp.config import ModelConfig
from jaxinterp.io import atomic_write_text, read_json, replace_dir, temp_dir_beside

CONFIG_NAME = "jaxinterp_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def is_converted(path: str) -> bool:
    return os.path.exists(os.path.join(path, CONFIG_NAME))


def save_converted(out_dir: str, cfg: ModelConfig, params, tokenizer_dir: str | None = None,
                   extra_files: dict | None = None) -> None:
    """Save ``params`` with orbax next to the config (and the tokenizer's files, and
    ``extra_files``: name -> text, e.g. the record of an edit, written in the same swap).

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
        atomic_write_text(os.path.join(tmp, CONFIG_NAME), cfg.to_json())  # last: marks the directory complete
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


def load_converted(path: str) -> tuple[ModelConfig, dict]:
    """Restore ``(ModelConfig, params)`` saved by :func:`save_converted` (numpy leaves).
    A damaged directory raises ConversionError naming it."""
    import orbax.checkpoint as ocp

    from .hf import ConversionError

    path = os.path.abspath(path)
    if not is_converted(path):
        raise FileNotFoundError(f"{path}: not a converted jaxinterp model (no {CONFIG_NAME})")
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        cfg = ModelConfig.from_dict(read_json(config_path))
    except (TypeError, KeyError, AttributeError) as e:
        raise ConversionError(f"{config_path}: not a jaxinterp model config ({type(e).__name__}: {e})") from None
    with _orbax_errors(f"{path}: the converted parameters (params/) cannot be read; convert the model again"), \
            ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, "params"))
    import jax

    from .hf import check_layout

    params = jax.tree.map(np.asarray, params)
    check_layout(params, cfg, f"{path}: the converted parameters (convert the model again)")
    return cfg, params
