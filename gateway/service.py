"""The ``pagedserve.v1.Inference`` servicer: every RPC, with errors as gRPC status codes."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from dataclasses import dataclass

import grpc

from gateway.metrics import Metrics
from gateway.workers import Stream, WorkerGone, WorkerPool
from protos.errors import InvalidRequestError
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.requests import Limits, check_request_id, conversation, text_request
from protos.sampling import SamplingParams

STATUS = {
    ipc_pb2.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ipc_pb2.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ipc_pb2.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ipc_pb2.INTERNAL: grpc.StatusCode.INTERNAL,
    ipc_pb2.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
}
FINISH = {
    ipc_pb2.FINISH_STOP: pb.STOP,
    ipc_pb2.FINISH_LENGTH: pb.LENGTH,
    ipc_pb2.FINISH_STOP_SEQUENCE: pb.STOP_SEQUENCE,
    ipc_pb2.FINISH_ABORT: pb.ABORTED,
}
TOKENIZE_TIMEOUT_S = 30.0


DEADLINE_MARGIN_S = 0.1  # a stream cancelled this close to its deadline timed out


def _counted(handler):
    """A unary handler whose success counts in pagedserve_requests (failures count in
    ``_abort``); the method label is the handler's name."""

    @functools.wraps(handler)
    async def counted(self, request, context):
        try:
            response = await handler(self, request, context)
        except asyncio.CancelledError:
            self._count_cancel(handler.__name__, context)
            raise
        finally:
            self._aborted.discard(context)
        self.metrics.requests.labels(handler.__name__, "OK").inc()
        return response

    return counted


