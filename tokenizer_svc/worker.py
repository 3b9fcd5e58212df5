"""One tokenizer/detokenizer worker: text in from the gateway, token ids to the engine, and
each engine step's new tokens back out as text deltas (UTF-8 safe, stop strings applied).

A request stays on one worker for its whole life, so its incremental detokenizer and
stop-string state live here. The worker connects one DEALER to the gateway and one to each
engine (identity = worker id) and runs a single-threaded poll loop: tokenizing is fast and
the GIL would serialize threads anyway.

Several engines are data-parallel replicas of one model: the worker sends each request to one
of them (``tokenizer_svc.routing``: prefix-cache affinity within a load margin) and it stays
there.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine_svc.models.detokenizer import IncrementalDetokenizer
from engine_svc.models.tokenizer import Tokenizer
from protos.errors import InvalidRequestError, PagedServeError
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.sampling import ADDED_STOP_TOKEN_IDS
from protos.transport import GATEWAY_PING_S, GATEWAY_PING_TIMEOUT_S, HEARTBEAT_S
from tokenizer_svc.routing import EngineLink, prefix_chain, route

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
    params: ipc_pb2.SamplingParams
    engine: EngineLink | None = None
    seqs: list[_Seq] = field(default_factory=list)
    full: set[int] = field(default_factory=set)  # engines that refused it: queue full

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)


class Worker:
    def __init__(
        self,
        worker_id: str,
        gateway_address: str,
        engine_addresses: str | Sequence[str],
        tokenizer_path: str | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.ident = worker_id.encode()
        self.gateway_address = gateway_address
        if isinstance(engine_addresses, str):
            engine_addresses = [engine_addresses]
        if not engine_addresses or len(set(engine_addresses)) != len(engine_addresses):
            raise ValueError(f"engine addresses must be given, each once: {engine_addresses}")
        self.engines = [EngineLink(i, a) for i, a in enumerate(engine_addresses)]
        self.tokenizer_path = tokenizer_path  # None: the path the engine reports
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_error = ""
        self.model: tuple | None = None  # (model id, vocab size, EOS ids) of the tokenizer's
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
        for e in self.engines:
            e.sock = self._dealer(ctx, e.address)
        by_sock = {e.sock: e for e in self.engines}
        # The gateway's connection dropping means the gateway is gone (crashed, or restarted
        # by the supervisor): nobody will read its requests' streams any more.
        gw_events = self.gw.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(self.gw, zmq.POLLIN)
        for e in self.engines:
            poller.register(e.sock, zmq.POLLIN)
        poller.register(gw_events, zmq.POLLIN)
        next_beat = 0.0
        log.info(
            "worker %s: gateway %s, engines %s",
            self.worker_id,
            self.gateway_address,
            ", ".join(e.address for e in self.engines),
        )
        try:
            while not self._stop:
                wait = max(1, int((next_beat - time.monotonic()) * 1000))
                events = dict(poller.poll(timeout=wait))
                # Read before judging liveness: after a stall the engines' statuses are queued.
                for sock in events:
                    eng = by_sock.get(sock)
                    if eng is not None:
                        self._drain(sock, ipc_pb2.EngineToWorker, self._on_engine, eng)
                # A disconnect first: messages already read from a reconnected gateway are new.
                if gw_events in events:
                    try:
                        self._on_gateway_events(gw_events)
                    except Exception:  # a bug must not take the worker down
                        log.exception("failed to handle a gateway socket event")
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
            for e in self.engines:
                e.sock.close(0)
            ctx.term()

    def stop(self) -> None:
        self._stop = True

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
    def _drain(sock: zmq.Socket, cls, handler, *args) -> None:
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
                handler(msg, *args)
            except Exception:  # a bug must not take the worker (and its streams) down
                log.exception("failed to handle a %s", cls.__name__)

    def _send_gateway(self, msg: ipc_pb2.WorkerToGateway, block: bool = True) -> None:
        try:
            self.gw.send(msg.SerializeToString(), 0 if block else zmq.NOBLOCK)
        except zmq.Again:
            pass  # a heartbeat while the gateway is away: the next one will do

    @staticmethod
    def _send_engine(eng: EngineLink, msg: ipc_pb2.WorkerToEngine, block: bool = True) -> None:
        try:
            eng.sock.send(msg.SerializeToString(), 0 if block else zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _abort_in_engines(self, seqs: Sequence[tuple[EngineLink, str]], block: bool = True) -> None:
        """Abort engine sequence ids, one message per engine."""
        by_engine: dict[int, list[str]] = {}
        for eng, sid in seqs:
            by_engine.setdefault(eng.index, []).append(sid)
        for i, ids in by_engine.items():
            abort = ipc_pb2.AbortRequests(request_ids=ids)
            self._send_engine(self.engines[i], ipc_pb2.WorkerToEngine(abort=abort), block)

    # -- status ----------------------------------------------------------------------------
    @property
    def engine_ready(self) -> bool:
        return any(e.ready for e in self.engines)

    @property
    def ready(self) -> bool:
        return self.engine_ready and self.tokenizer is not None

    def engine_info(self, ready: list[EngineLink] | None = None) -> ipc_pb2.EngineInfo | None:
        """What the ready engines serve, as requests are checked against it: the first one's
        info with the smallest context and the summed capacity."""
        if ready is None:
            ready = [e for e in self.engines if e.ready]
        if not ready:
            return None
        info = ipc_pb2.EngineInfo()
        info.CopyFrom(ready[0].status.info)
        info.max_model_len = min(e.status.info.max_model_len for e in ready)
        info.num_kv_blocks = sum(e.status.info.num_kv_blocks for e in ready)
        info.max_waiting = sum(e.status.info.max_waiting for e in ready)
        return info

    def _heartbeat(self, now: float) -> None:
        hello = ipc_pb2.WorkerToEngine(hello=ipc_pb2.Hello(worker_id=self.worker_id))
        for e in self.engines:
            self._send_engine(e, hello, False)
            if e.status is not None and not e.alive:
                self._fail_engine(e, "the engine stopped answering")
        st = ipc_pb2.WorkerStatus(
            worker_id=self.worker_id,
            tokenizer_ready=self.tokenizer is not None,
            engine_ready=self.engine_ready,
            num_active=len(self.active),
            has_chat_template=bool(self.tokenizer is not None and self.tokenizer.chat_template),
            engines=[e.state() for e in self.engines],
        )
        info = self.engine_info()
        if info is not None:
            st.engine.CopyFrom(info)
        self._send_gateway(ipc_pb2.WorkerToGateway(status=st), False)

    def _on_engine_status(self, st: ipc_pb2.EngineStatus, eng: EngineLink) -> None:
        old = eng.status
        if old is not None and old.instance != st.instance:
            # A new engine process knows nothing of what the old one was running or cached.
            self._fail_engine(eng, "the engine restarted")
            eng.prefixes.clear()
            eng.base = eng.sent
        eng.status = st
        eng.seen = time.monotonic()
        if st.ready and self.tokenizer is None and not self.tokenizer_error:
            self._load_tokenizer(self.tokenizer_path or st.info.model_path)
            if self.tokenizer is not None:
                self.model = _model_key(st.info)
        if st.ready:
            was = eng.refused
            eng.refused = self._model_mismatch(st.info)
            if eng.refused and eng.refused != was:
                log.error("worker %s: not using %s: %s", self.worker_id, eng.address, eng.refused)

    def _model_mismatch(self, info: ipc_pb2.EngineInfo) -> str:
        """Why an engine serving ``info`` cannot take this worker's requests ('' if it can):
        replicas must serve the model the worker's tokenizer was loaded for."""
        if self.model is None or _model_key(info) == self.model:
            return ""
        model_id, vocab, _ = self.model
        return (
            f"it serves {info.model_id!r} (vocabulary {info.vocab_size}), but this worker's "
            f"tokenizer is for {model_id!r} (vocabulary {vocab})"
        )

    def _load_tokenizer(self, path: str) -> None:
        try:
            self.tokenizer = Tokenizer(Path(path))
        except (PagedServeError, OSError, ValueError) as e:
            self.tokenizer_error = str(e)
            log.error("worker %s cannot load the tokenizer: %s", self.worker_id, e)
            return
        # At most the few added ids the engine takes beyond a client's MAX_STOP_TOKEN_IDS.
        self._chat_stop_ids = self.tokenizer.chat_stop_token_ids()[:ADDED_STOP_TOKEN_IDS]
        _ = self.tokenizer.max_token_bytes  # now, not in the first request's time
        log.info("worker %s: tokenizer loaded from %s", self.worker_id, path)

    # -- engine -> worker ------------------------------------------------------------------
    def _on_engine(self, msg: ipc_pb2.EngineToWorker, eng: EngineLink) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "status":
            self._on_engine_status(msg.status, eng)
        elif kind == "step":
            self._on_step(msg.step, eng)

    def _lookup(self, engine_rid: str, eng: EngineLink) -> _Active | None:
        act = self.active.get(self.by_engine.get(engine_rid, ""))
        ok = act is not None and act.engine_rid == engine_rid and act.engine is eng
        return act if ok else None

    def _forget(self, act: _Active) -> None:
        self.active.pop(act.request.request_id, None)
        self.by_engine.pop(act.engine_rid, None)

    def _on_step(self, step: ipc_pb2.StepOutputs, eng: EngineLink) -> None:
        batch = ipc_pb2.WorkerBatch()
        for err in step.errors:
            act = self._lookup(err.request_id, eng)
            if act is None:
                continue
            if err.code == ipc_pb2.RESOURCE_EXHAUSTED:  # that replica's queue is full
                act.full.add(eng.index)
                others = [e for e in self.engines if e.ready and e.index not in act.full]
                if others and not any(q.sent_first for q in act.seqs):
                    self._submit(act, others)  # each replica is tried at most once
                    continue
            self._forget(act)
            rid = act.request.request_id
            batch.errors.add(request_id=rid, code=err.code, message=err.message)
        stale: list[str] = []
        for out in step.outputs:
            act = self._lookup(out.request_id, eng)
            if act is None:  # not ours any more (aborted, failed): make sure the engine drops it
                stale.append(out.request_id)  # the engine expands a parent id to its siblings
                continue
            if out.index >= len(act.seqs):
                continue
            if act.seqs[out.index].finished:
                # This sibling stopped here (a stop string) while the engine ran one more step:
                # abort it alone, not the parent id, or its live siblings would go too.
                stale.append(act.seqs[out.index].engine_id)
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
            self._abort_in_engines([(eng, sid) for sid in stale])
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
            d.prefill_ms = out.prefill_ms
            d.prompt_tokens = out.prompt_tokens
            if req.echo:
                text = self.tokenizer.decode(act.prompt_ids, req.skip_special_tokens) + text
        d.token_ids.extend(out.token_ids)
        tok = self.tokenizer
        for lp in out.logprobs:
            tl = d.logprobs.add(
                token_id=lp.token_id,
                logprob=lp.logprob,
                token=self._token_text(lp.token_id),
                bytes=tok.token_bytes(lp.token_id),
            )
            for t in lp.top:
                tl.top.add(
                    token_id=t.token_id,
                    logprob=t.logprob,
                    token=self._token_text(t.token_id),
                    bytes=tok.token_bytes(t.token_id),
                )
        finish = out.finish_reason
        if seq.detok.stopped:
            finish = ipc_pb2.FINISH_STOP_SEQUENCE
            d.stop_str = seq.detok.matched_stop or ""
            if out.finish_reason == ipc_pb2.FINISH_NONE:  # the engine would go on: stop it
                self._abort_in_engines([(act.engine, seq.engine_id)])
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
        seqs = []
        for rid in request_ids:
            act = self.active.get(rid)
            if act is not None:
                self._forget(act)
                seqs.extend((act.engine, s.engine_id) for s in act.seqs if not s.finished)
        self._abort_in_engines(seqs)

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
                self._abort_in_engines(
                    [(a.engine, q.engine_id) for a in self.active.values() for q in a.seqs]
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
            # Taken once: readiness goes by the clock, and tokenizing takes time.
            engines = [e for e in self.engines if e.ready]
            if not engines or self.tokenizer is None:
                raise _Unavailable("the engine or tokenizer is not ready")
            if rid in self.active:
                raise InvalidRequestError(f"request id {rid!r} is already in flight")
            ids, params = self._encode(req, self.engine_info(engines))
            act = _Active(req, ids, "", params)
            for _ in range(params.n or 1):
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    ids,
                    skip_special_tokens=req.skip_special_tokens,
                    stop=list(req.stop),
                    include_stop_str_in_output=req.include_stop_str_in_output,
                    min_tokens=params.min_tokens,
                )
                act.seqs.append(_Seq(detok, ""))
            self._submit(act, engines)
        except _Unavailable as e:
            return self._error(rid, ipc_pb2.UNAVAILABLE, str(e))
        except InvalidRequestError as e:
            return self._error(rid, ipc_pb2.INVALID_ARGUMENT, str(e))
        except Exception as e:  # e.g. a chat template that fails in an unexpected way
            log.exception("request %s failed in the tokenizer", rid)
            return self._error(rid, ipc_pb2.INTERNAL, f"tokenizer error: {type(e).__name__}: {e}")
        self.active[rid] = act

    def _submit(self, act: _Active, engines: list[EngineLink]) -> None:
        """Send ``act`` to one of ``engines`` under a fresh engine id."""
        if len(engines) == 1:
            eng = engines[0]
        else:
            chain = prefix_chain(act.prompt_ids, engines[0].status.info.block_size)
            eng = route(engines, chain)
            eng.remember(chain)
        eng.sent += len(act.seqs)
        self.by_engine.pop(act.engine_rid, None)
        rid = act.request.request_id
        act.engine, act.engine_rid = eng, f"{rid}@{next(self._serial)}"
        self.by_engine[act.engine_rid] = rid
        for i, seq in enumerate(act.seqs):
            seq.engine_id = act.engine_rid if len(act.seqs) == 1 else f"{act.engine_rid}#{i}"
        add = ipc_pb2.AddRequest(
            request_id=act.engine_rid,
            prompt_token_ids=act.prompt_ids,
            params=act.params,
            priority=act.request.priority,
            serial=eng.sent,
        )
        self._send_engine(eng, ipc_pb2.WorkerToEngine(add=add))

    def _encode(
        self, req: ipc_pb2.TextRequest, info: ipc_pb2.EngineInfo
    ) -> tuple[list[int], ipc_pb2.SamplingParams]:
        tok = self.tokenizer
        params = ipc_pb2.SamplingParams()
        params.CopyFrom(req.params)
        kind = req.WhichOneof("prompt")
        if kind == "text":
            self._check_fits(req.text, info)
            ids = tok.encode(req.text, add_special_tokens=req.add_special_tokens)
        elif kind == "token_ids":
            ids = list(req.token_ids.ids)
        elif kind == "chat":
            text = tok.apply_chat_template(
                _messages(req.chat), add_generation_prompt=req.chat.add_generation_prompt
            )
            self._check_fits(text, info)
            ids = tok.encode(text, add_special_tokens=False)
            # The template's end-of-turn token ends the reply even when it is not the EOS.
            extra = [i for i in self._chat_stop_ids if i not in params.stop_token_ids]
            params.stop_token_ids.extend(extra)
        else:
            raise InvalidRequestError("the request has no prompt")
        room = self._check_length(ids, params, info)
        if not params.HasField("max_tokens") and req.default_max_tokens:
            params.max_tokens = min(max(req.default_max_tokens, params.min_tokens), room)
        return ids, params

    def _check_fits(self, text: str, info: ipc_pb2.EngineInfo) -> None:
        """Refuse a text that has too many tokens for the context whatever its tokenization,
        before tokenizing it: a megabyte of emoji takes seconds to tokenize, and this loop
        (heartbeats included) does nothing else meanwhile."""
        least = len(text.encode("utf-8", "surrogatepass")) // self.tokenizer.max_token_bytes
        if least >= info.max_model_len:
            raise InvalidRequestError(
                f"the prompt has at least {least} tokens ({len(text)} characters); the context "
                f"length is {info.max_model_len}"
            )

    def _check_length(
        self, ids: list[int], params: ipc_pb2.SamplingParams, info: ipc_pb2.EngineInfo
    ) -> int:
        """Raise for a prompt the engines cannot take; returns the room left for output."""
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
        if params.min_tokens > room:  # else a max_tokens the client never sent is blamed
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + min_tokens ({params.min_tokens}) exceeds the "
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
                info = self.engine_info()
                if info is None:
                    raise _Unavailable("no engine is ready")
                vocab = info.vocab_size
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
        except _Unavailable as e:
            res.error, res.error_message = ipc_pb2.UNAVAILABLE, str(e)
        except Exception as e:
            log.exception("tokenize call failed")
            res.error, res.error_message = ipc_pb2.INTERNAL, f"{type(e).__name__}: {e}"
        return res

    def _error(self, rid: str, code: int, message: str) -> None:
        err = ipc_pb2.RequestError(request_id=rid, code=code, message=message)
        self._send_gateway(ipc_pb2.WorkerToGateway(batch=ipc_pb2.WorkerBatch(errors=[err])))

    def _fail_all(self, code: int, message: str, block: bool = True) -> None:
        self._fail(list(self.active.values()), code, message, block)

    def _fail_engine(self, eng: EngineLink, message: str) -> None:
        """``eng`` died or restarted: its requests that have streamed nothing yet go to another
        ready engine (the client cannot tell), the rest fail with UNAVAILABLE."""
        acts = [a for a in self.active.values() if a.engine is eng]
        others = [e for e in self.engines if e.ready and e is not eng]
        # Stop them there too: a stalled engine may run on, and Adds queued for a dead one are
        # delivered to its restarted process (the abort right behind them).
        self._abort_in_engines([(eng, q.engine_id) for a in acts for q in a.seqs], block=False)
        failed = []
        for act in acts:
            if others and not any(q.sent_first for q in act.seqs):
                self._submit(act, others)
            else:
                failed.append(act)
        if len(acts) > len(failed):
            log.warning(
                "worker %s: %s: %d requests sent to other engines, %d failed",
                self.worker_id,
                f"{message} ({eng.address})",
                len(acts) - len(failed),
                len(failed),
            )
        if failed:
            if len(self.engines) > 1:
                message = f"{message} ({eng.address})"
            self._fail(failed, ipc_pb2.UNAVAILABLE, message)

    def _fail(self, acts: list[_Active], code: int, message: str, block: bool = True) -> None:
        errs = []
        for act in acts:
            self._forget(act)
            rid = act.request.request_id
            errs.append(ipc_pb2.RequestError(request_id=rid, code=code, message=message))
        if errs:
            batch = ipc_pb2.WorkerBatch(errors=errs)
            self._send_gateway(ipc_pb2.WorkerToGateway(batch=batch), block)


class _Unavailable(Exception):
    pass


def _model_key(info: ipc_pb2.EngineInfo) -> tuple:
    return (info.model_id, info.vocab_size, tuple(info.eos_token_ids))


def _messages(conv: ipc_pb2.Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conv.messages]


def new_worker_id(k: int) -> str:
    return f"tok-{k}-{uuid.uuid4().hex[:6]}"
