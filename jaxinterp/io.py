"""Files: written whole or not at all, read with messages that name them.

Every output goes through :func:`atomic_write_bytes` (or :func:`atomic_write_text`,
:func:`atomic_write_with`, :func:`save_figure`): the data goes to a temporary file in
the target's directory, which is fsynced and renamed over the target, so a reader, a
kill or a full disk never leaves a partial or emptied file; the old file stays until
the new one is complete. Files get the permissions the user's umask gives (not the
0600 of a bare temporary file). A kill leaves at most a ``.tmp-*`` file.

Directories (a converted model) are built beside the target and swapped in with
:func:`replace_dir`: the old one is removed only after the new one is in place.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Optional

from .errors import JaxinterpError

TMP_PREFIX = ".tmp-"


def umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief window; single-threaded callers)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _write_error(path: str, e: OSError) -> JaxinterpError:
    return JaxinterpError(f"cannot write {path}: {e.strerror or e} (an existing file there is unchanged)")


def atomic_write_with(path: str, write: Callable[[str], Any]) -> str:
    """Have ``write(tmp_path)`` write the file, then move it to ``path`` atomically
    (permissions from the umask, fsynced). The directory must exist. On any failure the
    temporary file is removed and an existing ``path`` is left as it was; an ``OSError``
    becomes a :class:`JaxinterpError` naming ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write_with(path, write)


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def figure_format(path: str) -> str:
    """The picture format ``path`` names: its extension, lower-case; PNG when none."""
    return os.path.splitext(path)[1].lstrip(".").lower() or "png"


def save_figure(fig, path: str, **kwargs) -> str:
    """``fig.savefig(path)`` atomically, in :func:`figure_format`'s format."""
    return atomic_write_with(path, lambda tmp: fig.savefig(tmp, format=figure_format(path), **kwargs))


def write_figure(fig, path: str, **kwargs) -> str:
    """Save a finished matplotlib figure to ``path`` (its directory made if needed) with
    :func:`save_figure`, so a failed write leaves an older picture whole, and close it
    whatever happens (pyplot keeps every open figure alive). Returns ``path``."""
    import matplotlib.pyplot as plt

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_figure(fig, path, **kwargs)
    finally:
        plt.close(fig)
    return path


def clean_tmp(directory: str) -> list[str]:
    """Remove the temporary files (and directories) that killed writers left in ``directory``."""
    removed = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith(TMP_PREFIX):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
            removed.append(name)
    return removed


# --- directories --------------------------------------------------------------------------

def temp_dir_beside(target: str) -> str:
    """A new empty directory next to ``target`` (same file system, so it can be swapped in)."""
    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.path.basename(target)}-")
    except OSError as e:
        raise _write_error(target, e) from e


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # e.g. EINVAL on a file system without it: fall back


def replace_dir(new: str, target: str) -> None:
    """Put the complete directory ``new`` at ``target``; an existing ``target`` is removed
    only after the new one is in place (atomic exchange where the OS has it, else two
    renames with the old directory kept aside under a ``.tmp-`` name until the second one
    is done). ``new`` gets the umask's permissions."""
    os.chmod(new, 0o777 & ~umask())
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # holds the old directory now
    else:
        old = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}old-{os.path.basename(target)}-")
        os.rmdir(old)
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)  # put the old one back
            raise
        shutil.rmtree(old)
    _fsync_dir(parent)


# --- reading ------------------------------------------------------------------------------

def _read_error(path: str, e: BaseException) -> JaxinterpError:
    if isinstance(e, FileNotFoundError):
        return JaxinterpError(f"{path} does not exist")
    if isinstance(e, IsADirectoryError):
        return JaxinterpError(f"{path} is a directory, not a file")
    if isinstance(e, UnicodeDecodeError):
        return JaxinterpError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})")
    if isinstance(e, OSError):
        return JaxinterpError(f"cannot read {path}: {e.strerror or e}")
    return JaxinterpError(f"{path}: {e}")


def read_text(path: str) -> str:
    """The file's text (UTF-8; a byte-order mark is skipped); errors name the file."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise _read_error(path, e) from None


def open_text(path: str, **kwargs):
    """``open(path)`` for reading UTF-8 text (BOM skipped), with errors that name the file.
    Decoding errors surface while reading; catch ``UnicodeDecodeError`` there."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        return open(path, encoding="utf-8-sig", **kwargs)
    except OSError as e:
        raise _read_error(path, e) from None


