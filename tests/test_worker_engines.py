"""A tokenizer worker with two engines, driven over real ZeroMQ sockets: the test binds the
gateway's and both engines' ROUTER sockets and plays their parts with real protobuf messages,
while ``Worker.run()`` runs in a thread. This reaches the cases an end-to-end stack cannot
force: an engine with another model, an engine going silent with a request on it, engines
going stale while a prompt is tokenized, and a status that arrives before the engine has read
what the worker sent."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import zmq

from engine_svc.models.fetch import fetch_default_model
from protos.pagedserve.internal.v1 import ipc_pb2
from tokenizer_svc import routing
from tokenizer_svc.routing import BALANCE_SLACK, prefix_chain, route
from tokenizer_svc.worker import Worker

IDENT = b"tok-test"
BLOCK = 16


class Rig:
    def __init__(self, tmp, model_dir: str) -> None:
        self.ctx = zmq.Context()
        self.model_dir = model_dir
        self.gw = self._router(f"ipc://{tmp}/gw.sock")
        self.engines = [self._router(f"ipc://{tmp}/engine-{k}.sock") for k in range(2)]
        self.worker = Worker(
            IDENT.decode(), f"ipc://{tmp}/gw.sock", [f"ipc://{tmp}/engine-{k}.sock" for k in (0, 1)]
        )
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.instances = ["a0", "b0"]

    def _router(self, address: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(address)
        return s

    def close(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=5)
        self.ctx.destroy(linger=0)

    # -- playing the engines --------------------------------------------------------------
    def status(self, k: int, model_id: str = "smol", seqs_added: int = 0, running: int = 0):
        info = ipc_pb2.EngineInfo(
            model_id=model_id,
            max_model_len=2048,
            vocab_size=49152,
            eos_token_ids=[2],
            block_size=BLOCK,
            model_path=self.model_dir,
            max_waiting=100,
        )
        st = ipc_pb2.EngineStatus(
            ready=True,
            instance=self.instances[k],
            info=info,
            stats=ipc_pb2.EngineStats(num_running=running),
            seqs_added=seqs_added,
        )
        self.engines[k].send_multipart(
            [IDENT, ipc_pb2.EngineToWorker(status=st).SerializeToString()]
        )

    def engine_msgs(self, k: int, kind: str, wait: float = 1.0) -> list:
        """Messages of ``kind`` ("add", "abort") the worker sent engine k within ``wait``."""
        out, end = [], time.monotonic() + wait
        while (left := end - time.monotonic()) > 0:
            if not self.engines[k].poll(int(left * 1000)):
                break
            _, payload = self.engines[k].recv_multipart()
            msg = ipc_pb2.WorkerToEngine.FromString(payload)
            if msg.WhichOneof("kind") == kind:
                out.append(getattr(msg, kind))
        return out

    def wait_ready(self, *ks: int) -> None:
        """Answer the worker's hellos until it has heard from engines ``ks``."""
        for k in ks:
            self.engines[k].recv_multipart()  # the first hello: the worker is connected
            self.status(k)
        end = time.monotonic() + 30
        while not all(self.worker.engines[k].ready for k in ks):
            assert time.monotonic() < end, "the worker never took the engines' status"
            time.sleep(0.05)

    # -- playing the gateway --------------------------------------------------------------
    def generate(self, rid: str, ids: list[int]) -> None:
        req = ipc_pb2.TextRequest(
            request_id=rid,
            token_ids=ipc_pb2.PromptIds(ids=ids),
            params=ipc_pb2.SamplingParams(max_tokens=4),
        )
        msg = ipc_pb2.GatewayToWorker(generate=req)
        self.gw.send_multipart([IDENT, msg.SerializeToString()])

    def gateway_msgs(self, kind: str, wait: float) -> list:
        out, end = [], time.monotonic() + wait
        while (left := end - time.monotonic()) > 0:
            if not self.gw.poll(int(left * 1000)):
                break
            _, payload = self.gw.recv_multipart()
            msg = ipc_pb2.WorkerToGateway.FromString(payload)
            if msg.WhichOneof("kind") == kind:
                out.append(getattr(msg, kind))
        return out


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(fetch_default_model(progress=False))


