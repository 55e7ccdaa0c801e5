"""A graceful stop of the edge's Envoy: the streams it carries finish first.

Envoy exits at once on SIGTERM and closes every downstream connection, so an
edge pod's rollout, scale-in or node drain cut every stream through it
mid-answer. A graceful stop goes through Envoy's admin API first (`drain`):

1. `POST /healthcheck/fail`: `/healthz` answers 503 (the readiness probe, and
   any load balancer that probes it, stop picking this edge).
2. `POST /drain_listeners?graceful`: Envoy asks every client to go at once
   (GOAWAY on HTTP/2, `connection: close` on HTTP/1.1: `--drain-strategy
   immediate`), still answers new connections for `--drain-time-s`
   (`LISTENER_DRAIN_S`: clients that resolved this pod before its endpoints
   changed), then closes its listeners: new connections are refused.
3. It waits until no downstream request is active, for at most `timeout_s`
   (the longest stream: TOKENMESH_EDGE_DRAIN_SECONDS).

`python -m gateway drain` runs these steps: the pod's preStop hook. It also
waits until the listeners close, even with nothing active: Kubernetes takes
the pod out of its Service's endpoints while the hook runs, and clients that
resolved it before are answered meanwhile.

`python -m gateway run` keeps Envoy as its child (`supervise`) and runs them
on SIGTERM or SIGINT, then stops Envoy as soon as nothing is active: a
container stopped without the hook (compose, `docker stop`: its
stop_grace_period covers the drain) drains its streams too, an idle one
stops at once, and after the hook they return at once (the drain has begun,
nothing is active). A second signal cuts the wait short. Envoy runs under
PR_SET_PDEATHSIG: a supervisor killed outright (SIGKILL, outside a
container) takes Envoy with it instead of leaving it on the edge's ports.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import admin
from services.launcher import processes

LOG = logging.getLogger("tokenmesh.edge")

#: Envoy's --drain-time-s: how long draining listeners still take connections.
LISTENER_DRAIN_S = 5.0
POLL_S = 0.25
#: How long Envoy may take to exit after SIGTERM once drained (then SIGKILL).
EXIT_WAIT_S = 10.0


def envoy_args(listener_drain_s: float = LISTENER_DRAIN_S) -> list[str]:
    """Returns Envoy's command-line options for a graceful drain of all connections at once."""
    return ["--drain-time-s", str(round(listener_drain_s)), "--drain-strategy", "immediate"]


def _stats(admin_socket: Path) -> tuple[int, bool] | None:
    """Returns (downstream requests in flight, listeners closed); None: no answer."""
    text = admin.text(
        admin_socket,
        "/stats?filter=(downstream_rq_active|listener_manager.(listener_stopped|workers_started))$",
    )
    if text is None:
        return None
    lines = (line.split(": ", 1) for line in text.splitlines() if ": " in line)
    stats = {name: int(value) for name, value in lines}
    # http.<stat_prefix>.downstream_rq_active: <n>; the admin listener counts this call.
    active = sum(v for k, v in stats.items() if k.startswith("http.") and ".admin." not in k)
    # Stopped once the drain time is over. No worker started: still initializing
    # (waiting for the first xDS answer), no listener takes connections to close.
    closed = (
        stats.get("listener_manager.listener_stopped", 0) > 0
        or stats.get("listener_manager.workers_started", 0) == 0
    )
    return active, closed


def in_flight(admin_socket: Path) -> int | None:
    """Returns the requests Envoy's listeners have in flight (None: no answer)."""
    state = _stats(admin_socket)
    return None if state is None else state[0]


def draining(admin_socket: Path) -> bool:
    """Tells whether Envoy's listeners are draining (a drain has begun)."""
    text = admin.text(admin_socket, "/server_info")
    return text is not None and json.loads(text).get("state") == "DRAINING"


def drain(
    admin_socket: Path,
    timeout_s: float,
    give_up: Callable[[], bool] = lambda: False,
    *,
    listeners: bool = True,
) -> bool:
    """Drains Envoy gracefully and waits for its requests (at most `timeout_s`).

    Returns True once no request is active (or Envoy is gone), False when the
    wait ran out or `give_up()` said so. Idempotent: a second call finds the
    drain begun and only waits.

    Args:
        listeners: wait for the listeners to close too, even when nothing is
            active (the preStop hook: a client that resolved this edge before
            its endpoints changed is still answered). False: return once
            nothing is active (`supervise`, which stops Envoy next).
    """
    if admin.text(admin_socket, "/healthcheck/fail", "POST") is None:
        return True  # no Envoy answers: nothing to drain
    admin.text(admin_socket, "/drain_listeners?graceful", "POST")
    deadline = time.monotonic() + timeout_s
    while True:
        state = _stats(admin_socket)
        if state is None:  # Envoy is gone
            return True
        active, closed = state
        if not active and (closed or not listeners):
            return True
        if time.monotonic() >= deadline or give_up():
            LOG.warning("%d requests still active; stopping", active)
            return False
        time.sleep(POLL_S)  # noqa: TID251 - a synchronous process (no event loop)


def supervise(argv: Sequence[str], admin_socket: Path, drain_s: float) -> int:
    """Runs Envoy (`argv`) as a child; on SIGTERM or SIGINT drains it, then stops it.

    Envoy gets SIGTERM from the kernel when this process dies (even SIGKILLed,
    outside a container, where nothing else would stop it and it kept the
    edge's ports). Returns Envoy's exit status (128 + the signal's number when
    a signal ended it).
    """
    signals: list[int] = []
    stop = threading.Event()

    def on_signal(number: int, _frame: object) -> None:
        signals.append(number)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        command, set_signal = processes.dying_with_parent(argv)
        child = subprocess.Popen(command, preexec_fn=set_signal)
        while child.poll() is None and not stop.wait(POLL_S):
            pass
        if child.poll() is None:
            # Nothing active: stop now. An idle `docker stop` took the listeners'
            # whole drain time (5 s) for clients that no endpoint list sends here.
            drain(admin_socket, drain_s, give_up=lambda: len(signals) > 1, listeners=False)
            child.terminate()
            try:
                child.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    code = child.returncode
    return 128 - code if code < 0 else code
