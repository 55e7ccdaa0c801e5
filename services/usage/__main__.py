"""Entrypoint: `tokenmesh-usage` / `python -m services.usage`."""

from services.core.entrypoint import main as serve
from services.usage.service import UsageService, UsageSettings


def main() -> None:
    """Runs the usage service configured from the environment."""
    serve("usage", UsageSettings, UsageService)


if __name__ == "__main__":
    main()
