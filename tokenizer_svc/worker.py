"""One tokenizer/detokenizer worker: text in from the gateway, token ids to the engine, and
each engine step's new tokens back out as text deltas (UTF-8 safe, stop strings applied).

A request stays on one worker for its whole life, so its incremental detokenizer and
stop-string state live here. The worker connects one DEALER to the gateway and one to the
engine (identity = worker id) and runs a single-threaded poll loop: tokenizing is fast and
the GIL would serialize threads anyway.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine_svc.errors import InvalidRequestError, PagedServeError
from engine_svc.tokenizer import Tokenizer
from pagedserve.ipc import DEAD_AFTER_S, GATEWAY_PING_S, GATEWAY_PING_TIMEOUT_S, HEARTBEAT_S
from protos.pagedserve.internal.v1 import ipc_pb2
from tokenizer_svc.detokenizer import IncrementalDetokenizer

log = logging.getLogger("pagedserve.tokenizer")


@dataclass(slots=True)
class _Seq:
    detok: IncrementalDetokenizer
    engine_id: str  # the id the engine knows this sequence by (engine_rid, or engine_rid#i)
    finished: bool = False
    sent_first: bool = False


@dataclass(slots=True)
class _Active:
    request: ipc_pb2.TextRequest
    prompt_ids: list[int]
    engine_rid: str  # unique per Add, so a reused client id never sees a late old output
    seqs: list[_Seq] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)


class Worker:
    def __init__(
        self,
        worker_id: str,
        gateway_address: str,
        engine_address: str,
        tokenizer_path: str | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.ident = worker_id.encode()
        self.gateway_address, self.engine_address = gateway_address, engine_address
        self.tokenizer_path = tokenizer_path  # None: the path the engine reports
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_error = ""
        self.engine_status: ipc_pb2.EngineStatus | None = None
        self.engine_seen = 0.0
        self.active: dict[str, _Active] = {}  # by the client's request id
        self.by_engine: dict[str, str] = {}  # engine_rid -> client request id
        self._serial = itertools.count()
        self._chat_stop_ids: list[int] = []
        self._stop = False

    # -- sockets ---------------------------------------------------------------------------
    def run(self) -> None:
        ctx = zmq.Context()
        # ZMTP pings (answered by the gateway's ZeroMQ I/O thread, not its event loop): a
        # gateway that stops running, or whose host vanishes without closing the connection,
        # counts as gone too.
        self.gw = self._dealer(
            ctx,
            self.gateway_address,
            ping_ms=int(GATEWAY_PING_S * 1000),
            ping_timeout_ms=int(GATEWAY_PING_TIMEOUT_S * 1000),
        )
        self.eng = self._dealer(ctx, self.engine_address)
        # The gateway's connection dropping means the gateway is gone (crashed, or restarted
        # by the supervisor): nobody will read its requests' streams any more.
        gw_events = self.gw.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(self.gw, zmq.POLLIN)
        poller.register(self.eng, zmq.POLLIN)
        poller.register(gw_events, zmq.POLLIN)
        next_beat = 0.0
        log.info("worker %s: gateway %s, engine %s", self.worker_id, *self._addrs())
        try:
            while not self._stop:
                wait = max(1, int((next_beat - time.monotonic()) * 1000))
                events = dict(poller.poll(timeout=wait))
                # Read before judging liveness: after a stall the engine's status is queued.
                if self.eng in events:
                    self._drain(self.eng, ipc_pb2.EngineToWorker, self._on_engine)
                # A disconnect first: messages already read from a reconnected gateway are new.
                if gw_events in events:
                    self._on_gateway_events(gw_events)
                if self.gw in events:
                    self._drain(self.gw, ipc_pb2.GatewayToWorker, self._on_gateway)
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(now)
                    next_beat = now + HEARTBEAT_S
        finally:
            self.gw.disable_monitor()
            gw_events.close(0)
            self.gw.close(0)
            self.eng.close(0)
            ctx.term()

    def stop(self) -> None:
        self._stop = True

    def _addrs(self) -> tuple[str, str]:
        return self.gateway_address, self.engine_address

    def _dealer(
        self, ctx: zmq.Context, address: str, ping_ms: int = 0, ping_timeout_ms: int = 0
    ) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, self.ident)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if ping_ms:  # options apply to connections made after they are set
            s.setsockopt(zmq.HEARTBEAT_IVL, ping_ms)
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, ping_timeout_ms)
        s.connect(address)
        return s

    @staticmethod
    def _drain(sock: zmq.Socket, cls, handler) -> None:
        while True:
            try:
                payload = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = cls()
            try:
                msg.ParseFromString(payload)
            except Exception:
                log.warning("dropping an unparseable %s", cls.__name__)
                continue
            try:
                handler(msg)
            except Exception:  # a bug must not take the worker (and its streams) down
                log.exception("failed to handle a %s", cls.__name__)

    def _send_gateway(self, msg: ipc_pb2.WorkerToGateway, block: bool = True) -> None:
        try:
            self.gw.send(msg.SerializeToString(), 0 if block else zmq.NOBLOCK)
        except zmq.Again:
            pass  # a heartbeat while the gateway is away: the next one will do

    def _send_engine(self, msg: ipc_pb2.WorkerToEngine, block: bool = True) -> None:
        try:
            self.eng.send(msg.SerializeToString(), 0 if block else zmq.NOBLOCK)
        except zmq.Again:
            pass

    # -- status ----------------------------------------------------------------------------
    @property
    def engine_ready(self) -> bool:
        return (
            self.engine_status is not None
            and self.engine_status.ready
            and time.monotonic() - self.engine_seen < DEAD_AFTER_S
        )

    @property
    def ready(self) -> bool:
        return self.engine_ready and self.tokenizer is not None

    def _heartbeat(self, now: float) -> None:
        self._send_engine(
            ipc_pb2.WorkerToEngine(hello=ipc_pb2.Hello(worker_id=self.worker_id)), False
        )
        if self.engine_status is not None and not self.engine_ready and self.active:
            self._fail_all(ipc_pb2.UNAVAILABLE, "the engine stopped answering")
        st = ipc_pb2.WorkerStatus(
            worker_id=self.worker_id,
            tokenizer_ready=self.tokenizer is not None,
            engine_ready=self.engine_ready,
            num_active=len(self.active),
            has_chat_template=bool(self.tokenizer is not None and self.tokenizer.chat_template),
        )
        if self.engine_status is not None:
            st.engine.CopyFrom(self.engine_status.info)
            st.stats.CopyFrom(self.engine_status.stats)
            st.engine_instance = self.engine_status.instance
        self._send_gateway(ipc_pb2.WorkerToGateway(status=st), False)

    def _on_engine_status(self, st: ipc_pb2.EngineStatus) -> None:
        old = self.engine_status
        if old is not None and old.instance != st.instance and self.active:
            # A new engine process knows nothing of what the old one was running.
            self._fail_all(ipc_pb2.UNAVAILABLE, "the engine restarted")
        self.engine_status = st
        self.engine_seen = time.monotonic()
        if st.ready and self.tokenizer is None and not self.tokenizer_error:
            self._load_tokenizer(self.tokenizer_path or st.info.model_path)

    def _load_tokenizer(self, path: str) -> None:
        try:
            self.tokenizer = Tokenizer(Path(path))
        except (PagedServeError, OSError, ValueError) as e:
            self.tokenizer_error = str(e)
            log.error("worker %s cannot load the tokenizer: %s", self.worker_id, e)
            return
        self._chat_stop_ids = self.tokenizer.chat_stop_token_ids()
        log.info("worker %s: tokenizer loaded from %s", self.worker_id, path)

    # -- engine -> worker ------------------------------------------------------------------
    def _on_engine(self, msg: ipc_pb2.EngineToWorker) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "status":
            self._on_engine_status(msg.status)
        elif kind == "step":
            self._on_step(msg.step)

    def _lookup(self, engine_rid: str) -> _Active | None:
        act = self.active.get(self.by_engine.get(engine_rid, ""))
        return act if act is not None and act.engine_rid == engine_rid else None

    def _forget(self, act: _Active) -> None:
        self.active.pop(act.request.request_id, None)
        self.by_engine.pop(act.engine_rid, None)

    def _on_step(self, step: ipc_pb2.StepOutputs) -> None:
        batch = ipc_pb2.WorkerBatch()
        for err in step.errors:
            act = self._lookup(err.request_id)
            if act is not None:
                self._forget(act)
                rid = act.request.request_id
                batch.errors.add(request_id=rid, code=err.code, message=err.message)
        stale: list[str] = []
        for out in step.outputs:
            act = self._lookup(out.request_id)
            if act is None or out.index >= len(act.seqs) or act.seqs[out.index].finished:
                # Not ours any more (aborted, stopped): make sure the engine drops it too.
                stale.append(out.request_id)  # the engine expands a parent id to its siblings
                continue
            try:
                batch.deltas.append(self._delta(act, out))
            except Exception as e:  # fail this request, not the whole step
                log.exception("detokenizing %s failed", act.request.request_id)
                self._forget(act)
                stale.append(out.request_id)
                batch.errors.add(
                    request_id=act.request.request_id,
                    code=ipc_pb2.INTERNAL,
                    message=f"detokenizer error: {type(e).__name__}: {e}",
                )
                continue
            if act.done:
                self._forget(act)
        if stale:
            self._send_engine(
                ipc_pb2.WorkerToEngine(abort=ipc_pb2.AbortRequests(request_ids=stale))
            )
        if batch.deltas or batch.errors:
            self._send_gateway(ipc_pb2.WorkerToGateway(batch=batch))

    def _delta(self, act: _Active, out: ipc_pb2.SeqOutput) -> ipc_pb2.TextDelta:
        req = act.request
        seq = act.seqs[out.index]
        d = ipc_pb2.TextDelta(request_id=req.request_id, index=out.index)
        text = seq.detok.add(list(out.token_ids))
        if not seq.sent_first:
            seq.sent_first = True
            d.queue_ms = out.queue_ms
            d.prompt_tokens = out.prompt_tokens
            if req.echo:
                text = self.tokenizer.decode(act.prompt_ids, req.skip_special_tokens) + text
        d.token_ids.extend(out.token_ids)
        for lp in out.logprobs:
            tl = d.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
            for t in lp.top:
                tl.top.add(
                    token_id=t.token_id, logprob=t.logprob, token=self._token_text(t.token_id)
                )
        finish = out.finish_reason
        if seq.detok.stopped:
            finish = ipc_pb2.FINISH_STOP_SEQUENCE
            d.stop_str = seq.detok.matched_stop or ""
            if out.finish_reason == ipc_pb2.FINISH_NONE:  # the engine would go on: stop it
                self._send_engine(
                    ipc_pb2.WorkerToEngine(abort=ipc_pb2.AbortRequests(request_ids=[seq.engine_id]))
                )
        elif finish != ipc_pb2.FINISH_NONE:
            text += seq.detok.finish()
            if seq.detok.stopped:  # the flush completed a stop string (held-back bytes)
                finish = ipc_pb2.FINISH_STOP_SEQUENCE
                d.stop_str = seq.detok.matched_stop or ""
            elif out.HasField("stop_token_id"):
                d.stop_token_id = out.stop_token_id
        d.text = text
        if finish != ipc_pb2.FINISH_NONE:
            seq.finished = True
            d.finish_reason = finish
            d.prompt_tokens = out.prompt_tokens
            d.completion_tokens = out.completion_tokens
            d.cached_tokens = out.cached_tokens
            if req.return_prompt_token_ids:
                d.prompt_token_ids.extend(act.prompt_ids)
        return d

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    # -- gateway -> worker -----------------------------------------------------------------
    def _on_gateway(self, msg: ipc_pb2.GatewayToWorker) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "generate":
            self._on_generate(msg.generate)
        elif kind == "abort":
            self._abort(msg.abort.request_ids)
        elif kind == "tokenize":
            self._send_gateway(ipc_pb2.WorkerToGateway(tokenize=self._tokenize(msg.tokenize)))

    def _abort(self, request_ids) -> None:
        """Stop these requests in the engine and forget them (no reply to anyone)."""
        ids = []
        for rid in request_ids:
            act = self.active.get(rid)
            if act is not None:
                self._forget(act)
                ids.extend(s.engine_id for s in act.seqs if not s.finished)
        if ids:
            self._send_engine(ipc_pb2.WorkerToEngine(abort=ipc_pb2.AbortRequests(request_ids=ids)))

    def _on_gateway_events(self, sock: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self.active:
                log.warning(
                    "worker %s: the gateway went away; aborting its %d requests",
                    self.worker_id,
                    len(self.active),
                )
                ids = [s.engine_id for a in self.active.values() for s in a.seqs if not s.finished]
                if ids:
                    self._send_engine(
                        ipc_pb2.WorkerToEngine(abort=ipc_pb2.AbortRequests(request_ids=ids))
                    )
                # Queued for whichever gateway connects next: a new one ignores ids it does
                # not know; the same one after a dropped connection fails the streams it holds.
                self._fail_all(
                    ipc_pb2.UNAVAILABLE,
                    "the tokenizer worker lost its connection to the gateway",
                    block=False,
                )

    def _on_generate(self, req: ipc_pb2.TextRequest) -> None:
        rid = req.request_id
        try:
            if not self.ready:
                raise _Unavailable("the engine or tokenizer is not ready")
            if rid in self.active:
                raise InvalidRequestError(f"request id {rid!r} is already in flight")
            ids, params = self._encode(req)
            erid = f"{rid}@{next(self._serial)}"
            act = _Active(req, ids, erid)
            n = params.n or 1
            for i in range(n):
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    ids,
                    skip_special_tokens=req.skip_special_tokens,
                    stop=list(req.stop),
                    include_stop_str_in_output=req.include_stop_str_in_output,
                )
                act.seqs.append(_Seq(detok, erid if n == 1 else f"{erid}#{i}"))
        except _Unavailable as e:
            return self._error(rid, ipc_pb2.UNAVAILABLE, str(e))
        except InvalidRequestError as e:
            return self._error(rid, ipc_pb2.INVALID_ARGUMENT, str(e))
        except Exception as e:  # e.g. a chat template that fails in an unexpected way
            log.exception("request %s failed in the tokenizer", rid)
            return self._error(rid, ipc_pb2.INTERNAL, f"tokenizer error: {type(e).__name__}: {e}")
        self.active[rid] = act
        self.by_engine[erid] = rid
        add = ipc_pb2.AddRequest(
            request_id=erid, prompt_token_ids=ids, params=params, priority=req.priority
        )
        self._send_engine(ipc_pb2.WorkerToEngine(add=add))

    def _encode(self, req: ipc_pb2.TextRequest) -> tuple[list[int], ipc_pb2.SamplingParams]:
        tok = self.tokenizer
        params = ipc_pb2.SamplingParams()
        params.CopyFrom(req.params)
        kind = req.WhichOneof("prompt")
        if kind == "text":
            ids = tok.encode(req.text, add_special_tokens=req.add_special_tokens)
        elif kind == "token_ids":
            ids = list(req.token_ids.ids)
        elif kind == "chat":
            text = tok.apply_chat_template(
                _messages(req.chat), add_generation_prompt=req.chat.add_generation_prompt
            )
            ids = tok.encode(text, add_special_tokens=False)
            # The template's end-of-turn token ends the reply even when it is not the EOS.
            extra = [i for i in self._chat_stop_ids if i not in params.stop_token_ids]
            params.stop_token_ids.extend(extra)
        else:
            raise InvalidRequestError("the request has no prompt")
        room = self._check_length(ids, params)
        if not params.HasField("max_tokens") and req.default_max_tokens:
            params.max_tokens = min(max(req.default_max_tokens, params.min_tokens), room)
        return ids, params

    def _check_length(self, ids: list[int], params: ipc_pb2.SamplingParams) -> int:
        """Raise for a prompt the engine cannot take; returns the room left for output."""
        info = self.engine_status.info
        if not ids:
            raise InvalidRequestError("the prompt is empty (it has no tokens)")
        bad = [t for t in ids if t >= info.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids outside the vocabulary [0, {info.vocab_size}): {bad[:8]}"
            )
        room = info.max_model_len - len(ids)
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the context length is {info.max_model_len}"
            )
        if params.HasField("max_tokens") and params.max_tokens > room:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length ({info.max_model_len})"
            )
        return room

    def _tokenize(self, call: ipc_pb2.TokenizeCall) -> ipc_pb2.TokenizeResult:
        res = ipc_pb2.TokenizeResult(call_id=call.call_id)
        tok = self.tokenizer
        if tok is None:
            res.error, res.error_message = ipc_pb2.UNAVAILABLE, "the tokenizer is not ready"
            return res
        try:
            kind = call.WhichOneof("input")
            if kind == "detokenize":
                ids = list(call.detokenize.ids)
                vocab = self.engine_status.info.vocab_size
                bad = [t for t in ids if t >= vocab]
                if bad:
                    raise InvalidRequestError(
                        f"token ids outside the vocabulary [0, {vocab}): {bad[:8]}"
                    )
                res.text = tok.decode(ids, call.skip_special_tokens)
                return res
            if kind == "chat":
                res.text = tok.apply_chat_template(
                    _messages(call.chat), add_generation_prompt=call.chat.add_generation_prompt
                )
                ids = tok.encode(res.text, add_special_tokens=False)
            else:
                ids = tok.encode(call.text, add_special_tokens=call.add_special_tokens)
            res.token_ids.extend(ids)
            res.tokens.extend(self._token_text(i) for i in ids)
        except InvalidRequestError as e:
            res.error, res.error_message = ipc_pb2.INVALID_ARGUMENT, str(e)
        except Exception as e:
            log.exception("tokenize call failed")
            res.error, res.error_message = ipc_pb2.INTERNAL, f"{type(e).__name__}: {e}"
        return res

    def _error(self, rid: str, code: int, message: str) -> None:
        err = ipc_pb2.RequestError(request_id=rid, code=code, message=message)
        self._send_gateway(ipc_pb2.WorkerToGateway(batch=ipc_pb2.WorkerBatch(errors=[err])))

    def _fail_all(self, code: int, message: str, block: bool = True) -> None:
        errs = [
            ipc_pb2.RequestError(request_id=rid, code=code, message=message) for rid in self.active
        ]
        self.active.clear()
        self.by_engine.clear()
        self._send_gateway(ipc_pb2.WorkerToGateway(batch=ipc_pb2.WorkerBatch(errors=errs)), block)


class _Unavailable(Exception):
    pass


def _messages(conv: ipc_pb2.Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conv.messages]


def new_worker_id(k: int) -> str:
    return f"tok-{k}-{uuid.uuid4().hex[:6]}"
