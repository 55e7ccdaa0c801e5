"""Entrypoint: `tokenmesh-router` / `python -m services.router`."""

from services.core.entrypoint import main as serve
from services.core.settings import RedisSettings
from services.router.service import RouterService


def main() -> None:
    """Runs the router service configured from the environment."""
    serve("router", RedisSettings, RouterService)


if __name__ == "__main__":
    main()
