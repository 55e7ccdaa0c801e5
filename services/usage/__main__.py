"""Entrypoint: `tokenmesh-usage` / `python -m services.usage`."""

from services.core.entrypoint import main as serve
from services.core.settings import RedisSettings
from services.usage.service import UsageService


def main() -> None:
    """Runs the usage service configured from the environment."""
    serve("usage", RedisSettings, UsageService)


if __name__ == "__main__":
    main()
