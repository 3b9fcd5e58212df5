"""What the gRPC and HTTP fronts share: checks against the served model, the in-flight bound,
opening a stream on a tokenizer worker, relaying its deltas as ``pb.GenerateResponse`` messages,
tokenizer calls. Everything here raises ``Refused``; each front says it in its own protocol
(``gateway/errors.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from gateway.errors import MAX_INFLIGHT, Code, Refused, from_ipc
from gateway.metrics import FinishedOutput, Metrics
from gateway.workers import Stream, WorkerGone, WorkerPool
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.requests import Limits

FINISH = {
    ipc_pb2.FINISH_STOP: pb.STOP,
    ipc_pb2.FINISH_LENGTH: pb.LENGTH,
    ipc_pb2.FINISH_STOP_SEQUENCE: pb.STOP_SEQUENCE,
    ipc_pb2.FINISH_ABORT: pb.ABORTED,
}
# vLLM's finished_reason label (vllm:request_success_total) of each final message.
FINISHED_REASON = {
    pb.STOP: "stop",
    pb.STOP_SEQUENCE: "stop",
    pb.LENGTH: "length",
    pb.ABORTED: "abort",
}
TOKENIZE_TIMEOUT_S = 30.0


class Aborted:
    """Queued into a stream by the Abort RPC: the relay ends every open index as ABORTED."""


@dataclass(slots=True)
class _IndexState:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    first_token_time: float | None = None
    # When the output's first and latest token ids arrived (its decode time, its inter-token
    # gaps); unlike first_token_time, an echoed prompt's text does not count.
    first_id_time: float | None = None
    last_id_time: float | None = None
    final: bool = False

    def finished(self, reason: str, now: float, t0: float) -> FinishedOutput:
        decode = None if self.first_id_time is None else self.last_id_time - self.first_id_time
        return FinishedOutput(
            finished_reason=reason,
            e2e_s=now - t0,
            num_tokens=self.completion_tokens,
            queue_s=self.queue_ms / 1000.0,
            prefill_s=self.prefill_ms / 1000.0,
            decode_s=decode,
        )


class Frontend:
    def __init__(
        self,
        pool: WorkerPool,
        limits: Limits,
        max_inflight: int,
        metrics: Metrics,
        keyed: bool = False,
    ) -> None:
        self.pool, self.limits, self.max_inflight, self.metrics = (
            pool,
            limits,
            max_inflight,
            metrics,
        )
        self.keyed = keyed  # API keys are configured: a caller is its key
        # (caller, the client's request id) -> its open stream: what a duplicate id and an
        # Abort are looked up in, so one caller can neither refuse nor stop another's request.
        self.streams: dict[tuple[str, str], Stream] = {}
        self._serial = itertools.count(1)

    def caller(self, api_key: str, connection: str) -> str:
        """Who a call comes from, which scopes its request ids and Aborts: its API key when the
        server has keys (hashed: the key itself is kept nowhere), else its connection (a
        front-specific address such as ``grpc:ipv4:127.0.0.1:40312``)."""
        if self.keyed:
            return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:32]
        return "connection:" + connection

    # -- checks ----------------------------------------------------------------------------
    def engine_info(self, model: str = "") -> ipc_pb2.EngineInfo:
        """The served model's info; ``model`` (when set) must name it."""
        info = self.pool.engine_info()
        if info is None:
            raise Refused(
                Code.UNAVAILABLE, "the server is not ready (model loading or a part down)"
            )
        if model and model != info.model_id:
            raise Refused(
                Code.NOT_FOUND,
                f"model {clip(model)} is not served here; this server serves {info.model_id!r}",
                param="model",
            )
        return info

    # -- streams ---------------------------------------------------------------------------
    def open(self, caller: str, msgs: Sequence[ipc_pb2.TextRequest]) -> list[Stream]:
        """Send the requests to one tokenizer worker each, all or none: their ids must be free
        among ``caller``'s streams and the in-flight bound must leave room for all of them."""
        seen: set[str] = set()
        for m in msgs:
            if (caller, m.request_id) in self.streams or m.request_id in seen:
                raise Refused(Code.INVALID_ARGUMENT, f"request_id {m.request_id!r} is in flight")
            seen.add(m.request_id)
        if len(self.pool.streams) + len(msgs) > self.max_inflight:
            raise Refused(
                Code.RESOURCE_EXHAUSTED,
                f"the server is at its limit of {self.max_inflight} requests in flight; "
                "retry later",
                reason=MAX_INFLIGHT,
            )
        if self.pool.pick() is None:
            raise Refused(Code.UNAVAILABLE, "not ready")
        # No await between the checks above and the opens: a concurrent request with the same
        # id must see these. One pick per open, so the prompts of one request spread over the
        # workers by load.
        streams = [self._open(caller, m) for m in msgs]
        self.metrics.inflight.inc(len(streams))
        return streams

    def _open(self, caller: str, msg: ipc_pb2.TextRequest) -> Stream:
        client_id = msg.request_id
        # Two callers may use one id at once: the workers and engines get the gateway's own,
        # unique id (a client's id has no '/'); the client sees only its own.
        msg.request_id = f"{next(self._serial)}/{client_id}"
        stream = self.pool.open(msg.request_id, self.pool.pick(), msg)
        stream.client_id, stream.caller = client_id, caller
        self.streams[(caller, client_id)] = stream
        return stream

    def close(self, stream: Stream, finished: bool) -> None:
        """Forget a stream; one that did not finish is aborted in the engine."""
        self.metrics.inflight.dec()
        key = (stream.caller, stream.client_id)
        if self.streams.get(key) is stream:
            del self.streams[key]
        self.pool.close_stream(stream, abort=not finished)

    def abort(self, caller: str, request_id: str) -> bool:
        """Stop ``caller``'s stream ``request_id``; False when ``caller`` has none of that id
        (another caller's stream of that id is not its to stop)."""
        stream = self.streams.get((caller, request_id))
        if stream is None:
            return False
        self.pool.abort(stream)
        stream.queue.put_nowait(Aborted())
        return True

    async def relay(
        self, stream: Stream, n: int, t0: float, deadline: float | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The stream's deltas as public messages, until every index has its final message.
        ``deadline`` is a ``time.monotonic()`` time; past it: DEADLINE_EXCEEDED."""
        states = [_IndexState() for _ in range(n)]
        info = self.pool.engine_info()
        model = info.model_id if info is not None else ""
        while not all(s.final for s in states):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = await asyncio.wait_for(stream.queue.get(), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise Refused(Code.DEADLINE_EXCEEDED, "the deadline passed") from None
            if isinstance(item, Aborted):
                for i, s in enumerate(states):
                    if not s.final:
                        self.metrics.finished(model, s.finished("abort", time.monotonic(), t0))
                        yield _final_aborted(stream.client_id, i, s, t0)
                return
            if isinstance(item, ipc_pb2.RequestError):
                raise from_ipc(item.code, item.message)
            for resp in self._responses(stream.client_id, item, states, t0, model):
                yield resp

    def _responses(
        self, rid: str, d: ipc_pb2.TextDelta, states: list[_IndexState], t0: float, model: str
    ):
        if d.index >= len(states) or states[d.index].final:
            return
        st = states[d.index]
        now = time.monotonic()
        if d.prompt_tokens:
            st.prompt_tokens = d.prompt_tokens
        if d.queue_ms:
            st.queue_ms = d.queue_ms
        if d.prefill_ms:
            st.prefill_ms = d.prefill_ms
        st.completion_tokens += len(d.token_ids)
        if d.token_ids:
            self._time_tokens(st, len(d.token_ids), now, t0, model)
        if d.text or d.token_ids:
            if st.first_token_time is None:
                if all(s.first_token_time is None for s in states):  # once per request
                    self.metrics.ttft.observe(now - t0)
                st.first_token_time = now
            delta = pb.Delta(text=d.text, token_ids=d.token_ids)
            for lp in d.logprobs:
                tl = delta.logprobs.add(
                    token_id=lp.token_id, logprob=lp.logprob, token=lp.token, bytes=lp.bytes
                )
                for t in lp.top:
                    tl.top.add(token_id=t.token_id, logprob=t.logprob, token=t.token, bytes=t.bytes)
            yield pb.GenerateResponse(request_id=rid, index=d.index, delta=delta)
        if d.finish_reason == ipc_pb2.FINISH_NONE:
            return
        st.final = True
        final = pb.Final(
            finish_reason=FINISH.get(d.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
            usage=pb.Usage(
                prompt_tokens=d.prompt_tokens or st.prompt_tokens,
                completion_tokens=d.completion_tokens,
                cached_tokens=d.cached_tokens,
            ),
            timing=pb.Timing(
                queue_ms=st.queue_ms,
                ttft_ms=((st.first_token_time or now) - t0) * 1000.0,
                total_ms=(now - t0) * 1000.0,
            ),
            prompt_token_ids=d.prompt_token_ids,
        )
        kind = d.WhichOneof("matched_stop")
        if kind == "stop_str":
            final.stop_str = d.stop_str
        elif kind == "stop_token_id":
            final.stop_token_id = d.stop_token_id
        self.metrics.e2e.observe(now - t0)
        self.metrics.finished(
            model, st.finished(FINISHED_REASON.get(final.finish_reason, "stop"), now, t0)
        )
        yield pb.GenerateResponse(request_id=rid, index=d.index, final=final)

    def _time_tokens(self, st: _IndexState, n: int, now: float, t0: float, model: str) -> None:
        """An output's time to first token and its inter-token gaps, from ``n`` token ids that
        arrived at ``now`` (one message per engine step, so ``n`` is 1 but for a step that made
        several: those share the message's gap)."""
        if st.first_id_time is None:
            st.first_id_time = now
            self.metrics.first_token(model, now - t0)
            gap, n = 0.0, n - 1
        else:
            gap = now - st.last_id_time
        if n:
            self.metrics.tokens(model, gap, n)
        st.last_id_time = now

    # -- tokenizer calls -------------------------------------------------------------------
    async def call(
        self, call: ipc_pb2.TokenizeCall, timeout: float | None = None
    ) -> ipc_pb2.TokenizeResult:
        """One Tokenize/Detokenize round trip to a worker (``timeout`` capped by the
        tokenizer's own)."""
        timeout = TOKENIZE_TIMEOUT_S if timeout is None else min(timeout, TOKENIZE_TIMEOUT_S)
        try:
            res = await self.pool.call(call, timeout)
        except WorkerGone as e:
            raise Refused(Code.UNAVAILABLE, str(e)) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise Refused(Code.DEADLINE_EXCEEDED, "the tokenizer did not answer") from None
        if res.error:
            raise from_ipc(res.error, res.error_message)
        return res


ECHO_CHARS = 100  # the most of a client's string an error message repeats


def clip(text: str) -> str:
    """``text`` quoted for an error message, cut to ECHO_CHARS characters: a message goes back
    in a gRPC trailer (8 KiB of metadata at most) and in HTTP error bodies."""
    if len(text) <= ECHO_CHARS:
        return repr(text)
    return f"{text[:ECHO_CHARS]!r}... ({len(text)} characters)"


def _final_aborted(rid: str, index: int, st: _IndexState, t0: float) -> pb.GenerateResponse:
    now = time.monotonic()
    final = pb.Final(
        finish_reason=pb.ABORTED,
        usage=pb.Usage(prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens),
        timing=pb.Timing(
            queue_ms=st.queue_ms,
            ttft_ms=((st.first_token_time or now) - t0) * 1000.0,
            total_ms=(now - t0) * 1000.0,
        ),
    )
    return pb.GenerateResponse(request_id=rid, index=index, final=final)
