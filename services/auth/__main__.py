"""Entrypoint: `tokenmesh-auth` / `python -m services.auth`."""

from services.auth.service import AuthService, AuthSettings
from services.core.entrypoint import main as serve


def main() -> None:
    """Runs the auth service configured from the environment."""
    serve("auth", AuthSettings, AuthService)


if __name__ == "__main__":
    main()
