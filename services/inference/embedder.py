"""Embeddings: tokenize, pad per chunk, run the engine off the event loop.

Unloading drains: `stop` refuses new embeds (UNAVAILABLE, reason
MODEL_UNLOADING: the edge retries them on another worker), lets the ones in
flight finish up to the drain timeout, then closes the compute thread; an
embed still running then ends UNAVAILABLE, reason MODEL_UNLOADED (as a
generation's does), at the latest CHUNK_WAIT_S later when the engine call it
waits for never returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from services.core.errors import FieldViolation, InvalidArgument, Unavailable
from services.inference.engines.base import EmbeddingEngine
from services.inference.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
# How long an unload waits for the chunk being computed once its drain timed out.
CHUNK_WAIT_S = 30.0
T = TypeVar("T")
_Call = tuple[concurrent.futures.Future[Any], Callable[[], Any]]  # a call and its result


class ComputeThread:
    """ComputeThread runs calls one at a time, in order, on a daemon thread of its own.

    Not a ThreadPoolExecutor: the interpreter joins those threads at exit, so an
    engine call that never returns held the worker's exit for good. A daemon
    thread (as the scheduler's engine thread) goes with the process.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit against shutdown
        self._shut = False
        self._thread: threading.Thread | None = None  # started by the first call
        # One never shut down (its model failed to start) ends its thread once dropped.
        weakref.finalize(self, self._calls.put, None)

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queues `call`; raises RuntimeError once shut down (as an executor does)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot run calls after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_work, args=(self._calls,), name=self._name, daemon=True
                )
                self._thread.start()
            self._calls.put((future, call))
        return future

    def shutdown(self) -> None:
        """Takes no more calls and cancels the queued ones; the running one runs on."""
        with self._lock:
            self._shut = True
        while True:
            try:
                queued = self._calls.get_nowait()
            except queue.Empty:
                break
            if queued is not None:
                queued[0].cancel()
        self._calls.put(None)  # the thread ends after the call it runs, if any

    def join(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for the thread to end (blocking); tells whether it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def _work(calls: queue.SimpleQueue[_Call | None]) -> None:
    """Runs the queued calls until the end mark (no reference to its ComputeThread, so
    that one can be dropped)."""
    while (item := calls.get()) is not None:
        future, call = item
        if not future.set_running_or_notify_cancel():
            continue
        try:
            result = call()
        except BaseException as exc:  # the caller's to handle, as an executor hands it over
            future.set_exception(exc)
        else:
            future.set_result(result)


class Embedder:
    """Embedder serves one embedding model version.

    Args:
        engine: the model's engine.
        tokenizer: adds the model's special tokens ([CLS] ... [SEP]).
        max_input_tokens: longest input accepted (longer ones are refused, not cut).
        max_batch_size: inputs per engine call.
    """

    def __init__(
        self,
        engine: EmbeddingEngine,
        tokenizer: Tokenizer,
        max_input_tokens: int,
        max_batch_size: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.max_batch_size = max_batch_size
        self._compute_thread = ComputeThread("embedder")
        # The chunks computing or queued, as their callers await them (stop ends
        # the callers of a chunk that never returns).
        self._chunks: set[asyncio.Future[np.ndarray]] = set()
        self._accepting = True
        self._closed = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Returns the embeds admitted and not yet ended."""
        return self._in_flight

    def tokenize(self, inputs: Sequence[str]) -> list[list[int]]:
        """Returns token ids per input; raises InvalidArgument for over-long ones."""
        encoded = self.tokenizer.encode_batch(inputs)
        violations = [
            FieldViolation(
                f"inputs[{i}]",
                f"has {len(ids)} tokens; the model accepts at most {self.max_input_tokens}",
            )
            for i, ids in enumerate(encoded)
            if len(ids) > self.max_input_tokens
        ]
        if violations:
            raise InvalidArgument(violations, reason="INPUT_TOO_LONG")
        return encoded

    def tokenize_truncated(self, inputs: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Returns token ids per input cut to max_input_tokens, and which inputs were cut.

        A cut input keeps its first tokens and the tokenizer's closing special
        token (BERT's [SEP]), which the model expects last.
        """
        closing = self._closing_tokens()
        keep = self.max_input_tokens - len(closing)
        encoded, cut = [], []
        for ids in self.tokenizer.encode_batch(inputs):
            too_long = len(ids) > self.max_input_tokens
            encoded.append([*ids[:keep], *closing] if too_long else ids)
            cut.append(too_long)
        return encoded, cut

    def _closing_tokens(self) -> list[int]:
        """Returns the special tokens the tokenizer ends every input with (none, or [SEP])."""
        specials = self.tokenizer.encode("")
        return specials[1:] if len(specials) >= 2 else []

    async def embed(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        """Returns [len(encoded), dims] unit vectors, computed in chunks off the loop.

        Raises:
            Unavailable: the version is unloading (MODEL_UNLOADING: nothing was
                computed), or was unloaded before this embed finished (MODEL_UNLOADED).
        """
        if not self._accepting:
            raise Unavailable(
                "model version is unloading", retry_after_s=1.0, reason="MODEL_UNLOADING"
            )
        self._in_flight += 1
        self._idle.clear()
        try:
            chunks = [
                encoded[i : i + self.max_batch_size]
                for i in range(0, len(encoded), self.max_batch_size)
            ]
            parts = [await self._compute(chunk) for chunk in chunks]
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        return np.concatenate(parts) if parts else np.empty((0, self.engine.dimensions), np.float32)

    async def _compute(self, chunk: Sequence[Sequence[int]]) -> np.ndarray:
        """Runs one chunk on the compute thread."""
        unloaded = Unavailable("model version unloaded", retry_after_s=1.0, reason="MODEL_UNLOADED")
        if self._closed:
            raise unloaded
        computed = asyncio.wrap_future(self._compute_thread.submit(lambda: self._run(chunk)))
        self._chunks.add(computed)
        try:
            return await computed
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise unloaded from None  # close() or stop() ended the chunk, not the caller
            raise
        finally:
            self._chunks.discard(computed)

    def _run(self, chunk: Sequence[Sequence[int]]) -> np.ndarray:
        width = max(len(ids) for ids in chunk)
        ids = np.zeros((len(chunk), width), np.int64)
        mask = np.zeros((len(chunk), width), np.int64)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return self.engine.embed(ids, mask)

    async def warm_up(self) -> None:
        """Runs one batch so the first request pays no start-up cost."""
        await self.embed(self.tokenize(["warm up"]))

    def stop_admitting(self) -> None:
        """Refuses new embeds (`stop`'s first step, taken at once)."""
        self._accepting = False

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuses new embeds, lets the admitted ones finish (up to the timeout), closes.

        Returns once the compute thread has ended (after the chunk it was computing), or
        CHUNK_WAIT_S later: the embed waiting for a chunk that never returns then ends
        MODEL_UNLOADED, and the thread, a daemon, holds neither this nor the exit.
        """
        self._accepting = False
        if self._in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
            except TimeoutError:
                pass  # what still runs ends with MODEL_UNLOADED
        self.close()
        # The chunk being computed (at most one) ends before the engine is let go;
        # bounded: a hung engine call must not hold the unload (or shutdown) for good.
        # The join itself is bounded too: a default-executor thread left joining
        # for good held asyncio.run's executor shutdown, so the process never exited.
        if not await asyncio.to_thread(self._compute_thread.join, CHUNK_WAIT_S):
            logger.error("an embedding chunk still runs %.0fs after its unload", CHUNK_WAIT_S)
            for computed in list(self._chunks):  # its embed ends MODEL_UNLOADED now
                computed.cancel()

    def close(self) -> None:
        """Stops the compute thread (embeds still running end with MODEL_UNLOADED)."""
        self._accepting = False
        self._closed = True
        self._compute_thread.shutdown()
