"""`make chaos`: every fault under load against one supervised mesh; prints the table.

With --write, the table replaces the one in docs/reliability.md and README.md.
Exits 1 when a fault lost or duplicated usage, cut a stream it should not
have, never recovered, or left a process behind.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
from pathlib import Path

from bench.chaos import run, select, supervised_mesh
from bench.chaos.report import table, write_table
from services.launcher.mesh import REPO_ROOT


def main() -> None:
    """Parses the options, runs the suite, prints and writes the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--faults", default="", help="comma-separated fault ids (default: all)")
    parser.add_argument("--write", action="store_true", help="update docs/reliability.md, README")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    faults = select([f for f in args.faults.split(",") if f])
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tokenmesh-chaos-") as state:
        with supervised_mesh(Path(state)) as mesh:
            rows = run(mesh, faults)
    markdown = table(rows)
    took = time.monotonic() - started
    footer = (
        f"Measured {datetime.date.today().isoformat()} by `make chaos` on this machine "
        f"({len(rows)} faults, {took:.0f} s including the mesh's start and stop)."
    )
    print(f"\n{markdown}\n\n{footer}")
    if args.write:
        for path in (REPO_ROOT / "docs" / "reliability.md", REPO_ROOT / "README.md"):
            write_table(path, markdown, footer)
    sys.exit(0 if all(row.clean for row in rows) else 1)


if __name__ == "__main__":
    main()
