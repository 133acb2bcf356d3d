"""Start-up checks remembered across runs: that a manifest's image files exist, and its shortcut audit table.

Each costs a pass over every file of the manifest (a stat; a header read), seconds to minutes for a million rows,
and a rerun or a resume of the same manifest would repeat it for the same answer. So an answer is kept in
``$STAGE2_CACHE/checks/`` (default ``~/.cache/stage2``), one small JSON file per check and manifest content (the
SHA-256 of the rows' resolved paths, and of their labels for the audit), with the size, modification time and
inode of a sample of the files: up to ``SAMPLE`` rows spread evenly over the manifest. A later run takes the answer
only when the manifest holds the same rows and every sampled file is still there, as it was.

A manifest of up to ``SAMPLE`` rows is thus checked whole; a larger one by its sample, which sees a set re-encoded,
moved or deleted, but may miss one file changed or deleted among a million: the loader names that file when it
reads it (an ImageDecodeError, or with --skip-bad-images a line of bad_images.txt). Delete the folder to check
everything again. An answer that cannot be kept (a read-only home) is computed again next time; an unreadable or
outdated file is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stage2.atomic import write_text_atomic
from stage2.errors import first_line

log = logging.getLogger(__name__)

SAMPLE = 1000  # files stat'ed to trust a remembered answer: milliseconds, where the check took a pass over all
VERSION = 1


def user_cache_dir() -> Path:
    """The user's stage2 cache folder, for what is remembered across runs: $STAGE2_CACHE, else
    $XDG_CACHE_HOME/stage2, else ~/.cache/stage2."""
    if os.environ.get("STAGE2_CACHE"):
        return Path(os.environ["STAGE2_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stage2"


def checks_folder() -> Path:
    """Where answers are kept: the user's stage2 cache folder's checks/."""
    return user_cache_dir() / "checks"


def content_key(paths: Sequence[str], labels: np.ndarray | None = None) -> str:
    """The SHA-256 of a manifest's rows: their paths in order, and their labels when given."""
    digest = hashlib.sha256("\0".join(paths).encode("utf-8", "surrogateescape"))
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _sample(paths: Sequence[str]) -> list[list[int] | None]:
    """[size, mtime_ns, inode] of the sampled files (None for one that is gone)."""
    rows = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), SAMPLE)).round().astype(np.int64))
    found: list[list[int] | None] = []
    for row in rows:
        try:
            stat = os.stat(paths[row])
        except OSError:
            found.append(None)
        else:
            found.append([stat.st_size, stat.st_mtime_ns, stat.st_ino])
    return found


def _entry(check: str, key: str) -> Path:
    return checks_folder() / f"{check}-{key}.json"


def recall(check: str, key: str, paths: Sequence[str]) -> Any:
    """The answer `check` gave for the manifest of content `key` (its rows' `paths`), if its sampled files are
    unchanged since; else None."""
    try:
        entry = json.loads(_entry(check, key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("version") != VERSION or entry.get("rows") != len(paths):
        return None
    return entry.get("answer") if entry.get("sample") == _sample(paths) else None


def remember(check: str, key: str, paths: Sequence[str], answer: Any) -> None:
    """Keep `answer` (JSON-able) for the manifest of content `key`, with its files' sample as they are now."""
    entry = {"version": VERSION, "check": check, "rows": len(paths), "sample": _sample(paths), "answer": answer}
    try:
        write_text_atomic(_entry(check, key), json.dumps(entry))  # compact: its sample is 1000 rows
    except OSError as err:
        log.info("%s check not kept for the next run: %s", check, first_line(err))
