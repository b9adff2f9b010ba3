"""jaxinterp's persistent compilation cache: compiled XLA programs kept on disk, so that a
second process running the same command on the same model does not compile again.

Compiling dominates small jobs (tens of seconds for a model whose batches then run in a
few), so the command line and :func:`jaxinterp.load_model` turn jax's persistent
compilation cache on, once, in a user cache directory:

* ``$JAXINTERP_COMPILE_CACHE`` if it names a directory; ``0`` / ``off`` / ``false`` /
  ``no`` turns the cache off (``1`` / ``on`` / ``true``: the default directory);
* else ``$XDG_CACHE_HOME/jaxinterp/xla`` (default ``~/.cache/jaxinterp/xla``).

The command line's ``--compile-cache DIR`` and ``--no-compile-cache`` override the
variable. Nothing happens at import time. Because jax's cache is process-wide, enabling it
also caches the *caller's own* jitted functions compiled afterwards in that process; a
program that already chose a cache (``jax_compilation_cache_dir`` set, by
``jax.config.update`` or ``JAX_COMPILATION_CACHE_DIR``) keeps its own, and
``JAXINTERP_COMPILE_CACHE=0`` leaves jax's settings untouched.

Every program is written, however quick its compilation (``min_compile_time_secs = 0``,
``min_entry_size_bytes = -1``): jaxinterp's per-batch programs are few and large, and the
thresholds' defaults (1 s) would skip the small ones a short job compiles.
Entries are keyed by the program, the devices and jax/XLA's versions; stale ones are
never read. Delete the directory to reclaim its space.
"""

from __future__ import annotations

import os
from typing import Optional

ENV = "JAXINTERP_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no", "none")
_ON = ("", "1", "on", "true", "yes")

_enabled: Optional[str] = None  # the directory this process enabled, if any


def default_dir() -> str:
    """``$XDG_CACHE_HOME/jaxinterp/xla``, or ``~/.cache/jaxinterp/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxinterp", "xla")


def configured_dir(setting: Optional[str] = None) -> Optional[str]:
    """The cache directory ``setting`` (default: ``$JAXINTERP_COMPILE_CACHE``) asks for:
    None when it turns the cache off, the default directory when unset or on."""
    value = os.environ.get(ENV, "") if setting is None else setting
    value = value.strip()
    if value.lower() in _OFF:
        return None
    if value.lower() in _ON:
        return default_dir()
    return os.path.abspath(os.path.expanduser(value))


def enable_compile_cache(setting: Optional[str] = None) -> Optional[str]:
    """Turn on the persistent compilation cache (module docstring) and return its
    directory, or None when it stays off. Idempotent; never raises: a directory that
    cannot be created leaves the cache off with a warning (a cache is an optimisation).

    setting: a directory, or ``"0"``/``"off"`` (default: ``$JAXINTERP_COMPILE_CACHE``)."""
    global _enabled
    import jax

    path = configured_dir(setting)
    if path is None:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and current != _enabled:
        return current  # the caller chose a cache of their own: keep it
    if current == path:
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        import warnings

        warnings.warn(f"jaxinterp: compilation cache {path} cannot be created ({e.strerror}); compiling without it "
                      f"(set {ENV}=0 to silence this)")
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # jax decides once per process whether the cache is used (at its first compilation);
    # a program that compiled something before this call would otherwise never use it
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    _enabled = path
    return path


def disable_compile_cache() -> None:
    """Turn off a cache :func:`enable_compile_cache` turned on (a cache chosen by the
    caller is left alone)."""
    global _enabled
    import jax

    if _enabled is not None and jax.config.jax_compilation_cache_dir == _enabled:
        jax.config.update("jax_compilation_cache_dir", None)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    _enabled = None


__all__ = ["ENV", "default_dir", "configured_dir", "enable_compile_cache", "disable_compile_cache"]
