"""Watches what this process does to files, through one Python audit hook (PEP 578).

An audit hook sees every open(), os.chmod(), os.rename() ... of the process,
its worker threads included, before the call runs. Hooks cannot be removed,
so one dispatcher is installed once and tests subscribe and unsubscribe.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Hook = Callable[[str, tuple[Any, ...]], None]
_HOOKS: list[Hook] = []
_busy = threading.local()


def _dispatch(event: str, args: tuple[Any, ...]) -> None:
    if not _HOOKS or getattr(_busy, "on", False):
        return
    _busy.on = True  # a hook's own file calls raise events too
    try:
        for hook in list(_HOOKS):
            hook(event, args)
    finally:
        _busy.on = False


sys.addaudithook(_dispatch)


@contextlib.contextmanager
def subscribed(hook: Hook) -> Iterator[None]:
    """Calls `hook(event, args)` for every audit event while the block runs."""
    _HOOKS.append(hook)
    try:
        yield
    finally:
        _HOOKS.remove(hook)


def _paths(args: tuple[Any, ...]) -> Iterator[str]:
    for arg in args:
        if isinstance(arg, (str, os.PathLike)):
            yield os.fsdecode(arg)
        elif isinstance(arg, bytes):
            yield os.fsdecode(arg)


@contextlib.contextmanager
def opened_under(directory: Path) -> Iterator[list[str]]:
    """Yields the list of paths under `directory` this process opens in the block."""
    root = str(directory.resolve())
    seen: list[str] = []

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            seen.extend(p for p in _paths(args[:1]) if p.startswith(root))

    with subscribed(hook):
        yield seen


@contextlib.contextmanager
def modes_under(directory: Path) -> Iterator[dict[str, set[int]]]:
    """Yields {file name: every permission mode it had} for files in `directory`.

    The directory is looked at before every file-system call this process makes
    on a path inside it (open, chmod, rename, link, unlink ...), so a file that
    exists with a wider mode for only an instant is still seen.
    """
    root = directory.resolve()
    seen: dict[str, set[int]] = {}

    def look() -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(root):
                if entry.is_file(follow_symlinks=False):
                    mode = entry.stat(follow_symlinks=False).st_mode & 0o777
                    seen.setdefault(entry.name, set()).add(mode)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if any(p.startswith(str(root)) for p in _paths(args)):
            look()

    with subscribed(hook):
        yield seen
        look()
