"""The common `main()` of every service: settings, logging, serve."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from services.core import logs, server
from services.core.settings import ServerSettings, SettingsError, StartupError, load

S = TypeVar("S", bound=ServerSettings)
logger = logging.getLogger(__name__)


def main(name: str, settings_cls: type[S], build: Callable[[S], server.Service]) -> None:
    """Loads `settings_cls` from the environment and serves `build(settings)`."""
    try:
        settings = load(settings_cls, os.environ)
    except SettingsError as exc:
        print(f"tokenmesh-{name}: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_level, settings.log_format, name)
    try:
        service = build(settings)
        server.run(lambda: server.serve_until_signalled(service, settings))
    except StartupError as exc:
        # Known at start only (another process holds the spool): one line, no traceback.
        print(f"tokenmesh-{name}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
