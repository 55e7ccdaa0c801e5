"""Secret files (server secret, dev admin key): created 0600, complete or absent.
Other files that must be complete or absent use `replace_file`.

A secret file is first written under a temporary name that is created with
its final mode (os.open with O_CREAT | O_EXCL and 0o600, which a umask can
only narrow), flushed to disk, and then moved into place in one step. So
the secret is never readable by others, not even for an instant, and a
reader never sees a half-written file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

MODE = 0o600


def _write_temporary(path: Path, data: bytes, mode: int = MODE, dir_mode: int = 0o700) -> Path:
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    # A name no other writer (process or thread) uses; O_EXCL refuses a planted one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace_secret(path: Path, data: bytes) -> None:
    """Writes `data` to `path` (replacing any old file), created 0600.

    Args:
        path: the secret file; its directory is created 0700 when missing.
        data: the whole content.
    """
    os.replace(_write_temporary(path, data), path)


def replace_file(path: Path, data: bytes) -> None:
    """Writes `data` to `path` whole or not at all, as `replace_secret` does, for a file
    that is no secret (a TensorRT plan, a usage spool's id): created 0644 (the umask
    may narrow it), its directory created as any other."""
    os.replace(_write_temporary(path, data, mode=0o644, dir_mode=0o777), path)


def create_secret(path: Path, data: bytes) -> bool:
    """Writes `data` to `path` unless the file exists; created 0600.

    Two processes creating the same file at once agree on one content: the
    first to link its temporary file wins, the other keeps the winner's.

    Returns:
        True when this call created the file, False when it already existed.
    """
    if path.exists():
        return False
    tmp = _write_temporary(path, data)
    try:
        os.link(tmp, path)  # atomic, and never replaces an existing file
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True