def read_json(path: str) -> Any:
    """Parsed JSON of the file (NaN/Infinity tokens accepted); errors name the file and line."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JaxinterpError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; a "
                             f"truncated or hand-edited file?)") from None


def to_strict_json(x: Any) -> Any:
    """NaN and infinities as null, so that ``json.dumps(..., allow_nan=False)`` works."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, dict):
        return {k: to_strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_strict_json(v) for v in x]
    return x


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text (NaN/inf written as null)."""
    return json.dumps(to_strict_json(obj), allow_nan=False, **kwargs)


# --- content fingerprints -----------------------------------------------------------------

def file_hash(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str, skip: Iterable[str] = ()) -> dict:
    """What a file's or directory's content is: for each file (recursively, following
    links; names starting with ``.`` and those in ``skip`` left out) its size, mtime and
    SHA-256, and one ``digest`` over all of them. Two fingerprints with equal ``digest``
    describe the same bytes."""
    path = os.path.abspath(path)
    skip = set(skip)
    files = {}
    if os.path.isfile(path):
        entries = [(os.path.basename(path), path)]
    else:
        entries = []
        for root, dirs, names in os.walk(path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if name.startswith(".") or name in skip:
                    continue
                full = os.path.join(root, name)
                entries.append((os.path.relpath(full, path), full))
    for rel, full in entries:
        st = os.stat(full)
        files[rel] = {"size": st.st_size, "mtime": st.st_mtime, "sha256": file_hash(full)}
    digest = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode())
    return {"digest": digest.hexdigest(), "files": files}


# --- paths --------------------------------------------------------------------------------

def same_path(a: str, b: str) -> bool:
    """``a`` and ``b`` name the same file or directory (links and ``..`` resolved)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def is_inside(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or lies under it."""
    p, d = os.path.realpath(path), os.path.realpath(directory)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def check_input_file(path: Optional[str], option: str) -> None:
    """``path`` (given as ``option``) exists, is a file and is readable; None passes."""
    if path is None:
        return
    if not os.path.exists(path):
        raise JaxinterpError(f"{option} {path} does not exist")
    if os.path.isdir(path):
        raise JaxinterpError(f"{option} {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise JaxinterpError(f"{option} {path} is not readable")


def check_writable_file(path: str, option: str, inputs: Iterable[tuple[str, Optional[str]]] = ()) -> None:
    """Refuse, before any work, an output file that cannot be written or would replace an
    input: its directory must exist and be writable, it must not be a directory, and it
    must not be any of ``inputs`` (``(option, path)`` pairs; directories among them may
    not contain it as an existing file either)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise JaxinterpError(f"{option} {path} is a directory; give a file name")
    if not os.path.isdir(parent):
        why = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise JaxinterpError(f"{option} {path}: its directory {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JaxinterpError(f"{option} {path}: directory {parent} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise JaxinterpError(f"{option} {path} exists and is read-only")
    for in_option, in_path in inputs:
        if not in_path or not os.path.exists(in_path):
            continue
        if same_path(path, in_path):
            raise JaxinterpError(f"{option} {path} is the {in_option} input; writing it would destroy the input")
        if os.path.isdir(in_path) and os.path.exists(path) and is_inside(path, in_path):
            raise JaxinterpError(f"{option} {path} would overwrite a file of the {in_option} directory {in_path}")


def check_figure_file(path: str, option: str) -> None:
    """Refuse, before any work, a picture name whose :func:`figure_format` matplotlib cannot
    write (what :func:`save_figure` would fail on after the work)."""
    from matplotlib.backend_bases import FigureCanvasBase

    ext = figure_format(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise JaxinterpError(f"{option} {path}: a picture is written there, and .{ext} is no picture format "
                             f"(use one of {', '.join('.' + f for f in sorted(formats))})")


def check_writable_dir(path: str, option: str, inputs: Iterable[tuple[str, Optional[str]]] = (),
                       replaces: bool = False) -> None:
    """Refuse, before any work, an output directory that cannot be created or written, or
    that is one of the inputs ``inputs`` (``(option, path)`` pairs). ``replaces``: the
    directory is replaced as a whole (``convert``), so no input may lie inside it either."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise JaxinterpError(f"{option} {path} exists and is not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise JaxinterpError(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise JaxinterpError(f"{option} {path}: {existing} is not writable")
    for in_option, in_path in inputs:
        if not in_path or not os.path.exists(in_path):
            continue
        if same_path(path, in_path):
            raise JaxinterpError(f"{option} {path} is the {in_option} input; writing there would destroy it")
        if replaces and is_inside(in_path, path):
            raise JaxinterpError(f"{option} {path} holds the {in_option} input {in_path}; replacing it would "
                                 f"destroy the input")
