"""Converted models on disk: orbax-checkpoint params + the jaxinterp config + tokenizer.

Layout of a converted directory::

    jaxinterp_config.json    ModelConfig fields
    params/                  orbax checkpoint of the parameter pytree
    tokenizer files          copied from the Hugging Face directory, if any
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from jaxinterp.config import ModelConfig
from jaxinterp.graph import atomic_write_text

CONFIG_NAME = "jaxinterp_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def is_converted(path: str) -> bool:
    return os.path.exists(os.path.join(path, CONFIG_NAME))


def save_converted(out_dir: str, cfg: ModelConfig, params, tokenizer_dir: str | None = None) -> None:
    """Save ``params`` with orbax next to the config (and the tokenizer's files).

    The config is written last, so a directory that :func:`is_converted` accepts is
    complete even if an earlier save was interrupted.
    """
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, CONFIG_NAME)):
        os.unlink(os.path.join(out_dir, CONFIG_NAME))
    params_dir = os.path.join(out_dir, "params")
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params)
        ckptr.wait_until_finished()
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    atomic_write_text(os.path.join(out_dir, CONFIG_NAME), cfg.to_json())


def load_converted(path: str) -> tuple[ModelConfig, dict]:
    """Restore ``(ModelConfig, params)`` saved by :func:`save_converted` (numpy leaves)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not is_converted(path):
        raise FileNotFoundError(f"{path}: not a converted jaxinterp model (no {CONFIG_NAME})")
    with open(os.path.join(path, CONFIG_NAME)) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, "params"))
    import jax

    return cfg, jax.tree.map(np.asarray, params)
