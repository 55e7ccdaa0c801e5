"""The CLI speaks TLS to an edge that is not on this host unless told otherwise: it
sent the admin key in plaintext to any --edge-address without --edge-tls (the SDK's
rule since the same session: plaintext only to loopback)."""

from __future__ import annotations

import pytest

from services.cli.__main__ import _edge_tls, parser


@pytest.mark.parametrize(
    ("argv", "tls"),
    [
        (["--edge-address", "10.0.0.5:8443"], True),
        (["--edge-address", "edge.example.com:443"], True),
        (["--edge-address", "127.0.0.1:8080"], False),
        (["--edge-address", "localhost:8080"], False),
        (["--edge-address", "10.0.0.5:8080", "--edge-plaintext"], False),
        (["--edge-address", "127.0.0.1:8443", "--edge-tls"], True),
        ([], False),  # the local mesh's manifest: its 127.0.0.1 listener
    ],
)
def test_the_edge_gets_tls_unless_it_is_on_this_host(
    argv: list[str], tls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TOKENMESH_EDGE_TLS", "TOKENMESH_EDGE_CA", "TOKENMESH_EDGE_ADDR"):
        monkeypatch.delenv(name, raising=False)
    args = parser().parse_args([*argv, "models", "list"])
    assert _edge_tls(args) is tls
