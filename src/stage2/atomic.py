"""Atomic file writes: a crash mid-write leaves the previous file intact, never half of a new one."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600 (mkdtemp folders 0700); a finished file or folder gets the mode open() or mkdir()
# would have given it.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = True) -> None:
    """Call `write(file)` on a temporary file in the same folder, flush it to disk, then rename it over
    `path` (atomic on POSIX filesystems).

    A full disk or a folder we may not write to raises OSError naming `path` (the previous file, if any, is
    untouched and the temporary one removed).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError as one naming `path`, the file or folder the user asked for, not a temporary one."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def staging_dir(target: str | Path, kind: str = "partial") -> Path:
    """A new hidden folder beside `target` to build it in (then rename it over `target`, or move its files).

    The name records this host and process, so that what a build killed with -9 left behind is recognised and
    removed here, by the next build of the same target; a live build's folder is left alone.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{kind}-"
    host = socket.gethostname()
    for old in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid, _, rest = old.name[len(prefix):].partition("-")
        if pid.isdigit() and rest.rsplit("-", 1)[0] == host and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-{host}-", dir=target.parent))


def remove_killed_writes(folder: Path) -> None:
    """Remove the temporary files that `atomic_write`s killed mid-way (kill -9, a power cut) left in `folder`.

    Only for a folder no other process writes to at the same time (a run folder, under its lock): a live write's
    temporary file looks the same.
    """
    for tmp in Path(folder).glob(".*.????????.tmp"):  # atomic_write's mkstemp names: .NAME.XXXXXXXX.tmp
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN and +-inf become None (JSON has no literal for them)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically; NaN/inf are written as null."""
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