class BadRequest:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8 in a string)."""

    def __init__(self, error: str) -> None:
        self.error = error


class _Aborted:
    """Queued into a stream by the Abort RPC."""


@dataclass(slots=True)
class _IndexState:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0
    first_token_time: float | None = None
    final: bool = False


class InferenceService:
    def __init__(
        self, pool: WorkerPool, limits: Limits, max_inflight: int, metrics: Metrics
    ) -> None:
        self.pool, self.limits, self.max_inflight, self.metrics = (
            pool,
            limits,
            max_inflight,
            metrics,
        )
        self._aborted: set = set()  # contexts of calls _abort has counted, while they unwind

    # -- streaming -------------------------------------------------------------------------
    async def Generate(self, request, context):
        try:
            async for r in self._stream(request, context, "Generate"):
                yield r
        finally:
            self._aborted.discard(context)

    async def Chat(self, request, context):
        try:
            async for r in self._stream(request, context, "Chat"):
                yield r
        finally:
            self._aborted.discard(context)

    async def _stream(self, request, context, method: str):
        t0 = time.monotonic()
        await self._check_parsed(request, context, method)
        info = await self._engine_info(context, request.model, method)
        rid = request.request_id or _metadata(context, "x-request-id") or uuid.uuid4().hex
        try:
            check_request_id(rid, self.limits)
            msg = text_request(request, rid, info, self.limits)
        except InvalidRequestError as e:
            await self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if rid in self.pool.streams:
            await self._abort(
                context,
                method,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id {rid!r} is in flight",
            )
        if len(self.pool.streams) >= self.max_inflight:
            await self._abort(
                context,
                method,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is at its limit of {self.max_inflight} requests in flight; retry later",
            )
        worker = self.pool.pick()
        if worker is None:
            await self._abort(context, method, grpc.StatusCode.UNAVAILABLE, "not ready")
        # No await between the in-flight check above and open(): a concurrent request with the
        # same id must see this one.
        stream = self.pool.open(rid, worker, msg)
        self.metrics.inflight.inc()
        finished = False
        try:
            await context.send_initial_metadata((("x-request-id", rid),))
            async for resp in self._relay(stream, msg.params.n or 1, t0, context, method):
                yield resp
            finished = True
            self.metrics.requests.labels(method, "OK").inc()
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or gRPC's own deadline fired: the task is cancelled.
            self._count_cancel(method, context)
            raise
        finally:
            self.metrics.inflight.dec()
            self.pool.close_stream(stream, abort=not finished)

    async def _relay(self, stream: Stream, n: int, t0: float, context, method: str):
        states = [_IndexState() for _ in range(n)]
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        while not all(s.final for s in states):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = await asyncio.wait_for(stream.queue.get(), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                await self._abort(
                    context, method, grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed"
                )
            if isinstance(item, _Aborted):
                for i, s in enumerate(states):
                    if not s.final:
                        yield self._final_aborted(stream.request_id, i, s, t0)
                return
            if isinstance(item, ipc_pb2.RequestError):
                await self._abort(
                    context, method, STATUS.get(item.code, grpc.StatusCode.INTERNAL), item.message
                )
            for resp in self._responses(stream.request_id, item, states, t0):
                yield resp

    def _responses(self, rid: str, d: ipc_pb2.TextDelta, states: list[_IndexState], t0: float):
        if d.index >= len(states) or states[d.index].final:
            return
        st = states[d.index]
        now = time.monotonic()
        if d.prompt_tokens:
            st.prompt_tokens = d.prompt_tokens
        if d.queue_ms:
            st.queue_ms = d.queue_ms
        st.completion_tokens += len(d.token_ids)
        if d.text or d.token_ids:
            if st.first_token_time is None:
                if all(s.first_token_time is None for s in states):  # once per request
                    self.metrics.ttft.observe(now - t0)
                st.first_token_time = now
            delta = pb.Delta(text=d.text, token_ids=d.token_ids)
            for lp in d.logprobs:
                tl = delta.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
                for t in lp.top:
                    tl.top.add(token_id=t.token_id, logprob=t.logprob, token=t.token)
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
        yield pb.GenerateResponse(request_id=rid, index=d.index, final=final)

    @staticmethod
    def _final_aborted(rid: str, index: int, st: _IndexState, t0: float) -> pb.GenerateResponse:
        now = time.monotonic()
        final = pb.Final(
            finish_reason=pb.ABORTED,
            usage=pb.Usage(prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens),
            timing=pb.Timing(
                ttft_ms=((st.first_token_time or now) - t0) * 1000.0, total_ms=(now - t0) * 1000.0
            ),
        )
        return pb.GenerateResponse(request_id=rid, index=index, final=final)

    # -- unary -----------------------------------------------------------------------------
    @_counted
    async def Abort(self, request, context):
        await self._check_parsed(request, context, "Abort")
        resp = pb.AbortResponse()
        for rid in request.request_ids:
            stream = self.pool.streams.get(rid)
            if stream is None:
                resp.not_found.append(rid)
                continue
            self.pool.abort(stream)
            stream.queue.put_nowait(_Aborted())
            resp.aborted.append(rid)
        return resp

    @_counted
    async def Tokenize(self, request, context):
        await self._check_parsed(request, context, "Tokenize")
        info = await self._engine_info(context, request.model, "Tokenize")
        call = ipc_pb2.TokenizeCall()
        kind = request.WhichOneof("input")
        try:
            if kind == "text":
                if len(request.text) > self.limits.max_prompt_chars:
                    raise InvalidRequestError(
                        f"text has more than {self.limits.max_prompt_chars} characters"
                    )
                call.text = request.text
                call.add_special_tokens = (
                    request.add_special_tokens if request.HasField("add_special_tokens") else True
                )
            elif kind == "messages":
                msgs = request.messages
                call.chat.CopyFrom(conversation(msgs.messages, msgs, self.limits))
            else:
                raise InvalidRequestError("set text or messages")
        except InvalidRequestError as e:
            await self._abort(context, "Tokenize", grpc.StatusCode.INVALID_ARGUMENT, str(e))
        res = await self._call(call, context, "Tokenize")
        return pb.TokenizeResponse(
            token_ids=res.token_ids,
            tokens=res.tokens,
            count=len(res.token_ids),
            max_model_len=info.max_model_len,
            rendered_prompt=res.text,
        )

    @_counted
    async def Detokenize(self, request, context):
        await self._check_parsed(request, context, "Detokenize")
        info = await self._engine_info(context, request.model, "Detokenize")
        bad = [t for t in request.token_ids if t >= info.vocab_size]
        if bad:
            await self._abort(
                context,
                "Detokenize",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids outside the vocabulary [0, {info.vocab_size}): {bad[:8]}",
            )
        call = ipc_pb2.TokenizeCall(
            detokenize=ipc_pb2.PromptIds(ids=request.token_ids),
            skip_special_tokens=(
                request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            ),
        )
        res = await self._call(call, context, "Detokenize")
        return pb.DetokenizeResponse(text=res.text)

    @_counted
    async def ListModels(self, request, context):
        info = self.pool.engine_info()
        if info is None:
            return pb.ListModelsResponse()
        card = pb.ModelCard(id=info.model_id, max_model_len=info.max_model_len, ready=True)
        return pb.ListModelsResponse(models=[card])

    @_counted
    async def GetModelInfo(self, request, context):
        await self._check_parsed(request, context, "GetModelInfo")
        info = await self._engine_info(context, request.model, "GetModelInfo")
        d = SamplingParams()
        out = pb.ModelInfo(
            id=info.model_id,
            architecture=info.architecture,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids,
            has_chat_template=self.pool.has_chat_template(),
            dtype=info.dtype,
            kv_cache_blocks=info.num_kv_blocks,
            kv_block_size=info.block_size,
            defaults=pb.SamplingDefaults(
                max_tokens=self.limits.default_max_tokens,
                temperature=d.temperature,
                top_p=d.top_p,
                top_k=d.top_k,
                min_p=d.min_p,
                repetition_penalty=d.repetition_penalty,
            ),
            limits=self.limits.to_proto(),
        )
        if info.HasField("bos_token_id"):
            out.bos_token_id = info.bos_token_id
        return out

    # -- helpers ---------------------------------------------------------------------------
    async def _engine_info(self, context, model: str, method: str) -> ipc_pb2.EngineInfo:
        info = self.pool.engine_info()
        if info is None:
            await self._abort(
                context,
                method,
                grpc.StatusCode.UNAVAILABLE,
                "the server is not ready (model loading or a part down)",
            )
        if model and model != info.model_id:
            await self._abort(
                context,
                method,
                grpc.StatusCode.NOT_FOUND,
                f"model {model!r} is not served here; this server serves {info.model_id!r}",
            )
        return info

    async def _call(self, call: ipc_pb2.TokenizeCall, context, method: str):
        remaining = context.time_remaining()
        timeout = TOKENIZE_TIMEOUT_S if remaining is None else min(remaining, TOKENIZE_TIMEOUT_S)
        try:
            res = await self.pool.call(call, timeout)
        except WorkerGone as e:
            await self._abort(context, method, grpc.StatusCode.UNAVAILABLE, str(e))
        except (asyncio.TimeoutError, TimeoutError):
            await self._abort(
                context, method, grpc.StatusCode.DEADLINE_EXCEEDED, "the tokenizer did not answer"
            )
        if res.error:
            await self._abort(
                context, method, STATUS.get(res.error, grpc.StatusCode.INTERNAL), res.error_message
            )
        return res

    async def _abort(self, context, method: str, code: grpc.StatusCode, message: str):
        """Every refused or failed RPC ends here, so pagedserve_requests counts it."""
        self.metrics.requests.labels(method, code.name).inc()
        self._aborted.add(context)  # counted: a cancel while the status goes out is not news
        await context.abort(code, message)

    def _count_cancel(self, method: str, context) -> None:
        if context in self._aborted:
            return
        # A client's own deadline can reach us as a cancel just before ours passes.
        remaining = context.time_remaining()
        late = remaining is not None and remaining <= DEADLINE_MARGIN_S
        self.metrics.requests.labels(method, "DEADLINE_EXCEEDED" if late else "CANCELLED").inc()

    async def _check_parsed(self, request, context, method: str) -> None:
        if isinstance(request, BadRequest):
            await self._abort(
                context,
                method,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"malformed request: {request.error}",
            )


def _metadata(context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v
    return None
