"""The OpenAI-compatible HTTP front: a Starlette app served by uvicorn in the gateway's own event
loop, beside the gRPC server, over the same ``Frontend`` (tokenizer workers, in-flight bound,
metrics) and the same request mapping.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming as SSE or
not), ``GET /v1/models[/{id}]``, ``POST /tokenize`` and ``/detokenize`` (vLLM's shapes),
``GET /health``, ``GET /metrics``. Errors are OpenAI's JSON with the HTTP status from
``gateway/errors.py``'s table. A client that closes the connection aborts its request in the
engine: streaming or not, a watcher on the ASGI ``receive`` channel cancels the relay, whose
``finally`` closes the stream with an abort.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pydantic
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.errors import (
    BODY_TOO_LARGE,
    Code,
    Refused,
    api_key_refusal,
    from_exception,
    http_status,
    presented_key,
)
from gateway.frontend import Frontend
from gateway.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from gateway.workers import Stream
from protos.errors import InvalidRequestError
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.requests import check_request_id, conversation_of, detokenize_call, tokenize_call

log = logging.getLogger("pagedserve.gateway")

FINISH = {
    pb.STOP: "stop",
    pb.STOP_SEQUENCE: "stop",
    pb.LENGTH: "length",
    pb.ABORTED: "abort",
}
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports this floor
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(slots=True)
class HttpConfig:
    host: str = "localhost"
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    api_keys: list[str] = field(default_factory=list)
    metrics: bool = True  # serve /metrics here too (off with the gateway's metrics endpoint)


def _error(e: Refused, headers: dict[str, str] | None = None) -> JSONResponse:
    st = http_status(e.code)
    body = {"error": {"message": e.message, "type": st.type, "param": e.param, "code": e.code.name}}
    return JSONResponse(body, status_code=st.status, headers=headers)


def _logprob(x: float) -> float:
    return x if math.isfinite(x) and x > MIN_LOGPROB else MIN_LOGPROB


def _token_str(b: bytes) -> str:
    """A token's text; bytes that are part of a UTF-8 character show as ``\\xNN`` escapes."""
    return b.decode("utf-8", errors="backslashreplace")


