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

Traced programs are kept too (``<cache>/exported``): a warm process still traces and lowers
a jitted function before it can look up the compiled program, and for an attribution
program that costs as much as running it (GPT-2-small EAP, 32 pairs: ~44 s of tracing and
~7 s of lowering in a 184 s warm run at load 8). A function jitted with
``jaxinterp.compiler.jit(persist=True)`` is exported once (``jax.export``, StableHLO) and
later processes call the deserialised program (:func:`exported_program`). Keys: the
function, its static arguments, its arguments' shapes and dtypes, jax's and jaxlib's
versions and a hash of jaxinterp's own source, so a changed program is traced again.
Beside it the compiled executable (``<cache>/executables``, :func:`compiled_program`), so
that a warm process does not even lower the exported program to find it in jax's cache.

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


def _source_hash() -> str:
    """sha256 of every ``.py`` file of the package and of jax's and jaxlib's versions: an
    exported program is valid only for the code that traced it."""
    global _source
    if _source is None:
        import hashlib

        import jax
        import jaxlib

        h = hashlib.sha256(f"{jax.__version__} {jaxlib.__version__}".encode())
        root = os.path.dirname(os.path.abspath(__file__))
        for name in sorted(os.listdir(root)):
            if name.endswith(".py"):
                with open(os.path.join(root, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        _source = h.hexdigest()
    return _source


_source: Optional[str] = None
_programs: dict = {}  # key -> Exported, this process's (each batch of a run calls again)
_keys: dict = {}  # id(Exported) -> its key (the kept Exported objects stay alive in _programs)


def exported_program(fun, static: dict, args: tuple, kwargs: dict):
    """The :class:`jax.export.Exported` of ``fun(*args, **static, **kwargs)`` from the
    exported-program cache (module docstring), exported and written there on a miss; None
    when jaxinterp's cache is off in this process, or the call cannot be kept (arguments
    that are not arrays, static arguments without a stable text form, more than one
    device, a program :mod:`jax.export` refuses): the caller then runs plain ``jax.jit``."""
    import hashlib

    import jax
    import numpy as np

    if _enabled is None or jax.config.jax_compilation_cache_dir != _enabled or jax.device_count() != 1:
        return None
    leaves, tree = jax.tree.flatten((args, kwargs))
    if not all(isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer) for x in leaves):
        return None
    static_text = repr(sorted(static.items()))
    if " at 0x" in static_text:  # an object without a value-based repr: no stable key
        return None
    avals = [(tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves]
    key = hashlib.sha256(repr((fun.__module__, fun.__qualname__, static_text, str(tree), avals,
                               _source_hash())).encode()).hexdigest()
    if key in _programs:
        return _programs[key]
    path = os.path.join(_enabled, "exported", f"{fun.__name__}-{key}.bin")
    try:
        with open(path, "rb") as f:
            _programs[key] = jax.export.deserialize(bytearray(f.read()))
        _keys[id(_programs[key])] = key
        return _programs[key]
    except Exception:  # noqa: BLE001  missing, or damaged (flatbuffers raises struct.error): exported again, rewritten
        pass
    import functools

    from .compiler import jit

    try:
        exported = jax.export.export(jit(functools.partial(fun, **static)).wrapped())(*args, **kwargs)
    except Exception:  # noqa: BLE001  (e.g. a custom call export does not allow: run it unexported)
        return None
    from .io import atomic_write_bytes

    try:
        data = bytes(exported.serialize())
    except ImportError:  # jax's serialisation needs flatbuffers (a dependency; a broken install runs unexported)
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError:
        pass  # a cache is an optimisation
    _programs[key], _keys[id(exported)] = exported, key
    return exported


def compiled_program(exported, args: tuple, kwargs: dict):
    """``exported.call`` compiled for ``(*args, **kwargs)``: the executable kept beside the
    exported program (``<cache>/executables``), loaded without tracing, lowering or looking
    it up in jax's cache, else compiled by XLA (jax's cache bypassed, see below) and kept;
    None for a program :func:`exported_program` did not give, or a jax without
    ``serialize_executable`` (the caller then jits ``exported.call``).

    A warm process still spent ~0.27 s lowering the exported call before jax's cache could
    find the executable, 0.16 s of it jax's LAPACK set-up for exported CPU programs (GPT-2-
    small EAP, a 4 s whole process). Keys: the exported program's (its function, static
    arguments, shapes, jax's versions, jaxinterp's source, which holds the compiler options)
    and the device's platform, version and kind. The executable is jax's
    ``serialize_executable`` form (pickle), trusted as jax's own cache is: a cache
    directory must not be writable by others."""
    import hashlib

    import jax

    key = _keys.get(id(exported))
    if key is None:
        return None
    device = jax.devices()[0]
    key = hashlib.sha256(repr((key, device.platform, device.client.platform_version, device.device_kind)).encode())
    path = os.path.join(_enabled, "executables", f"{exported.fun_name}-{key.hexdigest()}.bin")
    try:
        from jax.experimental import serialize_executable
    except ImportError:
        return None
    in_tree = jax.tree.structure((args, kwargs))
    try:
        with open(path, "rb") as f:
            return serialize_executable.deserialize_and_load(f.read(), in_tree, exported.out_tree)
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001  damaged: removed, compiled again and kept
        try:
            os.remove(path)
        except OSError:
            pass
    from .compiler import jit
    from .io import atomic_write_bytes

    # Compiled by XLA here, with jax's persistent cache out of the way: an executable jax read
    # from its cache serialises without its compiled functions on XLA:CPU, and one loaded from
    # such a file fails when run ("Function ... not found"). So a process that finds no file
    # pays one compile even where jax's cache holds the program (after an update of jaxinterp
    # that left the program as it was, every later run used to lower it again, 0.27 s).
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        compiled = jit(exported.call).lower(*args, **kwargs).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
    try:
        data, tree, _ = serialize_executable.serialize(compiled)
        if tree == in_tree:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_bytes(path, data)
    except Exception:  # noqa: BLE001  a cache is an optimisation: the program runs compiled anyway
        pass
    # kept or not (a backend that cannot serialise it, an unwritable directory), this process
    # runs what it compiled (compiling again through jax's cache would only repeat the work:
    # a later process compiles with that cache off anyway)
    return compiled


__all__ = ["ENV", "default_dir", "configured_dir", "enable_compile_cache", "disable_compile_cache", "exported_program",
           "compiled_program"]
