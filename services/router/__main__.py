"""Entrypoint: `tokenmesh-router` / `python -m services.router`."""

from services.core.entrypoint import main as serve
from services.router.service import RouterService, RouterSettings


def main() -> None:
    """Runs the router service configured from the environment."""
    serve("router", RouterSettings, RouterService)


if __name__ == "__main__":
    main()
