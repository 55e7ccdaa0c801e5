"""The fault suite: kill -9 and restart each part of the mesh under load, with figures.

`make chaos` (`python -m bench.chaos`) runs every fault in `FAULTS` one at a
time against one supervised local mesh and prints the table that
docs/reliability.md shows; `tests/e2e/test_chaos.py` runs a bounded subset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.chaos.faults import FAULTS, Fault, Row, run_fault
from bench.chaos.ledger import create_key
from bench.chaos.load import Clients
from services.launcher.mesh import Mesh, MeshConfig
from services.launcher.processes import pid_alive
from tests.conftest import TEST_SERVICE_ENV

logger = logging.getLogger(__name__)

# The tests' fast settings (a 20 ms-per-step test model for streams), plus the
# embedding model; a crashed usage service's unacknowledged events are claimed
# after 2 s instead of 30.
CHAOS_SERVICE_ENV = {
    **TEST_SERVICE_ENV,
    "TOKENMESH_MODELS": "all-minilm-l6-v2:1",
    "TOKENMESH_USAGE_CLAIM_IDLE_SECONDS": "2",
    # A killed worker's token reservations are given back 3-4 s after it died.
    "TOKENMESH_RESERVATION_TTL_SECONDS": "3",
}


def mesh_config(state_dir: Path) -> MeshConfig:
    """Returns the mesh the suite runs against: two workers, bundled Redis servers."""
    return MeshConfig(
        state_dir=state_dir,
        workers=2,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        service_env=CHAOS_SERVICE_ENV,
    )


@contextmanager
def supervised_mesh(state_dir: Path) -> Iterator[Mesh]:
    """Starts a supervised mesh and checks, once it is stopped, that no process is left."""
    seen: set[int] = set()
    with Mesh(mesh_config(state_dir)) as mesh:
        mesh.supervise()
        try:
            yield mesh
        finally:
            seen |= {c.pid for c in mesh.children}
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sorted(p for p in seen if pid_alive(p))
    if left:
        raise RuntimeError(f"processes left behind after the mesh stopped: {left}")


def run(mesh: Mesh, faults: Sequence[Fault] = FAULTS) -> list[Row]:
    """Runs `faults` one at a time against `mesh` (supervised); returns a row each."""
    admin_key = mesh.dev_api_key()
    rows = []
    for fault in faults:
        tenant = f"chaos-{fault.id}-{int(time.time())}"
        key_id, secret = create_key(mesh.edge_url, admin_key, tenant)
        clients = Clients(mesh.edge_address, mesh.edge_url, secret)
        try:
            logger.info("fault %s: %s", fault.id, fault.title)
            rows.append(run_fault(mesh, fault, clients, tenant, admin_key, key_id))
        finally:
            clients.close()
    return rows


def select(ids: Sequence[str]) -> list[Fault]:
    """Returns the faults with these ids, in the suite's order (all when `ids` is empty)."""
    unknown = set(ids) - {f.id for f in FAULTS}
    if unknown:
        raise ValueError(f"unknown faults: {', '.join(sorted(unknown))}")
    return [f for f in FAULTS if not ids or f.id in ids]