# The tests about engines falling silent keep the real DEAD_AFTER_S.
SILENCE_TESTS = {"test_requests_of_a_silent_engine_move_on_and_are_aborted_there"}


@pytest.fixture()
def rig(tmp_path, model_dir, request, monkeypatch):
    # The fake engines report only when a test says so. On a loaded machine the worker's
    # thread can go without CPU for longer than DEAD_AFTER_S between two of those reports,
    # find an engine silent and move its requests (seen failing under stress-ng --cpu 2), so
    # every other test gives the engines a minute.
    if request.function.__name__ not in SILENCE_TESTS:
        monkeypatch.setattr(routing, "DEAD_AFTER_S", 60.0)
    r = Rig(tmp_path, model_dir)
    yield r
    r.close()


def _prompt(rng: random.Random, blocks: int = 3) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(blocks * BLOCK)]


def test_load_keeps_what_the_engine_has_not_taken_in_yet(rig):
    """A status counts only what the engine had read then: sequences the worker sent after
    (or that wait in the engine's inbox during a long step) still count as its load."""
    rig.wait_ready(0, 1)
    shared = _prompt(random.Random(1))
    for i in range(BALANCE_SLACK + 1):  # one prefix: affinity keeps them on one engine
        rig.generate(f"r{i}", shared + [i + 1])
    adds = [rig.engine_msgs(k, "add") for k in (0, 1)]
    k = 0 if adds[0] else 1
    assert len(adds[k]) == BALANCE_SLACK + 1 and not adds[1 - k]
    # The engine has read 3 of them when it reports: 3 running, 6 still on their way.
    rig.status(k, seqs_added=3, running=3)
    rig.status(1 - k)
    time.sleep(0.3)
    assert rig.worker.engines[k].load == BALANCE_SLACK + 1
    # So the next request with that prefix goes to the other engine: the margin is exceeded.
    rig.generate("next", shared + [99])
    assert len(rig.engine_msgs(1 - k, "add")) == 1 and not rig.engine_msgs(k, "add", 0.2)
    # Once the engine has taken them all in, its own count is the load.
    rig.status(k, seqs_added=BALANCE_SLACK + 1, running=2)
    time.sleep(0.3)
    assert rig.worker.engines[k].load == 2
    # Engine k restarts, and its new process takes in 3 Adds that were queued for the old
    # one (the worker aborts them there): they are not load. A request sent after the
    # restart is, until the new process reports it taken in.
    rig.instances[k] = "restarted"
    rig.status(k, seqs_added=3)
    rig.status(1 - k)
    time.sleep(0.3)
    assert rig.worker.engines[k].load == 0
    links = rig.worker.engines
    rng = random.Random(11)
    while route(links, prefix_chain(p := _prompt(rng), BLOCK)) is not links[k]:
        pass
    rig.generate("after", p)
    assert len(rig.engine_msgs(k, "add")) == 1
    assert rig.worker.engines[k].load == 1


def test_an_engine_serving_another_model_is_not_used(rig):
    rig.wait_ready(0)
    rig.engines[1].recv_multipart()
    rig.status(1, model_id="other-model")
    time.sleep(0.3)
    rng = random.Random(2)
    for i in range(6):
        rig.generate(f"r{i}", _prompt(rng))
    assert len(rig.engine_msgs(0, "add")) == 6 and not rig.engine_msgs(1, "add", 0.2)
    rig.status(0)  # fresh, so the worker still counts engine 0 in when it reports
    st = rig.gateway_msgs("status", 0.7)[-1]
    assert [e.ready for e in st.engines] == [True, False]
    assert "serves 'other-model'" in st.engines[1].error
    assert "tokenizer is for 'smol'" in st.engines[1].error
    # Restarted with the right model, it takes requests again.
    rig.instances[1] = "b1"
    rig.status(1)
    time.sleep(0.3)
    assert rig.worker.engines[1].ready


def test_requests_of_a_silent_engine_move_on_and_are_aborted_there(rig):
    """Engine 0 stops answering with a request that has streamed nothing: after 3 s the worker
    sends it to engine 1 under a new id and aborts the old id on engine 0 (a stalled engine
    might run on; Adds queued for a dead one reach its restarted process)."""
    rig.wait_ready(0, 1)
    # A prompt the worker sends to engine 0 (routing is deterministic: see route()).
    links = [e for e in rig.worker.engines]
    rng = random.Random(3)
    while True:
        prompt = _prompt(rng)
        if route(links, prefix_chain(prompt, BLOCK)) is links[0]:
            break
    rig.status(0)
    rig.status(1)
    time.sleep(0.2)
    rig.generate("r", prompt)
    add = rig.engine_msgs(0, "add", 2.0)
    assert len(add) == 1, "the request did not go to engine 0"
    old = add[0]
    end = time.monotonic() + 6  # engine 1 keeps answering; engine 0 is silent
    moved, aborted = [], []
    while time.monotonic() < end and not (moved and aborted):
        rig.status(1)
        moved += rig.engine_msgs(1, "add", 0.25)
        aborted += rig.engine_msgs(0, "abort", 0.25)
    assert len(moved) == 1, "the request did not move to engine 1"
    assert moved[0].prompt_token_ids == old.prompt_token_ids
    assert moved[0].request_id != old.request_id
    assert [list(a.request_ids) for a in aborted] == [[old.request_id]]
    assert not [e for b in rig.gateway_msgs("batch", 0.3) for e in b.errors]  # no failure


def test_engines_going_stale_while_tokenizing_fail_the_request_instead_of_losing_it(rig):
    rig.wait_ready(0, 1)
    encode = rig.worker._encode

    def slow_encode(*args):  # both engines fall silent while this prompt is tokenized
        for e in rig.worker.engines:
            e.seen = float("-inf")
        return encode(*args)

    rig.worker._encode = slow_encode
    rig.generate("r", _prompt(random.Random(4)))
    errors = [e for b in rig.gateway_msgs("batch", 2.0) for e in b.errors]
    assert [(e.request_id, e.code) for e in errors] == [("r", ipc_pb2.UNAVAILABLE)]
    assert "stopped answering" in errors[0].message
    assert rig.worker.active == {}


def test_a_full_replica_passes_the_request_to_another_once(rig):
    """An engine whose waiting queue is full refuses an Add with RESOURCE_EXHAUSTED: the
    worker tries the other replica, and fails the request only when every one refused."""
    rig.wait_ready(0, 1)
    rig.generate("r", _prompt(random.Random(5)))
    adds = {k: rig.engine_msgs(k, "add", 0.5) for k in (0, 1)}
    first = 0 if adds[0] else 1
    assert len(adds[first]) == 1 and not adds[1 - first]
    full = ipc_pb2.StepOutputs(
        errors=[ipc_pb2.RequestError(code=ipc_pb2.RESOURCE_EXHAUSTED, message="queue is full")]
    )

    def refuse(k: int, add) -> None:
        full.errors[0].request_id = add.request_id
        rig.engines[k].send_multipart(
            [IDENT, ipc_pb2.EngineToWorker(step=full).SerializeToString()]
        )

    rig.status(0)
    rig.status(1)
    refuse(first, adds[first][0])
    [moved] = rig.engine_msgs(1 - first, "add", 1.0)
    assert not [e for b in rig.gateway_msgs("batch", 0.3) for e in b.errors]
    refuse(1 - first, moved)  # the other one is full too: no third try, the client is told
    errors = [e for b in rig.gateway_msgs("batch", 1.0) for e in b.errors]
    assert [(e.request_id, e.code) for e in errors] == [("r", ipc_pb2.RESOURCE_EXHAUSTED)]
    assert not rig.engine_msgs(first, "add", 0.3)
    assert rig.worker.active == {}