class OpenAIApi:
    def __init__(self, front: Frontend, config: HttpConfig) -> None:
        self.front, self.config = front, config
        self._keys = [k.encode() for k in config.api_keys]
        self.live: set[_Generation] = set()  # generation requests being answered
        self.fingerprint = "fp_pagedserve"
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        if config.metrics:
            routes.append(Route("/metrics", self.metrics, methods=["GET"]))
        self.app = Starlette(
            routes=routes,
            exception_handlers={404: self._not_found, 405: self._bad_method, 500: self._internal},
        )

    def shutting_down(self) -> None:
        """End every generation being answered with UNAVAILABLE (an error event and
        ``[DONE]`` in a stream, a 503 otherwise), before the server's grace period runs out and
        cuts connections mid-response; their requests are aborted in the engine."""
        reason = Refused(Code.UNAVAILABLE, "the server is shutting down; retry elsewhere")
        for gen in list(self.live):
            gen.stop(reason)

    # -- plumbing --------------------------------------------------------------------------
    async def _not_found(self, request: Request, exc) -> Response:
        return _error(Refused(Code.NOT_FOUND, f"no route {request.url.path[:200]!r}"))

    async def _bad_method(self, request: Request, exc) -> Response:
        r = _error(Refused(Code.INVALID_ARGUMENT, f"{request.method} is not allowed here"))
        r.status_code = 405
        return r

    async def _internal(self, request: Request, exc) -> Response:
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return _error(Refused(Code.INTERNAL, "internal error (logged by the gateway)"))

    def _count(self, method: str, code: str) -> None:
        self.front.metrics.requests.labels(method, code).inc()

    def _check_key(self, request: Request) -> None:
        if not self._keys:
            return
        h = request.headers
        refusal = api_key_refusal(h.get("authorization", ""), h.get("x-api-key", ""), self._keys)
        if refusal is not None:
            raise refusal

    async def _body(self, request: Request, model: type[pydantic.BaseModel]):
        """The JSON body as ``model``, read no further than the size bound."""
        declared = request.headers.get("content-length")
        limit = self.config.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            raise _TooLarge(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge(limit)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return model.model_validate_json(raw)
        except pydantic.ValidationError as e:
            raise _validation_error(e) from None

    async def _handle(
        self, request: Request, method: str, fn: Callable[[], Awaitable[Response]]
    ) -> Response:
        """Auth, then ``fn``; every refusal becomes OpenAI's error JSON and is counted."""
        try:
            self._check_key(request)
            response = await fn()
        except _TooLarge as e:  # what gRPC says of a message over its limit, with HTTP's 413
            msg = f"the request body is over {e.limit} bytes"
            refused = Refused(Code.RESOURCE_EXHAUSTED, msg, reason=BODY_TOO_LARGE)
            self._count(method, refused.code.name)
            self.front.metrics.count_refusal(refused)
            r = _error(refused)
            r.status_code = 413
            return r
        except (Refused, InvalidRequestError) as e:
            r = e if isinstance(e, Refused) else from_exception(e)
            self._count(method, r.code.name)
            self.front.metrics.count_refusal(r)
            return _error(r)
        return response

    def _caller(self, request: Request) -> str:
        """The caller (``Frontend.caller``): its key, checked by ``_check_key`` by now, or its
        connection (no abort endpoint here, but request ids are scoped the same way)."""
        h, client = request.headers, request.client
        key = presented_key(h.get("authorization", ""), h.get("x-api-key", ""))
        where = f"{client.host}:{client.port}" if client is not None else "?"
        return self.front.caller(key, "http:" + where)

    def _request_id(self, request: Request, body_id: str | None) -> str:
        rid = body_id or request.headers.get("x-request-id") or uuid.uuid4().hex
        check_request_id(rid, self.front.limits)
        return rid

    # -- generation ------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        method = "POST /v1/chat/completions"
        return await self._handle(request, method, lambda: self._generate(request, method, True))

    async def completions(self, request: Request) -> Response:
        method = "POST /v1/completions"
        return await self._handle(request, method, lambda: self._generate(request, method, False))

    async def _generate(self, request: Request, method: str, chat: bool) -> Response:
        t0 = time.monotonic()
        body = await self._body(request, ChatCompletionRequest if chat else CompletionRequest)
        info = self.front.engine_info(body.model or "")
        rid = self._request_id(request, body.request_id)
        if chat:
            msgs = [body.internal(rid, info, self.front.limits)]
        else:
            prompts = body.prompts()
            ids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
            check_request_id(ids[-1], self.front.limits)  # the longest one
            msgs = [body.internal(r, p, info, self.front.limits) for r, p in zip(ids, prompts)]
        n = msgs[0].params.n or 1
        streams = self.front.open(self._caller(request), msgs)
        gen = _Generation(self, streams, n, t0, body, chat, info.model_id, rid)
        headers = {"x-request-id": rid}
        try:
            first = await _until_disconnected(request.receive, gen.first())
        except BaseException:
            await gen.aclose()
            raise
        if first is None:  # the client left
            await gen.aclose()
            self._count(method, "CANCELLED")
            return Response(status_code=499)
        if body.stream:
            return _EventStream(
                gen.sse(first), headers, lambda code: self._count(method, code), gen.outcome
            )
        try:
            result = await _until_disconnected(request.receive, gen.collect(first))
        finally:
            await gen.aclose()
        if result is None:
            self._count(method, "CANCELLED")
            return Response(status_code=499)
        self._count(method, "OK")
        return JSONResponse(result, headers=headers)

    # -- the rest --------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        async def fn():
            info = self.front.pool.engine_info()
            data = [] if info is None else [self._card(info)]
            self._count("GET /v1/models", "OK")
            return JSONResponse({"object": "list", "data": data})

        return await self._handle(request, "GET /v1/models", fn)

    async def model(self, request: Request) -> Response:
        async def fn():
            name = request.path_params["model"]
            info = self.front.engine_info(name)
            self._count("GET /v1/models/{model}", "OK")
            return JSONResponse(self._card(info))

        return await self._handle(request, "GET /v1/models/{model}", fn)

    @staticmethod
    def _card(info: ipc_pb2.EngineInfo) -> dict:
        return {
            "id": info.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "pagedserve",
            "root": info.model_id,
            "max_model_len": info.max_model_len,
        }

    async def tokenize(self, request: Request) -> Response:
        async def fn():
            body = await self._body(request, TokenizeRequest)
            info = self.front.engine_info(body.model or "")
            limits = self.front.limits
            if (body.prompt is None) == (body.messages is None):
                raise InvalidRequestError("set prompt or messages (one of them)", "prompt")
            if body.prompt is not None:
                add = True if body.add_special_tokens is None else body.add_special_tokens
                call = tokenize_call(body.prompt, limits, add)
            else:
                turns = [(m.role, m.text(i)) for i, m in enumerate(body.messages)]
                call = ipc_pb2.TokenizeCall(
                    chat=conversation_of(turns, body.add_generation_prompt, limits)
                )
            res = await self.front.call(call)
            out = {
                "count": len(res.token_ids),
                "max_model_len": info.max_model_len,
                "tokens": list(res.token_ids),
                "token_strs": list(res.tokens) if body.return_token_strs else None,
            }
            self._count("POST /tokenize", "OK")
            return JSONResponse(out)

        return await self._handle(request, "POST /tokenize", fn)

    async def detokenize(self, request: Request) -> Response:
        async def fn():
            body = await self._body(request, DetokenizeRequest)
            info = self.front.engine_info(body.model or "")
            res = await self.front.call(detokenize_call(body.tokens, info))
            self._count("POST /detokenize", "OK")
            return JSONResponse({"prompt": res.text})

        return await self._handle(request, "POST /detokenize", fn)

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self.front.pool.ready else 503)

    async def metrics(self, request: Request) -> Response:
        data = generate_latest(self.front.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "function-after", "none"}


