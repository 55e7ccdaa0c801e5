"""Entrypoint: `tokenmesh-jobs` / `python -m services.jobs`."""

from services.core.entrypoint import main as serve
from services.jobs.service import JobsService, JobsSettings


def main() -> None:
    """Runs the jobs service configured from the environment."""
    serve("jobs", JobsSettings, JobsService)


if __name__ == "__main__":
    main()
