"""AsyncEngine: the LLMEngine's step loop, fed and drained from an asyncio event loop elsewhere.

The model step is blocking work (torch releases the GIL inside it), so `run()` loops on a thread
of its own, never the one serving HTTP (server.py runs it on the main thread, see why there).
The scheduler is touched only by that thread: adds and aborts reach it through a command queue,
and outputs come back to each request's asyncio.Queue with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmbuild.errors import LLMBuildError, RequestError
from llmbuild.runtime.llm_engine import LLMEngine, RequestOutput
from llmbuild.runtime.request import Request
from llmbuild.serve.metrics import Metrics


class QueueFullError(LLMBuildError):
    """The server holds as many requests as it may; the client should retry later (HTTP 429)."""


class EngineDeadError(LLMBuildError):
    """The step loop stopped after an internal error; the server can no longer generate (HTTP 503)."""


@dataclass(eq=False)
class _Stream:
    """Where one request's outputs go, and the timestamps its latency metrics need."""

    request: Request
    index: int
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    last_token: float | None = None


_ADMITTED = object()
"""Put on a generate() call's sink once the step loop has queued all its requests (after any refusal)."""


class RequestStream:
    """The outputs of one generate() call, as an async iterator of (index, RequestOutput)."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], sink: asyncio.Queue) -> None:
        self._engine = engine
        self._count = len(request_ids)
        self._pending = set(request_ids)
        self._sink = sink
        self._closed = False
        self._admitted = False

    def __aiter__(self) -> RequestStream:
        return self

    async def admitted(self) -> None:
        """Wait until the step loop has queued every request (one step at most, not the first token).

        Raises RequestError when the engine refused one (nothing else of the call runs), and
        EngineDeadError when the step loop has failed.
        """
        if not self._admitted:
            item = await self._get()
            assert item is None, "outputs come only after their requests were admitted"

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._pending:
            self.close()
            raise StopAsyncIteration
        item = await self._get()
        while item is None:
            item = await self._get()
        index, out = item
        if out.finish_reason is not None:
            self._pending.discard(out.request_id)
        return index, out

    async def _get(self) -> tuple[int, RequestOutput] | None:
        """The next output, or None for the admission marker; raises what the step loop sent instead."""
        item = await self._sink.get()
        if item is _ADMITTED:
            self._admitted = True
            return None
        if isinstance(item, BaseException):
            self.close()
            if isinstance(item, RequestError):
                raise item
            raise EngineDeadError(f"the engine stopped after an internal error: {item}") from item
        return item

    def close(self) -> None:
        """Abort the unfinished requests (idempotent); called on early exit and on garbage collection."""
        if self._closed:
            return
        self._closed = True
        self._engine.num_unfinished -= self._count
        if self._pending:
            self._engine._abort(sorted(self._pending), self._sink)

    def __del__(self) -> None:
        self.close()


class AsyncEngine:
    """Thread-safe front of one LLMEngine: `generate()` from any coroutine, `abort` on disconnect."""

    def __init__(self, llm: LLMEngine, metrics: Metrics, max_queue: int) -> None:
        self.llm = llm
        self.metrics = metrics
        self.capacity = llm.limits.max_batch_size + max_queue
        """Most unfinished requests held at once: every batch slot plus a bounded waiting queue."""
        self.num_unfinished = 0
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        metrics.kv_blocks_total.set(llm.pool.num_blocks)

    def stop(self) -> None:
        """Ask the step loop to end (from any thread); requests still held are aborted."""
        self._stop.set()
        self._commands.put(None)

    @property
    def alive(self) -> bool:
        return self.error is None and not self._stop.is_set()

    def generate(self, requests: list[Request]) -> RequestStream:
        """Queue requests together; iterate the result for (index in `requests`, output) pairs.

        Raises QueueFullError (nothing queued) when the server is at capacity. Closing the stream
        early, or dropping it, aborts whatever is unfinished and frees its KV blocks.
        """
        if not self.alive:
            raise EngineDeadError(f"the engine stopped after an internal error: {self.error}")
        if self.num_unfinished + len(requests) > self.capacity:
            raise QueueFullError(
                f"server is at capacity ({self.num_unfinished} requests in flight, limit {self.capacity}); retry later"
            )
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        streams = [_Stream(r, i, sink, loop) for i, r in enumerate(requests)]
        self.num_unfinished += len(requests)
        self._commands.put(("add", streams))
        return RequestStream(self, [r.request_id for r in requests], sink)

    def _abort(self, request_ids: list[str], sink: asyncio.Queue) -> None:
        self._commands.put(("abort", (request_ids, sink)))

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """The step loop, in the calling thread, until stop() or `should_stop()` (checked when idle)."""
        llm = self.llm
        try:
            while not self._stop.is_set():
                if not llm.has_unfinished() and should_stop():
                    break
                self._apply_commands(block=not llm.has_unfinished())
                if self._stop.is_set():
                    break
                if not llm.has_unfinished():
                    llm.keep_alive()  # a tensor-parallel engine's workers: fail fast if one died
                if llm.has_unfinished():
                    start = time.perf_counter()
                    model_before = llm.model_seconds
                    outputs = llm.step()
                    now = time.perf_counter()
                    for out in outputs:
                        self._deliver(out, now)
                    self.metrics.observe_step(now - start, llm.model_seconds - model_before)
                self._publish_state()
        except BaseException as exc:  # noqa: BLE001 - any failure of the loop must reach every waiting client
            self.error = exc
            self._stop.set()
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.sink.put_nowait, exc)
            self._streams.clear()
            raise
        finally:
            for stream in list(self._streams.values()):
                llm.abort(stream.request)
            self._streams.clear()

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            kind, payload = command
            if kind == "add":
                for stream in payload:
                    try:
                        self._check_unique(stream.request.request_id)
                        self.llm.add_request(stream.request)
                    except RequestError as exc:
                        stream.loop.call_soon_threadsafe(stream.sink.put_nowait, exc)
                        continue
                    self._streams[stream.request.request_id] = stream
                    self.metrics.prompt_tokens.inc(stream.request.num_prompt_tokens)
                if payload:
                    first = payload[0]
                    first.loop.call_soon_threadsafe(first.sink.put_nowait, _ADMITTED)
            else:
                request_ids, sink = payload
                for request_id in request_ids:
                    stream = self._streams.get(request_id)
                    # the sink tells whose request this is: a refused duplicate id must not abort the original
                    if stream is not None and stream.sink is sink:
                        del self._streams[request_id]
                        self.llm.abort(stream.request)
                        self.metrics.finished("abort")
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
        self._stop.set()

    def _check_unique(self, request_id: str) -> None:
        # outputs are routed by request id: a client reusing an X-Request-Id while its first
        # request still runs gets a 400 instead of the other request's tokens
        if request_id in self._streams:
            raise RequestError(f"request id '{request_id}' is already in use by a request in flight (X-Request-Id)")

    def _deliver(self, out: RequestOutput, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if stream.last_token is None:
            self.metrics.ttft.observe(now - stream.arrival)
        else:
            self.metrics.itl.observe(now - stream.last_token)
        stream.last_token = now
        self.metrics.generation_tokens.inc()
        if out.finish_reason is not None:
            del self._streams[out.request_id]
            self.metrics.e2e.observe(now - stream.arrival)
            self.metrics.finished(out.finish_reason)
        stream.loop.call_soon_threadsafe(stream.sink.put_nowait, (stream.index, out))

    def _publish_state(self) -> None:
        scheduler, pool, m = self.llm.scheduler, self.llm.pool, self.metrics
        m.waiting.set(len(scheduler.waiting))
        m.running.set(len(scheduler.running))
        m.kv_blocks_used.set(pool.num_blocks - pool.num_free)
        m.set_scheduler_counters(
            scheduler.num_preemptions, scheduler.prefix_queried_tokens, scheduler.prefix_hit_tokens
        )
        loras = self.llm.loras
        if loras is not None:
            m.set_lora_state(len(loras.adapters), loras.slots_in_use(), loras.num_loads)
        spec = self.llm.speculator
        if spec is not None:
            m.set_speculation_counters(spec.num_verifications, spec.num_draft_tokens, spec.num_accepted_tokens)
