"""The gateway's side of ZeroMQ: the tokenizer workers, their health, and request routing.

One ROUTER socket (bound by the gateway; workers connect with their worker id as identity).
Each open stream has an asyncio queue that the reader task fills with the worker's deltas and
errors; a request stays on the worker that took it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from protos.pagedserve.internal.v1 import ipc_pb2
from protos.transport import DEAD_AFTER_S, GATEWAY_PING_TIMEOUT_S, HEARTBEAT_S, bind

log = logging.getLogger("pagedserve.gateway")


STALL_GRACE_S = 2.0  # after the gateway itself stalled: time a worker gets to be heard


def _replaced_connection(ident: bytes) -> bool:
    """Workers connect under their own ids ("tok-..."); ZeroMQ generates ids starting with a
    zero byte, and with ROUTER_HANDOVER gives one to a connection its worker has replaced by
    reconnecting (what was left unread on it arrives under that id)."""
    return ident[:1] == b"\x00"


@dataclass(slots=True)
class WorkerState:
    ident: bytes
    status: ipc_pb2.WorkerStatus
    last_seen: float
    num_streams: int = 0  # streams this gateway has open on the worker

    @property
    def ready(self) -> bool:
        alive = time.monotonic() - self.last_seen < DEAD_AFTER_S
        return alive and self.status.tokenizer_ready and self.status.engine_ready


class WorkerGone(Exception):
    """The worker holding a stream stopped answering."""


@dataclass(slots=True)
class Stream:
    request_id: str  # the gateway's own id, unique among its streams: the workers know this one
    worker: bytes
    client_id: str = ""  # the id the client gave and sees (gateway/frontend.py sets it)
    caller: str = ""  # who opened the stream: client_id and Abort are scoped to it
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # TextDelta | RequestError
    opened: float = field(default_factory=time.monotonic)


class WorkerPool:
    def __init__(self, address: str, expect_workers: int = 1) -> None:
        self.address = address
        self.expect_workers = expect_workers
        self.workers: dict[bytes, WorkerState] = {}
        self.streams: dict[str, Stream] = {}
        self._calls: dict[str, tuple[bytes, asyncio.Future]] = {}  # call id -> (worker, reply)
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self.on_health_change: Callable[[bool], None] = lambda ready: None
        self._was_ready = False
        self._grace_at = float("-inf")  # when workers were last given STALL_GRACE_S

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        # A worker that reconnects (its pings timed out while this process did not run) comes
        # back under its identity before the old connection is torn down here: take the new
        # one, or every message of that worker would be dropped from then on.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bind(self._sock, self.address)
        self._tasks = [
            asyncio.create_task(self._reader(), name="workers-reader"),
            asyncio.create_task(self._watchdog(), name="workers-watchdog"),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(0)
        self._ctx.term()

    # -- state -----------------------------------------------------------------------------
    def ready_workers(self) -> list[WorkerState]:
        """The ready workers. Safe from another thread (the metrics server's): the dict is
        copied in one C call, under the GIL, before anything iterates it in Python."""
        return [w for w in list(self.workers.values()) if w.ready]

    @property
    def ready(self) -> bool:
        return len(self.ready_workers()) >= self.expect_workers

    def engine_info(self) -> ipc_pb2.EngineInfo | None:
        ready = self.ready_workers()
        return ready[0].status.engine if ready else None

    def has_chat_template(self) -> bool:
        """Whether the ready workers' tokenizer has a chat template (they share one model)."""
        return any(w.status.has_chat_template for w in self.ready_workers())

    def engine_states(self) -> dict[int, ipc_pb2.EngineState]:
        """Each engine, by its place in the workers' engine list (their --engine flags, in
        order), as the ready worker heard most recently reports it."""
        out: dict[int, ipc_pb2.EngineState] = {}
        for w in sorted(self.ready_workers(), key=lambda w: w.last_seen):
            for i, e in enumerate(w.status.engines):
                out[i] = e
        return out

    def pick(self) -> WorkerState | None:
        """The ready worker with the fewest open streams."""
        ready = self.ready_workers()
        return min(ready, key=lambda w: w.num_streams) if ready else None

    # -- streams ---------------------------------------------------------------------------
    def open(self, request_id: str, worker: WorkerState, msg: ipc_pb2.TextRequest) -> Stream:
        stream = Stream(request_id, worker.ident)
        self.streams[request_id] = stream
        worker.num_streams += 1
        self._send(worker.ident, ipc_pb2.GatewayToWorker(generate=msg))
        return stream

    def close_stream(self, stream: Stream, abort: bool) -> None:
        if self.streams.get(stream.request_id) is not stream:
            return
        del self.streams[stream.request_id]
        w = self.workers.get(stream.worker)
        if w is not None:
            w.num_streams -= 1
        if abort:  # harmless if the request already ended on the worker
            self.abort(stream)

    def abort(self, stream: Stream) -> None:
        """Stop the stream's request on its worker and in the engine (within one step)."""
        abort_msg = ipc_pb2.AbortText(request_ids=[stream.request_id])
        self._send(stream.worker, ipc_pb2.GatewayToWorker(abort=abort_msg))

    async def call(self, call: ipc_pb2.TokenizeCall, timeout: float) -> ipc_pb2.TokenizeResult:
        worker = self.pick()
        if worker is None:
            raise WorkerGone("no tokenizer worker is ready")
        call.call_id = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._calls[call.call_id] = (worker.ident, fut)
        try:
            self._send(worker.ident, ipc_pb2.GatewayToWorker(tokenize=call))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._calls.pop(call.call_id, None)

    def _send(self, ident: bytes, msg: ipc_pb2.GatewayToWorker) -> None:
        # ROUTER sends never block; a message to a vanished worker is dropped, and the
        # watchdog fails that worker's streams.
        self._sock.send_multipart([ident, msg.SerializeToString()], copy=False)

    # -- tasks -----------------------------------------------------------------------------
    async def _reader(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2:
                continue
            ident, payload = frames
            msg = ipc_pb2.WorkerToGateway()
            try:
                msg.ParseFromString(payload)
            except Exception:
                log.warning("dropping an unparseable message from %r", ident)
                continue
            try:
                self._handle(ident, msg)
            except Exception:  # the reader must survive anything, or every stream hangs
                log.exception("failed to handle a message from %r", ident)

    def _handle(self, ident: bytes, msg: ipc_pb2.WorkerToGateway) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "batch":
            self._dispatch(ident, msg.batch)
        elif kind == "status":
            self._on_status(ident, msg.status)
        elif kind == "tokenize":
            _, fut = self._calls.get(msg.tokenize.call_id, (None, None))
            if fut is not None and not fut.done():
                fut.set_result(msg.tokenize)

    def _dispatch(self, ident: bytes, batch: ipc_pb2.WorkerBatch) -> None:
        # Only the worker that holds a stream may feed it (an id can be reused at once). What
        # was left unread on a connection its worker has since replaced comes under a
        # generated id: it is that worker's, and may hold a stream's last delta.
        replaced = _replaced_connection(ident)
        for err in batch.errors:
            s = self.streams.get(err.request_id)
            if s is not None and (s.worker == ident or replaced):
                s.queue.put_nowait(err)
        for d in batch.deltas:
            s = self.streams.get(d.request_id)
            if s is not None and (s.worker == ident or replaced):
                s.queue.put_nowait(d)

    def _on_status(self, ident: bytes, st: ipc_pb2.WorkerStatus) -> None:
        if _replaced_connection(ident):
            return  # an old status of a worker now on its new connection: not a worker
        w = self.workers.get(ident)
        if w is None:
            log.info("tokenizer worker %s connected", st.worker_id)
            self.workers[ident] = WorkerState(ident, st, time.monotonic())
        else:
            w.status, w.last_seen = st, time.monotonic()
        self._check_health()

    async def _watchdog(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            self._tick(now, now - last)
            last = now

    def _tick(self, now: float, gap: float) -> None:
        """One watchdog round, ``gap`` seconds after the previous one (HEARTBEAT_S normally).

        A late round means this process did not run (stopped, swapped out, starved) and heard
        nobody meanwhile, through no fault of theirs: each worker gets STALL_GRACE_S from now
        to be heard (its queued messages read, or its connection made again) before it is
        judged; at most once per DEAD_AFTER_S + STALL_GRACE_S, so a gateway that keeps
        lagging still writes a dead worker off. Past the workers' ping timeout they have
        dropped their connections and aborted its requests, and not every stream's end need
        come back (a message being written when a connection drops is lost): the streams
        opened before the stall end here."""
        if gap > GATEWAY_PING_TIMEOUT_S:
            for s in self.streams.values():
                if s.opened < now - gap:
                    s.queue.put_nowait(ipc_pb2.RequestError(
                        request_id=s.request_id, code=ipc_pb2.UNAVAILABLE,
                        message=f"the gateway stalled for {gap:.0f} s and lost its workers",
                    ))  # fmt: skip
        if gap > 2 * HEARTBEAT_S and now - self._grace_at > DEAD_AFTER_S + STALL_GRACE_S:
            self._grace_at = now
            log.warning(
                "the gateway stalled for %.1f s; giving workers %.0f s to be heard",
                gap,
                STALL_GRACE_S,
            )
            for w in self.workers.values():
                w.last_seen = max(w.last_seen, now - DEAD_AFTER_S + STALL_GRACE_S)
        for ident, w in list(self.workers.items()):
            if now - w.last_seen > DEAD_AFTER_S:
                log.warning("tokenizer worker %s went silent", w.status.worker_id)
                del self.workers[ident]
                self._fail_streams(ident, "the tokenizer worker serving it stopped answering")
            elif not w.status.engine_ready:
                self._fail_streams(ident, "the engine is not available")
        self._check_health()

    def _fail_streams(self, ident: bytes, message: str) -> None:
        for worker, fut in self._calls.values():
            if worker == ident and not fut.done():
                fut.set_exception(WorkerGone(message))
        for s in self.streams.values():
            if s.worker == ident:
                err = ipc_pb2.RequestError(
                    request_id=s.request_id, code=ipc_pb2.UNAVAILABLE, message=message
                )
                s.queue.put_nowait(err)

    def _check_health(self) -> None:
        ready = self.ready
        if ready != self._was_ready:
            self._was_ready = ready
            log.info("serving" if ready else "not serving")
            self.on_health_change(ready)
