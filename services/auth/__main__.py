"""Entrypoint: `tokenmesh-auth` / `python -m services.auth`."""

from services.auth.service import AuthService
from services.core.entrypoint import main as serve
from services.core.settings import RedisSettings


def main() -> None:
    """Runs the auth service configured from the environment."""
    serve("auth", RedisSettings, AuthService)


if __name__ == "__main__":
    main()
