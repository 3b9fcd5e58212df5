"""The gateway's worker bookkeeping after the gateway itself stalled (``WorkerPool._tick``,
``_dispatch``, ``_on_status``), on a real pool object without sockets. The end-to-end stalls
(a SIGSTOPped gateway in a running stack) are in tests/test_resilience.py; these pin down the
rules whose effect there depends on message timing."""

from __future__ import annotations

import time

import pytest

from gateway.workers import STALL_GRACE_S, Stream, WorkerPool, WorkerState
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.transport import DEAD_AFTER_S, GATEWAY_PING_TIMEOUT_S, HEARTBEAT_S

TOK0 = b"tok-0-abc123"
GENERATED = b"\x00k\x8bEg"  # what libzmq calls a connection replaced by ROUTER_HANDOVER


def _status(worker_id: str) -> ipc_pb2.WorkerStatus:
    return ipc_pb2.WorkerStatus(worker_id=worker_id, tokenizer_ready=True, engine_ready=True)


@pytest.fixture
def pool():
    p = WorkerPool("ipc:///nonexistent")  # never started: no socket
    yield p
    p._ctx.term()


def _drain(stream: Stream) -> list:
    out = []
    while not stream.queue.empty():
        out.append(stream.queue.get_nowait())
    return out


def test_a_late_round_gives_workers_grace_once(pool):
    now = time.monotonic()
    pool.workers[TOK0] = WorkerState(TOK0, _status("tok-0-abc123"), now - 4.0)  # silent 4 s
    pool._tick(now, gap=4.0)  # the gateway itself did not run for 4 s
    assert TOK0 in pool.workers and pool.workers[TOK0].ready
    # ...but only STALL_GRACE_S of it: still silent after that, it is written off
    pool._tick(now + STALL_GRACE_S + 0.1, gap=HEARTBEAT_S)
    assert TOK0 not in pool.workers


def test_grace_is_not_given_again_soon(pool):
    now = time.monotonic()
    pool._tick(now, gap=2.0)  # a stall: grace given (to nobody)
    pool.workers[TOK0] = WorkerState(TOK0, _status("tok-0-abc123"), now - 4.0)
    pool._tick(now + 1.0, gap=2.0)  # another late round soon after: no second grace
    assert TOK0 not in pool.workers
    # a round on time never gives grace
    pool.workers[TOK0] = WorkerState(TOK0, _status("tok-0-abc123"), now + 10 - 3.5)
    pool._tick(now + 10, gap=HEARTBEAT_S)
    assert TOK0 not in pool.workers


def test_a_stall_past_the_ping_timeout_ends_the_streams_opened_before_it(pool):
    pool.workers[TOK0] = WorkerState(TOK0, _status("tok-0-abc123"), time.monotonic())
    old, new = Stream("old", TOK0), Stream("new", TOK0)
    now = time.monotonic()
    old.opened, new.opened = now - 20.0, now - 0.01  # `new` arrived after the gateway resumed
    pool.streams = {"old": old, "new": new}
    pool._tick(now, gap=GATEWAY_PING_TIMEOUT_S - 0.5)  # shorter: the workers are still there
    assert _drain(old) == [] and _drain(new) == []
    pool._tick(now, gap=GATEWAY_PING_TIMEOUT_S + 4.0)
    (err,) = _drain(old)
    assert err.code == ipc_pb2.UNAVAILABLE and "the gateway stalled for 9 s" in err.message
    assert _drain(new) == []


def test_messages_left_on_a_replaced_connection(pool):
    """They come under a generated id: statuses are ignored (no ghost worker), a stream's
    deltas and errors still reach it (its last delta may be among them)."""
    pool._on_status(TOK0, _status("tok-0-abc123"))
    pool._on_status(GENERATED, _status("tok-0-abc123"))
    assert list(pool.workers) == [TOK0]
    s = Stream("r1", TOK0)
    pool.streams["r1"] = s
    batch = ipc_pb2.WorkerBatch(
        deltas=[ipc_pb2.TextDelta(request_id="r1", text="last")],
        errors=[ipc_pb2.RequestError(request_id="r1", code=ipc_pb2.UNAVAILABLE)],
    )
    pool._dispatch(GENERATED, batch)
    assert len(_drain(s)) == 2
    # another live worker's messages still never feed a stream that is not its own
    pool._dispatch(b"tok-1-def456", batch)
    assert _drain(s) == []


def test_the_constants_fit_together():
    # a stall long enough to lose the workers is also long enough to give grace
    assert GATEWAY_PING_TIMEOUT_S > DEAD_AFTER_S > 2 * HEARTBEAT_S


def test_metrics_read_the_pool_from_another_thread_safely(pool):
    """The metrics server scrapes from its own thread while the event loop adds and drops
    workers; iterating the live dict there failed scrapes ("dictionary changed size during
    iteration": 71 of ~25,000 collects in 2 s before the fix)."""
    import threading

    from gateway.metrics import _EngineCollector

    st = _status("tok-x")
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            k = f"tok-{i % 64}".encode()
            if pool.workers.pop(k, None) is None:
                pool.workers[k] = WorkerState(k, st, time.monotonic())
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    collector, errors, end = _EngineCollector(pool), [], time.monotonic() + 1.5
    try:
        while time.monotonic() < end:
            try:
                list(collector.collect())
            except RuntimeError as e:
                errors.append(e)
    finally:
        stop.set()
        t.join()
    assert errors == []
