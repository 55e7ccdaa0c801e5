"""A REST event stream over HTTP/1.1 ends without gRPC's status trailers.

The edge's HTTP/1.1 codec had trailers on: every SSE stream (v2 `:generate`,
OpenAI `stream: true`) ended with a chunked trailer section `grpc-status: 0`,
`grpc-message:` that the client never asked for (no `TE: trailers`), details of
the mesh's gRPC hop that REST answers' headers no longer show. Over HTTP/2 a
REST stream ends with the same trailers frame gRPC needs (clients ignore it).
"""

from __future__ import annotations

import subprocess

import pytest

from services.launcher.mesh import Mesh

MODEL = "deterministic-test"


def _raw(url: str, key: str, body: str) -> str:
    """The response body exactly as sent (chunk sizes and trailers included)."""
    args = ["curl", "-sS", "--http1.1", "--raw", "--max-time", "30", url, "-d", body]
    args += ["-H", f"x-api-key: {key}", "-H", "content-type: application/json"]
    return subprocess.run(args, capture_output=True, text=True, timeout=40, check=True).stdout


@pytest.mark.parametrize(
    ("path", "body", "last_event"),
    [
        (f"/v2/models/{MODEL}:generate", '{"prompt":"hi","max_output_tokens":2}', "finish"),
        (
            "/openai/v1/chat/completions",
            f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],'
            '"max_tokens":2,"stream":true}',
            "data: [DONE]",
        ),
    ],
    ids=["v2 generate", "openai chat"],
)
def test_an_event_stream_over_http11_ends_without_grpc_trailers(
    mesh: Mesh, path: str, body: str, last_event: str
) -> None:
    raw = _raw(f"{mesh.edge_url}{path}", mesh.dev_api_key(), body)
    assert last_event in raw
    assert "grpc-status" not in raw and "grpc-message" not in raw, raw[-200:]
    # The chunked body ends with the last chunk and an empty trailer section (text
    # mode reads "\r\n" as "\n").
    assert raw.endswith("\n0\n\n"), repr(raw[-60:])
