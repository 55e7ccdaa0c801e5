"""The peer benchmark's LiteLLM starts and serves with no network at all (bench rows P1/P2).

LiteLLM reaches out by default (its model cost map from GitHub, telemetry);
bench.peer turns that off. Here it runs in a network namespace of its own
with only loopback: if it needed the internet to start, it would not.
Skipped where `make bench` has not installed it or namespaces are not allowed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from bench import peer
from services.launcher.mesh import REPO_ROOT

PROBE = textwrap.dedent(
    """
    import sys, tempfile, httpx
    from pathlib import Path
    from bench.peer import MODEL, litellm_proxy

    with tempfile.TemporaryDirectory() as tmp:
        # The backend does not exist: only LiteLLM's own start and answers count.
        with litellm_proxy(Path(tmp), "http://127.0.0.1:9/openai/v1", "sk-offline", []) as (
            url, _
        ):
            reply = httpx.get(
                f"{url}/v1/models", headers={"authorization": "Bearer sk-offline"}, timeout=30
            )
            ids = [m["id"] for m in reply.json()["data"]]
            denied = httpx.get(f"{url}/v1/models", timeout=30).status_code
    print(reply.status_code, ids, denied)
    sys.exit(0 if reply.status_code == 200 and ids == [MODEL] and denied == 401 else 1)
    """
)


def _namespaces_allowed() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        return False
    return subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.timeout(240)
def test_litellm_starts_and_serves_without_a_network():
    try:
        peer.litellm_version()
    except RuntimeError as error:
        pytest.skip(str(error))
    if not _namespaces_allowed():
        pytest.skip("no network namespaces here (unshare -n)")
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
        + [sys.executable, "-c", PROBE],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
