"""The ``pagedserve.v1.Inference`` servicer: every RPC, with errors as gRPC status codes."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid

import grpc

from gateway.errors import Refused, from_exception, presented_key
from gateway.frontend import Frontend
from protos.errors import InvalidRequestError
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.requests import (
    check_request_id,
    conversation,
    detokenize_call,
    text_request,
    tokenize_call,
)
from protos.sampling import SamplingParams

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


class InferenceService:
    def __init__(self, front: Frontend) -> None:
        self.front = front
        self.pool, self.limits, self.metrics = front.pool, front.limits, front.metrics
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
        rid = request.request_id or _metadata(context, "x-request-id") or uuid.uuid4().hex
        try:
            info = self.front.engine_info(request.model)
            check_request_id(rid, self.limits)
            msg = text_request(request, rid, info, self.limits)
            (stream,) = self.front.open(self._caller(context), [msg])
        except (Refused, InvalidRequestError) as e:
            await self._refuse(context, method, e)
        finished = False
        try:
            await context.send_initial_metadata((("x-request-id", rid),))
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            async for resp in self.front.relay(stream, msg.params.n or 1, t0, deadline):
                yield resp
            finished = True
            self.metrics.requests.labels(method, "OK").inc()
        except Refused as e:
            await self._refuse(context, method, e)
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or gRPC's own deadline fired: the task is cancelled.
            self._count_cancel(method, context)
            raise
        finally:
            self.front.close(stream, finished)

    # -- unary -----------------------------------------------------------------------------
    @_counted
    async def Abort(self, request, context):
        await self._check_parsed(request, context, "Abort")
        resp = pb.AbortResponse()
        caller = self._caller(context)
        for rid in request.request_ids:
            (resp.aborted if self.front.abort(caller, rid) else resp.not_found).append(rid)
        return resp

    @_counted
    async def Tokenize(self, request, context):
        await self._check_parsed(request, context, "Tokenize")
        kind = request.WhichOneof("input")
        try:
            info = self.front.engine_info(request.model)
            if kind == "text":
                add_special = (
                    request.add_special_tokens if request.HasField("add_special_tokens") else True
                )
                call = tokenize_call(request.text, self.limits, add_special)
            elif kind == "messages":
                msgs = request.messages
                call = ipc_pb2.TokenizeCall(chat=conversation(msgs.messages, msgs, self.limits))
            else:
                raise InvalidRequestError("set text or messages")
            res = await self.front.call(call, context.time_remaining())
        except (Refused, InvalidRequestError) as e:
            await self._refuse(context, "Tokenize", e)
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
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        try:
            info = self.front.engine_info(request.model)
            call = detokenize_call(request.token_ids, info, skip)
            res = await self.front.call(call, context.time_remaining())
        except (Refused, InvalidRequestError) as e:
            await self._refuse(context, "Detokenize", e)
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
        try:
            info = self.front.engine_info(request.model)
        except Refused as e:
            await self._refuse(context, "GetModelInfo", e)
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
    def _caller(self, context) -> str:
        """The caller (``Frontend.caller``): its key, checked by the interceptor by now, or
        its connection."""
        md = dict(context.invocation_metadata() or ())
        key = presented_key(md.get("authorization", ""), md.get("x-api-key", ""))
        return self.front.caller(key, "grpc:" + context.peer())

    async def _refuse(self, context, method: str, e: Exception):
        r = e if isinstance(e, Refused) else from_exception(e)
        self.metrics.count_refusal(r)
        await self._abort(context, method, r.code, r.message)

    async def _abort(self, context, method: str, code: grpc.StatusCode, message: str):
        """Every refused or failed RPC ends here, so pagedserve_requests counts it."""
        self.metrics.requests.labels(method, code.name).inc()
        self._aborted.add(context)  # counted: a cancel while the status goes out is not news
        try:
            await context.abort(code, message)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise  # AbortError: the status went out
        except Exception:
            # grpc could not send the status: the call ended in grpc core while it went out
            # (the client's cancel or grpc's own deadline won a race with ours), and the
            # client has its status already. End as the cancel it is, which grpc does not log
            # (it logged this ExecuteBatchError with a traceback); counted once above.
            raise asyncio.CancelledError from None

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