def _validation_error(e: pydantic.ValidationError) -> Refused:
    """The first error pydantic found, with its place in the body (union branch tags such as
    ``list[int]`` left out of the path)."""
    err = e.errors(include_url=False, include_input=False)[0]
    if err.get("type") == "json_invalid":
        return Refused(Code.INVALID_ARGUMENT, f"the body is not valid JSON: {err.get('msg')}")
    loc = [
        str(x)
        for x in err.get("loc", ())
        if isinstance(x, int) or ("[" not in str(x) and str(x) not in _TYPE_TAGS)
    ]
    where = ".".join(loc)
    msg = f"{where}: {err.get('msg')}" if where else f"the body: {err.get('msg')}"
    return Refused(Code.INVALID_ARGUMENT, msg[:500], loc[0] if loc else None)


async def _until_disconnected(receive: Receive, work: Awaitable):
    """``work``'s result, or None when the client disconnects first (``work`` is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled (server shutdown): so is the work, to its end
        await _cancel(task)
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    await _cancel(task)
    return None


async def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    try:
        await asyncio.shield(task)
    except BaseException:  # its CancelledError, or what it raised while it unwound
        pass


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(Response):
    """Server-sent events from an async iterator of ``data:`` payloads. A disconnect cancels
    the iteration, whose ``finally`` aborts the request (Starlette's StreamingResponse leaves
    that to the ASGI server's spec version)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: dict,
        count: Callable[[str], None],
        outcome: Callable[[], str],
    ) -> None:
        self.status_code, self.background = 200, None
        self.init_headers({**SSE_HEADERS, **headers})  # no body: no content-length
        self.events, self.count, self.outcome = events, count, outcome

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> bool:
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            return True

        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            # The last (empty) body message is sent after the watch: once the response is
            # complete, the ASGI server answers receive() with a disconnect.
            done = await _until_disconnected(receive, pump())
            if done:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the socket went away under a send
            done = None
        finally:
            await self.events.aclose()
        self.count(self.outcome() if done else "CANCELLED")


