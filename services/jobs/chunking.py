"""Cuts a download's bytes into messages of a bounded size; bounds a page of results.

A result file's lines are sent as a byte stream of HttpBody messages. Sized
by result count (500 lines a message), one message of large results (3072-dim
embeddings, ~65 KB a line) was ~33 MB, past the server's 16 MiB message cap
(services.core.server.MAX_MESSAGE_BYTES): every download of such a batch
ended RESOURCE_EXHAUSTED. Messages are cut by size instead, and a byte stream
may be cut anywhere, so one line larger than a message spans several.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

# Well under the server's 16 MiB cap and a client's default 4 MiB receive limit.
MESSAGE_BYTES = 1024 * 1024
# Results read from Redis at a time: a read is held in memory until it is sent.
RESULTS_PER_READ = 100
# The most result bytes (protobuf) an OpenAI result file reads at a time (at least
# one result): a read is held, then written as JSON (~3-4x), until it is sent. By
# count (RESULTS_PER_READ), a read of embeddings of 256 inputs a line held 230 MiB
# (384 dimensions) to 608 MiB (1,024) at once, for each download.
READ_BYTES = 1024 * 1024
# The most result bytes (protobuf) a ListJobResults page holds beyond its first
# result. Sized by count alone (100 by default, up to 1000), a page of large
# embeddings was 37.7 MiB: past the server's 16 MiB cap, the REST transcoder's
# 8 MiB and a gRPC client's default 4 MiB, so such a job's results could not be
# listed at all. Over REST a page is JSON, ~3.3-3.7x its protobuf for floats (4
# bytes each in protobuf, ~13 characters printed) and up to 6x for text of
# control characters: 1 MiB keeps both transports under their limits.
PAGE_BYTES = 1024 * 1024


async def byte_chunks(
    pieces: AsyncIterable[bytes], size: int = MESSAGE_BYTES
) -> AsyncIterator[bytes]:
    """Yields the bytes of `pieces`, in order, as chunks of exactly `size` bytes (the
    last one shorter); nothing when the pieces hold no bytes."""
    if size <= 0:
        raise ValueError("size must be > 0")
    buffer = bytearray()
    async for piece in pieces:
        buffer += piece
        if len(buffer) < size:
            continue
        # Cut every full chunk off the front at once (not one `del` per chunk: a line
        # of many chunks would be moved once for each).
        full = len(buffer) - len(buffer) % size
        view = memoryview(buffer)
        chunks = [bytes(view[start : start + size]) for start in range(0, full, size)]
        view.release()
        del buffer[:full]
        for chunk in chunks:
            yield chunk
    if buffer:
        yield bytes(buffer)
