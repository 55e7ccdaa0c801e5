"""Entrypoint: `tokenmesh-inference` / `python -m services.inference`."""

from services.core.entrypoint import main as serve
from services.inference.service import InferenceService, InferenceSettings


def main() -> None:
    """Runs an inference worker configured from the environment."""
    serve("inference", InferenceSettings, InferenceService)


if __name__ == "__main__":
    main()