class _Generation:
    """One HTTP generation request's streams (one per prompt) turned into OpenAI's shapes."""

    def __init__(
        self,
        api: OpenAIApi,
        streams: list[Stream],
        n: int,
        t0: float,
        body,
        chat: bool,
        model: str,
        rid: str,
    ) -> None:
        self.api, self.streams, self.n, self.body, self.chat = api, streams, n, body, chat
        self.model = model
        self.id = f"chatcmpl-{rid}" if chat else f"cmpl-{rid}"
        self.created = int(time.time())
        self.finished = [False] * len(streams)
        self.usage: dict[int, pb.Final] = {}  # choice index -> its final message
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.ensure_future(self._pump(i, s, t0)) for i, s in enumerate(streams)]
        self._open = len(streams)
        self._closed = False
        self.error: Refused | None = None  # what a streamed response ended with
        api.live.add(self)
        self._offsets: dict[int, int] = {}  # completions' text_offset per choice

    async def _pump(self, i: int, stream: Stream, t0: float) -> None:
        try:
            async for resp in self.api.front.relay(stream, self.n, t0):
                await self._queue.put((i, resp))
            self.finished[i] = True
        except Refused as e:
            await self._queue.put((i, e))
        except Exception:
            log.exception("relaying %s failed", stream.client_id)
            await self._queue.put((i, Refused(Code.INTERNAL, "internal error (logged)")))
        finally:
            await self._queue.put((i, None))

    def stop(self, reason: Refused) -> None:
        """End the response with ``reason`` (the server is shutting down)."""
        self._queue.put_nowait((0, reason))

    def outcome(self) -> str:
        """The status name a streamed response ended with (its error's, if one was sent)."""
        return self.error.code.name if self.error is not None else "OK"

    async def _events(self) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
        """(choice index, message) across the prompts' streams, as they come."""
        while self._open:
            i, item = await self._queue.get()
            if item is None:
                self._open -= 1
                continue
            if isinstance(item, Refused):
                raise item
            yield i * self.n + item.index, item

    async def first(self):
        """The first message (so errors before any output are an HTTP status, not a stream)."""
        self._iter = self._events().__aiter__()
        try:
            return await self._iter.__anext__()
        except StopAsyncIteration:
            return None

    async def _from(self, first) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
        """``first``, then the rest of the messages."""
        yield first
        async for item in self._iter:
            yield item

    async def aclose(self) -> None:
        """Stop relaying and close the streams (those not finished are aborted); once."""
        if self._closed:
            return
        self._closed = True
        self.api.live.discard(self)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for i, s in enumerate(self.streams):
            self.api.front.close(s, self.finished[i])

    # -- non-streaming ---------------------------------------------------------------------
    async def collect(self, first) -> dict:
        choices: dict[int, dict] = {}
        async for idx, resp in self._from(first):
            c = choices.setdefault(idx, {"text": [], "lp": [], "final": None})
            if resp.HasField("delta"):
                c["text"].append(resp.delta.text)
                c["lp"].extend(resp.delta.logprobs)
            else:
                c["final"] = resp.final
                self.usage[idx] = resp.final
        out = []
        for idx in sorted(choices):
            c, final = choices[idx], choices[idx]["final"]
            text = "".join(c["text"])
            choice: dict = {"index": idx}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = self._chat_logprobs(c["lp"]) if self.body.logprobs else None
            else:
                choice["text"] = text
                choice["logprobs"] = (
                    self._completion_logprobs(idx, c["lp"])
                    if self.body.logprobs is not None
                    else None
                )
            choice.update(self._finish(final))
            out.append(choice)
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": out, "usage": self._usage()}

    # -- streaming -------------------------------------------------------------------------
    async def sse(self, first) -> AsyncIterator[bytes]:
        try:
            async for event in self._sse(first):
                yield event
        finally:
            await self.aclose()

    async def _sse(self, first) -> AsyncIterator[bytes]:
        started: set[int] = set()
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        usage_field = {"usage": None} if self.body.include_usage else {}
        try:
            async for idx, resp in self._from(first):
                choice: dict = {"index": idx}
                if resp.HasField("delta"):
                    text, lps = resp.delta.text, resp.delta.logprobs
                    choice.update(self._delta(idx, text, lps, started))
                    choice["finish_reason"] = None
                else:
                    self.usage[idx] = resp.final
                    choice.update(self._delta(idx, "", (), started))
                    choice.update(self._finish(resp.final))
                yield _sse({**self._head(obj), "choices": [choice], **usage_field})
        except Refused as e:  # after the 200 went out: say it in the stream, as vLLM does
            self.error = e
            st = http_status(e.code)
            err = {"message": e.message, "type": st.type, "param": e.param, "code": e.code.name}
            yield _sse({"error": err})
        if self.body.include_usage:
            yield _sse({**self._head(obj), "choices": [], "usage": self._usage()})
        yield b"data: [DONE]\n\n"

    def _delta(self, idx: int, text: str, lps, started: set[int]) -> dict:
        if self.chat:
            delta: dict = {}
            if idx not in started:  # a choice's first chunk says who speaks
                started.add(idx)
                delta = {"role": "assistant", "content": ""}
            if text:
                delta["content"] = text
            lp = self._chat_logprobs(lps) if self.body.logprobs and lps else None
            return {"delta": delta, "logprobs": lp}
        lp = self._completion_logprobs(idx, lps) if self.body.logprobs is not None and lps else None
        return {"text": text, "logprobs": lp}

    # -- shapes ----------------------------------------------------------------------------
    def _head(self, obj: str) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.api.fingerprint,
        }

    @staticmethod
    def _finish(final: pb.Final | None) -> dict:
        if final is None:
            return {"finish_reason": None, "stop_reason": None}
        kind = final.WhichOneof("matched_stop")
        stop = getattr(final, kind) if kind else None
        return {"finish_reason": FINISH.get(final.finish_reason, "stop"), "stop_reason": stop}

    def _usage(self) -> dict:
        prompt = cached = completion = 0
        for idx, f in self.usage.items():
            completion += f.usage.completion_tokens
            if idx % self.n == 0:  # siblings share their prompt: count it once
                prompt += f.usage.prompt_tokens
                cached += f.usage.cached_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _chat_logprobs(self, lps) -> dict:
        content = []
        for lp in lps:
            content.append(
                {
                    "token": _token_str(lp.bytes),
                    "logprob": _logprob(lp.logprob),
                    "bytes": list(lp.bytes),
                    "top_logprobs": [
                        {"token": _token_str(t.bytes), "logprob": _logprob(t.logprob),
                         "bytes": list(t.bytes)}
                        for t in lp.top
                    ],
                }
            )  # fmt: skip
        return {"content": content}

    def _completion_logprobs(self, idx: int, lps) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = self._offsets.get(idx, 0)
        for lp in lps:
            s = _token_str(lp.bytes)
            tokens.append(s)
            token_lps.append(_logprob(lp.logprob))
            tops.append({_token_str(t.bytes): _logprob(t.logprob) for t in lp.top})
            offsets.append(offset)
            offset += len(s)
        self._offsets[idx] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class HttpServer:
    """uvicorn serving the app in the running event loop (no signal handlers of its own: the
    gateway's handle SIGINT/SIGTERM and stop both fronts)."""

    def __init__(self, api: OpenAIApi, config: HttpConfig, tls, grace_s: float) -> None:
        self.api, self.config, self.tls, self.grace_s = api, config, tls, grace_s
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self._socks: list[socket.socket] = []
        self.bound_port = 0

    async def start(self, socks: list[socket.socket]) -> None:
        kw = {}
        if self.tls is not None:
            kw = dict(ssl_certfile=self.tls.cert, ssl_keyfile=self.tls.key)
            if self.tls.client_ca:
                kw.update(ssl_ca_certs=self.tls.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            self.api.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(1, int(self.grace_s)),
            timeout_keep_alive=30,
            **kw,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        self._socks = socks
        self.bound_port = socks[0].getsockname()[1]
        await server.startup(sockets=socks)
        self._server = server
        self._task = asyncio.create_task(server.main_loop(), name="http-main-loop")

    async def stop(self) -> None:
        if self._server is None:
            return
        self.api.shutting_down()
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        await self._server.shutdown(sockets=self._socks)
        self._server = None


def listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for ``host``: every address it resolves to ("localhost" is
    127.0.0.1 and ::1, as gRPC binds it), skipping addresses this machine does not have (no
    IPv6 in a container, say). Raises OSError when the port is taken or nothing was bound."""
    host = host.strip("[]")
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    both = {info[0] for info in infos} >= {socket.AF_INET, socket.AF_INET6}
    socks: list[socket.socket] = []
    seen = set()
    skipped: OSError | None = None
    try:
        for family, _, _, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
            except OSError as e:  # the family itself is missing
                skipped = e
                continue
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" alone serves IPv4 too
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if both else 0)
            try:
                s.bind((addr[0], port, *addr[2:]))
            except OSError as e:
                if e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                socks.pop().close()
                skipped = e
                continue
            s.listen(1024)
            s.setblocking(False)
            port = s.getsockname()[1]  # with port 0, the others take the one the first got
        if not socks:
            raise skipped or OSError(f"{host!r} resolves to no address")
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks
