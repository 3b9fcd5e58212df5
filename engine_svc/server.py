"""The engine process: the engine core's busy loop behind one ZeroMQ ROUTER socket.

Tokenizer workers connect DEALER sockets (identity = worker id) and send AddRequest /
AbortRequests / Hello. The loop is

    drain inputs (add/abort) -> engine.step() -> one StepOutputs per worker

and never touches a socket: an IO thread owns the ROUTER, hands inputs over a queue and sends
what the loop pushes through an inproc socket, plus an EngineStatus heartbeat to every worker.
A worker silent for DEAD_AFTER_S is considered gone and its requests are aborted (their blocks
freed), so a crashed worker leaks nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

import zmq

from engine_svc.config import EngineConfig
from engine_svc.core.request import FinishReason
from engine_svc.engine import LLMEngine, StepOutput
from protos.convert import params_from_proto
from protos.errors import InvalidRequestError, QueueFullError
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.transport import DEAD_AFTER_S, HEARTBEAT_S, bind

log = logging.getLogger("pagedserve.engine")

PROBE_ID = "health"  # the worker_id `pagedserve health --engine` sends

FINISH = {
    None: ipc_pb2.FINISH_NONE,
    FinishReason.STOP: ipc_pb2.FINISH_STOP,
    FinishReason.LENGTH: ipc_pb2.FINISH_LENGTH,
    FinishReason.STOP_SEQUENCE: ipc_pb2.FINISH_STOP_SEQUENCE,
    FinishReason.ABORT: ipc_pb2.FINISH_ABORT,
}


@dataclass(slots=True)
class _Owner:
    worker: bytes  # ZeroMQ identity of the worker that sent the request
    request_id: str  # the client's id (n siblings share it)
    index: int


class EngineIO(threading.Thread):
    """Owns the ROUTER socket. Inputs go to ``inbox``; ``send`` is safe from the loop thread."""

    def __init__(self, ctx: zmq.Context, address: str, status_fn) -> None:
        super().__init__(name="engine-io", daemon=True)
        self.ctx, self.address, self.status_fn = ctx, address, status_fn
        # (worker, message); message None means "this worker went silent: drop its requests"
        self.inbox: queue.SimpleQueue[tuple[bytes, ipc_pb2.WorkerToEngine | None]] = (
            queue.SimpleQueue()
        )
        self.workers: dict[bytes, float] = {}  # identity -> last time heard from
        self._out_addr = f"inproc://engine-out-{uuid.uuid4().hex}"
        self._halt = threading.Event()
        self._bound = threading.Event()
        self._local = threading.local()
        self.error: BaseException | None = None

    def start(self) -> None:
        super().start()
        self._bound.wait()
        if self.error is not None:
            raise self.error

    def send(self, worker: bytes, msg: ipc_pb2.EngineToWorker) -> None:
        push = getattr(self._local, "push", None)
        if push is None:  # one PUSH per sending thread (zmq sockets are not thread-safe)
            push = self._local.push = self.ctx.socket(zmq.PUSH)
            push.connect(self._out_addr)
        push.send_multipart([worker, msg.SerializeToString()])

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            router = self.ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            bind(router, self.address)
            pull = self.ctx.socket(zmq.PULL)
            pull.bind(self._out_addr)
        except BaseException as e:  # surfaced by start()
            self.error = e
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        next_beat = 0.0
        while not self._halt.is_set():
            wait = max(1, int((next_beat - time.monotonic()) * 1000))
            events = dict(poller.poll(timeout=wait))
            # Read before judging liveness: after a stall the workers' hellos are queued.
            if router in events:
                try:
                    self._read(router)
                except Exception:  # the IO thread must survive anything, or the engine is deaf
                    log.exception("failed to read from the workers")
            if pull in events:
                try:
                    self._forward(pull, router)
                except Exception:
                    log.exception("failed to send to the workers")
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + HEARTBEAT_S
                try:
                    self._heartbeat(router)
                except Exception:
                    log.exception("failed to send heartbeats")
        router.close()
        pull.close()

    @staticmethod
    def _forward(pull: zmq.Socket, router: zmq.Socket) -> None:
        while True:
            try:
                router.send_multipart(pull.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _read(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("dropping a malformed frame set (%d frames)", len(frames))
                continue
            ident, payload = frames
            msg = ipc_pb2.WorkerToEngine()
            try:
                msg.ParseFromString(payload)
            except Exception:
                log.warning("dropping an unparseable message from %r", ident)
                continue
            if msg.HasField("hello") and msg.hello.worker_id == PROBE_ID:
                self._send_status(router, ident)  # a health probe, not a worker: no tracking
                continue
            new = ident not in self.workers
            self.workers[ident] = time.monotonic()
            if msg.HasField("hello"):
                if new:
                    log.info("worker %s connected", _name(ident))
                self._send_status(router, ident)
            else:
                self.inbox.put((ident, msg))

    def _heartbeat(self, router: zmq.Socket) -> None:
        now = time.monotonic()
        for ident, seen in list(self.workers.items()):
            if now - seen > DEAD_AFTER_S:
                del self.workers[ident]
                log.warning("worker %s went silent: aborting its requests", _name(ident))
                self.inbox.put((ident, None))
            else:
                self._send_status(router, ident)

    def _send_status(self, router: zmq.Socket, ident: bytes) -> None:
        msg = ipc_pb2.EngineToWorker(status=self.status_fn(ident))
        router.send_multipart([ident, msg.SerializeToString()])


def _name(ident: bytes) -> str:
    """A peer's identity for the log: workers set printable ones, but a socket that sets none
    gets random bytes from ZeroMQ, which need not be UTF-8."""
    return ident.decode(errors="backslashreplace")


class EngineServer:
    """Load the model, then serve workers until ``stop()``."""

    def __init__(self, config: EngineConfig, address: str, model_id: str | None = None) -> None:
        self.config = config
        self.address = address
        self.model_id = model_id
        self.instance = uuid.uuid4().hex[:12]
        self.engine: LLMEngine | None = None
        self.info = ipc_pb2.EngineInfo()
        self.stats = ipc_pb2.EngineStats()
        self.load_error = ""
        self._owners: dict[str, _Owner] = {}  # engine sequence id -> who asked
        self._seqs_added: dict[bytes, int] = {}  # worker -> highest AddRequest.serial taken in
        self._stop = threading.Event()
        self.ctx = zmq.Context()
        self.io = EngineIO(self.ctx, address, self._status)

    # -- lifecycle -------------------------------------------------------------------------
    def serve(self) -> None:
        self.io.start()  # bound at once: workers see "loading" while the model loads
        try:
            self.engine = LLMEngine(self.config)
        except BaseException as e:
            self.load_error = f"{type(e).__name__}: {e}"
            time.sleep(2 * HEARTBEAT_S)  # let the workers hear why
            raise
        self.info = self._engine_info()
        log.info(
            "engine ready: %s, %d KV blocks of %d tokens, max_model_len %d, listening on %s",
            self.info.model_id,
            self.info.num_kv_blocks,
            self.info.block_size,
            self.info.max_model_len,
            self.address,
        )
        try:
            self._loop()
        finally:
            self.io.stop()
            self.io.join(timeout=2)
            self.ctx.destroy(linger=0)  # also closes the loop thread's PUSH socket

    def stop(self) -> None:
        self._stop.set()

    def _engine_info(self) -> ipc_pb2.EngineInfo:
        e = self.engine
        mc = e.model_config
        info = ipc_pb2.EngineInfo(
            model_id=self.model_id or mc.name or (e.model_path.name if e.model_path else "dummy"),
            architecture=mc.architecture,
            max_model_len=e.max_model_len,
            vocab_size=mc.vocab_size,
            eos_token_ids=list(mc.eos_token_ids),
            dtype=str(e.dtype).removeprefix("torch."),
            num_kv_blocks=e.block_manager.num_blocks,
            block_size=e.block_manager.block_size,
            model_path=str(e.model_path or ""),
            max_waiting=self.config.max_waiting,
        )
        if mc.bos_token_id is not None:
            info.bos_token_id = mc.bos_token_id
        return info

    def _status(self, ident: bytes = b"") -> ipc_pb2.EngineStatus:
        # Read from the IO thread: plain ints, a slightly stale view is fine.
        ready = self.engine is not None
        st = ipc_pb2.EngineStatus(
            ready=ready,
            instance=self.instance,
            error=self.load_error,
            info=self.info,
            seqs_added=self._seqs_added.get(ident, 0),
        )
        if ready:
            bm = self.engine.block_manager
            self.stats.kv_blocks_used = bm.num_used_blocks()
            self.stats.kv_blocks_cached = bm.num_cached_blocks()
            self.stats.kv_blocks_free = bm.num_free_blocks()
            self.stats.num_running = len(self.engine.scheduler.running)
            self.stats.num_waiting = len(self.engine.scheduler.waiting)
            st.stats.CopyFrom(self.stats)
        return st

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            busy = engine.has_unfinished_requests()
            self._drain(block=not busy)
            if not engine.has_unfinished_requests():
                continue
            try:
                outs = engine.step()
            except Exception:  # a bug must not take the server down: fail what was running
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all("internal error in the engine step")
                continue
            self._record_step()
            self._send_outputs(outs)

    def _drain(self, block: bool) -> None:
        inbox = self.io.inbox
        try:
            item = inbox.get(timeout=0.05) if block else inbox.get_nowait()
        except queue.Empty:
            return
        errors: dict[bytes, list[ipc_pb2.RequestError]] = {}
        while True:
            ident, msg = item
            kind = "gone" if msg is None else msg.WhichOneof("kind")
            if kind == "add":
                err = self._add(ident, msg.add)
                # Counted whether or not it was accepted: it is no longer on its way.
                taken = max(self._seqs_added.get(ident, 0), msg.add.serial)
                self._seqs_added[ident] = taken
                if err is not None:
                    errors.setdefault(ident, []).append(err)
            elif kind == "abort":
                self._abort(ident, list(msg.abort.request_ids))
            elif kind == "gone":
                self._abort_worker(ident)
            try:
                item = inbox.get_nowait()
            except queue.Empty:
                break
        for ident, errs in errors.items():
            self.io.send(ident, ipc_pb2.EngineToWorker(step=ipc_pb2.StepOutputs(errors=errs)))

    def _add(self, ident: bytes, m: ipc_pb2.AddRequest) -> ipc_pb2.RequestError | None:
        seq_prefix = _seq_id(ident, m.request_id)
        try:
            params = params_from_proto(m.params)
            reqs = self.engine.add_request(seq_prefix, list(m.prompt_token_ids), params, m.priority)
        except QueueFullError as e:
            return ipc_pb2.RequestError(
                request_id=m.request_id, code=ipc_pb2.RESOURCE_EXHAUSTED, message=str(e)
            )
        except (InvalidRequestError, ValueError) as e:
            return ipc_pb2.RequestError(
                request_id=m.request_id, code=ipc_pb2.INVALID_ARGUMENT, message=str(e)
            )
        except Exception as e:
            log.exception("adding request %s failed", m.request_id)
            return ipc_pb2.RequestError(
                request_id=m.request_id, code=ipc_pb2.INTERNAL, message=f"{type(e).__name__}: {e}"
            )
        for i, r in enumerate(reqs):
            self._owners[r.request_id] = _Owner(ident, m.request_id, i)
        self.stats.prompt_tokens_total += len(m.prompt_token_ids) * len(reqs)
        return None

    def _abort(self, ident: bytes, request_ids: list[str]) -> None:
        # Unknown or finished ids are a no-op: an abort may overtake nothing or arrive late.
        aborted = self.engine.abort_request([_seq_id(ident, rid) for rid in request_ids])
        for r in aborted:
            self._owners.pop(r.request_id, None)

    def _abort_worker(self, ident: bytes) -> None:
        ids = [sid for sid, o in self._owners.items() if o.worker == ident]
        self.engine.abort_request(ids)
        errs = {}
        for sid in ids:
            o = self._owners.pop(sid)
            errs[o.request_id] = ipc_pb2.RequestError(
                request_id=o.request_id,
                code=ipc_pb2.UNAVAILABLE,
                message="the engine lost contact with the tokenizer worker",
            )
        if errs:  # a worker that is only slow hears why; a dead one's messages are dropped
            step = ipc_pb2.StepOutputs(errors=list(errs.values()))
            self.io.send(ident, ipc_pb2.EngineToWorker(step=step))

    def _fail_all(self, message: str) -> None:
        errors: dict[bytes, list[ipc_pb2.RequestError]] = {}
        ids = list(self._owners)
        # Everything the scheduler holds, owned or not, so a broken request cannot fail again.
        self.engine.abort_request(list(self.engine.scheduler.requests))
        seen = set()
        for sid in ids:
            o = self._owners.pop(sid)
            if (o.worker, o.request_id) in seen:
                continue
            seen.add((o.worker, o.request_id))
            errors.setdefault(o.worker, []).append(
                ipc_pb2.RequestError(
                    request_id=o.request_id, code=ipc_pb2.INTERNAL, message=message
                )
            )
        for ident, errs in errors.items():
            self.io.send(ident, ipc_pb2.EngineToWorker(step=ipc_pb2.StepOutputs(errors=errs)))

    def _record_step(self) -> None:
        last = self.engine.last_step
        s = self.stats
        s.steps += 1
        s.last_step_num_seqs = last.num_seqs
        s.max_step_num_seqs = max(s.max_step_num_seqs, last.num_seqs)
        s.preemptions_total += last.num_preempted
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step %d: %d seqs, %d tokens", s.steps, last.num_seqs, last.num_tokens)

    def _send_outputs(self, outs: list[StepOutput]) -> None:
        batches: dict[bytes, ipc_pb2.StepOutputs] = {}
        n_seqs = self.engine.last_step.num_seqs
        for o in outs:
            owner = self._owners.get(o.request_id)
            if owner is None:
                continue
            batch = batches.get(owner.worker)
            if batch is None:
                batch = batches[owner.worker] = ipc_pb2.StepOutputs(step_num_seqs=n_seqs)
            batch.outputs.append(self._seq_output(o, owner))
            self.stats.generation_tokens_total += len(o.new_token_ids)
            if o.finish_reason is not None:
                del self._owners[o.request_id]
                self.stats.requests_finished_total += 1
                self.stats.cached_tokens_total += max(o.request.num_cached_tokens, 0)
        for ident, batch in batches.items():
            self.io.send(ident, ipc_pb2.EngineToWorker(step=batch))

    @staticmethod
    def _seq_output(o: StepOutput, owner: _Owner) -> ipc_pb2.SeqOutput:
        r = o.request
        out = ipc_pb2.SeqOutput(
            request_id=owner.request_id,
            index=owner.index,
            token_ids=o.new_token_ids,
            finish_reason=FINISH[o.finish_reason],
            prompt_tokens=r.num_prompt_tokens,
            completion_tokens=len(r.output_token_ids),
            cached_tokens=max(r.num_cached_tokens, 0),
        )
        if len(r.output_token_ids) == len(o.new_token_ids) and r.first_scheduled_time:
            out.queue_ms = (r.first_scheduled_time - r.arrival_time) * 1000.0
            if r.first_token_time is not None:
                out.prefill_ms = (r.first_token_time - r.first_scheduled_time) * 1000.0
        if r.params.logprobs is not None and r.logprobs:
            lp = out.logprobs.add(token_id=o.new_token_ids[-1], logprob=r.logprobs[-1])
            for tok, v in r.top_logprobs[-1]:
                lp.top.add(token_id=tok, logprob=v)
        if o.finish_reason is FinishReason.STOP and r.stop_token_id is not None:
            out.stop_token_id = r.stop_token_id
        return out


def _seq_id(worker: bytes, request_id: str) -> str:
    # Client ids are only unique per worker (and only while in flight): scope them.
    # Undecodable bytes are escaped, not all merged into one replacement character.
    return f"{_name(worker)}/{request_id}"
