"""The common `main()` of every service: settings, logging, serve."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from services.core import logs, server, tasks
from services.core.settings import ServerSettings, SettingsError, StartupError, load

S = TypeVar("S", bound=ServerSettings)
logger = logging.getLogger(__name__)


def main(name: str, settings_cls: type[S], build: Callable[[S], server.Service]) -> None:
    """Loads `settings_cls` from the environment and serves `build(settings)`."""
    try:
        settings = load(settings_cls, os.environ)
    except SettingsError as exc:
        _invalid_configuration(name, exc)
    logs.configure(settings.log_level, settings.log_format, name)
    try:
        service = _build(name, build, settings)
        server.run(lambda: server.serve_until_signalled(service, settings))
        # A stop during a model's build left its thread running: exit without it.
        tasks.exit_past_abandoned_threads(0)
    except StartupError as exc:
        # Known at start only (another process holds the spool): one line, no traceback.
        print(f"tokenmesh-{name}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _build(name: str, build: Callable[[S], server.Service], settings: S) -> server.Service:
    """Returns `build(settings)`; a setting the service loads on its own there (the
    worker's TOKENMESH_CACHE*) ends it as `main` does, not with a traceback and exit 1."""
    try:
        return build(settings)
    except SettingsError as exc:
        _invalid_configuration(name, exc)


def _invalid_configuration(name: str, exc: SettingsError) -> NoReturn:
    print(f"tokenmesh-{name}: invalid configuration: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
