"""The engine's ZeroMQ thread (``engine_svc.server.EngineIO``) over real sockets, without a
model: whatever a peer sends, the thread keeps reading and keeps sending heartbeats."""

from __future__ import annotations

import time

import pytest
import zmq

from engine_svc import server
from protos.pagedserve.internal.v1 import ipc_pb2


@pytest.fixture
def engine_io(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "DEAD_AFTER_S", 0.3)  # silent peers are written off quickly
    ctx = zmq.Context()
    io = server.EngineIO(ctx, f"ipc://{tmp_path}/engine.sock", lambda ident: ipc_pb2.EngineStatus())
    io.daemon = True
    io.start()
    yield io, ctx
    io.stop()
    io.join(timeout=5)
    ctx.destroy(linger=0)


def _dealer(ctx: zmq.Context, io: server.EngineIO, identity: bytes | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(io.address)
    return sock


def test_a_peer_without_identity_that_goes_silent_does_not_stop_the_thread(engine_io):
    """A socket that sets no identity gets random bytes from ZeroMQ (often not UTF-8); once it
    has sent one message and gone quiet, writing it off must not kill the thread."""
    io, ctx = engine_io
    strangers = [_dealer(ctx, io, None) for _ in range(8)]  # 8 random identities: some not UTF-8
    for s in strangers:
        s.send(b"")  # parses as an empty WorkerToEngine
    time.sleep(1.0)  # past DEAD_AFTER_S: every stranger is written off
    assert io.is_alive()
    gone = []
    while not io.inbox.empty():
        ident, msg = io.inbox.get()
        if msg is None:
            gone.append(ident)
    assert len(gone) == len(strangers)
    worker = _dealer(ctx, io, b"worker-1")
    hello = ipc_pb2.WorkerToEngine(hello=ipc_pb2.Hello(worker_id="w")).SerializeToString()
    for _ in range(3):  # answered every time (a worker silent for 0.3 s is written off here)
        worker.send(hello)
        assert worker.poll(2000), "the engine thread no longer answers"
        assert ipc_pb2.EngineToWorker.FromString(worker.recv()).HasField("status")
        time.sleep(0.6)  # past a heartbeat, and past the write-off of the strangers again
    assert io.is_alive()


def test_seq_ids_of_undecodable_identities_stay_apart():
    assert server._seq_id(b"\x8a\x01", "r") != server._seq_id(b"\x8b\x01", "r")