def test_a_sibling_stopped_by_a_stop_string_leaves_the_others_running(rig, model_dir):
    """n=2: index 0 meets a stop string; the engine, which has not read the abort yet, sends
    one more output for it. Only that sibling is aborted again; index 1 streams to its end."""
    from engine_svc.models.tokenizer import Tokenizer

    rig.wait_ready(0, 1)
    tok = Tokenizer(Path(model_dir))
    world, other = tok.encode(" world"), tok.encode(" there")
    req = ipc_pb2.TextRequest(request_id="r", token_ids=ipc_pb2.PromptIds(ids=[1000] * 20),
                              params=ipc_pb2.SamplingParams(max_tokens=4, n=2), stop=["world"])  # fmt: skip
    rig.gw.send_multipart([IDENT, ipc_pb2.GatewayToWorker(generate=req).SerializeToString()])
    adds = {k: rig.engine_msgs(k, "add", wait=1.0) for k in (0, 1)}
    (k, [add]) = next((k, v) for k, v in adds.items() if v)
    eid = add.request_id

    def step(*outs) -> None:
        rig.status(0)  # both engines stay alive (3 s of silence fails their requests)
        rig.status(1)
        msg = ipc_pb2.StepOutputs(outputs=[ipc_pb2.SeqOutput(request_id=eid, **o) for o in outs])
        rig.engines[k].send_multipart([IDENT, ipc_pb2.EngineToWorker(step=msg).SerializeToString()])

    step(dict(index=0, token_ids=world), dict(index=1, token_ids=other))
    assert [a.request_ids for a in rig.engine_msgs(k, "abort")] == [[f"{eid}#0"]]
    step(dict(index=0, token_ids=other), dict(index=1, token_ids=other))  # 0: already stopped
    aborts = [list(a.request_ids) for a in rig.engine_msgs(k, "abort")]
    assert aborts == [[f"{eid}#0"]], aborts  # never the parent id: index 1 is alive
    step(dict(index=1, token_ids=other, finish_reason=ipc_pb2.FINISH_LENGTH, completion_tokens=3))
    deltas = [d for b in rig.gateway_msgs("batch", wait=1.0) for d in b.deltas]
    finals = {d.index: d.finish_reason for d in deltas if d.finish_reason}
    assert finals == {0: ipc_pb2.FINISH_STOP_SEQUENCE, 1: ipc_pb2.FINISH_LENGTH}
    assert not rig.worker.active  # nothing left behind


def test_stop_strings_wait_for_min_tokens_in_the_worker(rig, model_dir):
    """The worker hands min_tokens to its detokenizers: " world" as the first of min_tokens=2
    tokens does not stop the sequence; as the second it does."""
    from engine_svc.models.tokenizer import Tokenizer

    rig.wait_ready(0, 1)
    world = Tokenizer(Path(model_dir)).encode(" world")
    req = ipc_pb2.TextRequest(request_id="m", token_ids=ipc_pb2.PromptIds(ids=[1000] * 20),
                              params=ipc_pb2.SamplingParams(max_tokens=4, min_tokens=2),
                              stop=["world"])  # fmt: skip
    rig.gw.send_multipart([IDENT, ipc_pb2.GatewayToWorker(generate=req).SerializeToString()])
    adds = {k: rig.engine_msgs(k, "add", wait=1.0) for k in (0, 1)}
    k, [add] = next((k, v) for k, v in adds.items() if v)
    for _ in range(2):
        rig.status(0)
        rig.status(1)
        out = ipc_pb2.SeqOutput(request_id=add.request_id, index=0, token_ids=world)
        step = ipc_pb2.StepOutputs(outputs=[out])
        rig.engines[k].send_multipart(
            [IDENT, ipc_pb2.EngineToWorker(step=step).SerializeToString()]
        )
    deltas = [d for b in rig.gateway_msgs("batch", wait=1.0) for d in b.deltas]
    assert [d.finish_reason for d in deltas] == [ipc_pb2.FINISH_NONE, ipc_pb2.FINISH_STOP_SEQUENCE]
    assert "".join(d.text for d in deltas) == " world "
