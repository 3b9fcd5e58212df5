"""Assemble the gateway: the Inference service, health (with a real Watch), reflection, the
API-key interceptor, keepalive settings and the metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.errors import Refused, api_key_refusal
from gateway.frontend import Frontend
from gateway.http_api import HttpConfig, HttpServer, OpenAIApi, listen
from gateway.metrics import Metrics
from gateway.service import BadRequest, InferenceService
from gateway.workers import WorkerPool
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.requests import Limits

log = logging.getLogger("pagedserve.gateway")

SERVICE = "pagedserve.v1.Inference"
# Methods a client may call without the API key: load balancers and grpcurl need them.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class PortInUseError(OSError):
    """The gRPC port cannot be bound (taken, or a bad host)."""


class TlsConfigError(ValueError):
    """The TLS files cannot be read or do not make a usable server credential."""


@dataclass(slots=True)
class TlsConfig:
    """PEM files: the server's certificate chain and key, and optionally the CA that client
    certificates must be signed by (mutual TLS: clients without one are refused)."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: str, what: str) -> bytes:
            try:
                data = open(path, "rb").read()
            except OSError as e:
                raise TlsConfigError(f"cannot read the TLS {what} {path}: {e.strerror}") from None
            if b"-----BEGIN " not in data:
                raise TlsConfigError(f"the TLS {what} {path} is not PEM")
            return data

        chain, key = read(self.cert, "certificate"), read(self.key, "key")
        ca = read(self.client_ca, "client CA") if self.client_ca else None
        if b"ENCRYPTED" in key:  # grpc cannot use one, and OpenSSL would prompt for it
            raise TlsConfigError(
                f"the TLS key {self.key} is encrypted: decrypt it first "
                "(openssl pkey -in KEY -out PLAIN-KEY)"
            )
        # grpc reports a key that does not match the certificate only as a failed bind;
        # Python's ssl module (OpenSSL) says what is wrong.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.cert, self.key, password=lambda: b"")
        except (ssl.SSLError, OSError) as e:
            raise TlsConfigError(
                f"the TLS certificate {self.cert} and key {self.key} do not make a pair: "
                f"{getattr(e, 'reason', None) or e}"
            ) from None
        if self.client_ca:
            try:
                ctx.load_verify_locations(self.client_ca)
            except (ssl.SSLError, OSError) as e:
                raise TlsConfigError(
                    f"the TLS client CA {self.client_ca} is not usable: "
                    f"{getattr(e, 'reason', None) or e}"
                ) from None
        creds = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
        )
        # What OpenSSL takes grpc may still refuse (e.g. an Ed448 key): try it on a
        # throwaway server, so that shows as a TLS error and not as a port that is taken.
        probe = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        try:
            probe.add_secure_port("127.0.0.1:0", creds)
        except RuntimeError:
            raise TlsConfigError(
                f"grpc cannot serve with the TLS certificate {self.cert} and key {self.key} "
                "(RSA and ECDSA P-256/P-384 keys work)"
            ) from None
        finally:
            probe.stop(None)
        return creds


@dataclass(slots=True)
class GatewayConfig:
    host: str = "localhost"
    port: int = 50051
    workers_address: str = "ipc:///tmp/pagedserve/gateway.sock"
    expect_workers: int = 1
    api_keys: list[str] = field(default_factory=list)
    max_inflight: int = 1024
    metrics_host: str = "localhost"
    metrics_port: int = 0  # 0 = no metrics endpoint
    limits: Limits = field(default_factory=Limits)
    grace_s: float = 5.0
    tls: TlsConfig | None = None  # None: plaintext
    ready_file: str | None = None  # touched while SERVING, removed otherwise (for `up`)
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API; None = off (0 = any port)

    @property
    def max_body_bytes(self) -> int:
        """The bound of an HTTP body and of a gRPC request message: room for the longest
        acceptable prompt (--max-prompt-chars) as escaped JSON (up to six bytes per character)
        plus the rest of the request."""
        return 6 * self.limits.max_prompt_chars + (1 << 20)


def _safe(cls):
    """A deserializer that never raises: bad bytes become a BadRequest (INVALID_ARGUMENT)."""

    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:
            return BadRequest(str(e) or type(e).__name__)

    return parse


def inference_handler(svc: InferenceService) -> grpc.GenericRpcHandler:
    stream = grpc.unary_stream_rpc_method_handler
    unary = grpc.unary_unary_rpc_method_handler
    methods = {
        "Generate": (stream, svc.Generate, pb.GenerateRequest, pb.GenerateResponse),
        "Chat": (stream, svc.Chat, pb.ChatRequest, pb.GenerateResponse),
        "Tokenize": (unary, svc.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
        "Detokenize": (unary, svc.Detokenize, pb.DetokenizeRequest, pb.DetokenizeResponse),
        "ListModels": (unary, svc.ListModels, pb.ListModelsRequest, pb.ListModelsResponse),
        "GetModelInfo": (unary, svc.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo),
        "Abort": (unary, svc.Abort, pb.AbortRequest, pb.AbortResponse),
    }
    handlers = {
        name: make(fn, request_deserializer=_safe(req), response_serializer=resp.SerializeToString)
        for name, (make, fn, req, resp) in methods.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """``authorization: Bearer <key>`` (or ``x-api-key: <key>``) must name a configured key."""

    def __init__(self, keys: list[str], metrics: Metrics) -> None:
        self.keys = [k.encode() for k in keys]
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        md = dict(details.invocation_metadata or ())
        refusal = api_key_refusal(md.get("authorization", ""), md.get("x-api-key", ""), self.keys)
        if refusal is None:
            return handler
        return _denied(handler, refusal, self.metrics, details.method.rsplit("/", 1)[-1])


def _denied(handler, refusal: Refused, metrics: Metrics, method: str):
    # Counted when the call is answered, as the servicer counts its own refusals: the
    # servicer never sees this call.
    def count() -> None:
        metrics.requests.labels(method, refusal.code.name).inc()
        metrics.count_refusal(refusal)

    async def deny(request, context):
        count()
        await context.abort(refusal.code, refusal.message)

    async def deny_stream(request, context):
        count()
        await context.abort(refusal.code, refusal.message)
        yield  # pragma: no cover (makes this an async generator)

    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


NO_LIMIT = 2**31 - 1  # the largest value a grpc integer option takes
SERVER_OPTIONS = [
    # Long prefills leave streams silent for a while: let clients ping every 10 s and keep
    # idle connections, instead of answering their pings with GOAWAY.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC sets SO_REUSEPORT by default: a second server on the port would then start without
    # an error and take half the connections. One server per port.
    ("grpc.so_reuseport", 0),
    # grpc core keeps calls that arrived before the event loop asked for them in a pending
    # queue, and past 1,000 of them (all of them past 3,000) ends new ones with CANCELLED
    # before any handler sees them: a burst of a few thousand streams got uncounted CANCELLED
    # answers. The in-flight bound (--max-inflight) is the admission control: let every call
    # through to it, so each refusal is RESOURCE_EXHAUSTED and counted in pagedserve_requests.
    ("grpc.server.max_pending_requests", NO_LIMIT),
    ("grpc.server.max_pending_requests_hard_limit", NO_LIMIT),
]


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.pool = WorkerPool(config.workers_address, config.expect_workers)
        self.metrics = Metrics(self.pool)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.http: HttpServer | None = None
        self.bound_port = 0
        self.http_port = 0  # bound, once started (0: no HTTP API)

    async def start(self) -> None:
        c = self.config
        interceptors = [ApiKeyInterceptor(c.api_keys, self.metrics)] if c.api_keys else []
        # A request is read whole before any handler sees it: bound it by the longest prompt
        # the server accepts (the same bound as an HTTP body), not a flat 64 MB.
        options = [*SERVER_OPTIONS, ("grpc.max_receive_message_length", c.max_body_bytes)]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.front = Frontend(
            self.pool, c.limits, c.max_inflight, self.metrics, keyed=bool(c.api_keys)
        )
        svc = InferenceService(self.front)
        self.server.add_generic_rpc_handlers((inference_handler(svc),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        await self._set_health(False)
        self.pool.on_health_change = lambda ready: asyncio.ensure_future(self._set_health(ready))
        creds = c.tls.credentials() if c.tls is not None else None  # bad files fail first
        await self.pool.start()
        try:
            if creds is None:
                self.bound_port = self.server.add_insecure_port(f"{c.host}:{c.port}")
            else:
                self.bound_port = self.server.add_secure_port(f"{c.host}:{c.port}", creds)
        except RuntimeError as e:  # grpc raises this when the port is taken
            raise PortInUseError(f"cannot listen on {c.host}:{c.port}: {e}") from None
        if self.bound_port == 0:
            raise PortInUseError(
                f"cannot listen on {c.host}:{c.port} (another server listens there, or one is "
                "still shutting down: retry in a few seconds)"
            )
        await self.server.start()
        if c.http_port is not None:
            await self._start_http()
        if c.metrics_port:
            self.metrics.serve(c.metrics_host, c.metrics_port)
        log.info(
            "gateway listening on %s:%d for gRPC%s (%s; workers at %s)",
            c.host,
            self.bound_port,
            f" and :{self.http_port} for HTTP (OpenAI API)" if self.http else "",
            "plaintext" if c.tls is None else "TLS" if not c.tls.client_ca else "mutual TLS",
            c.workers_address,
        )

    async def _start_http(self) -> None:
        c = self.config
        try:
            socks = listen(c.host, c.http_port)
        except OSError as e:
            raise PortInUseError(f"cannot listen on {c.host}:{c.http_port} (HTTP): {e}") from None
        hc = HttpConfig(c.host, c.http_port, c.max_body_bytes, list(c.api_keys), c.metrics_port > 0)
        self.http = HttpServer(OpenAIApi(self.front, hc), hc, c.tls, c.grace_s)
        await self.http.start(socks)
        self.http_port = self.http.bound_port

    async def _set_health(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE, status)
        if self.config.ready_file:
            try:
                if ready:
                    open(self.config.ready_file, "w").close()
                else:
                    os.unlink(self.config.ready_file)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot update %s: %s", self.config.ready_file, e)

    async def stop(self) -> None:
        await self._set_health(False)
        stops = []
        if self.server is not None:
            stops.append(self.server.stop(self.config.grace_s))
        if self.http is not None:
            stops.append(self.http.stop())
        await asyncio.gather(*stops)
        await self.pool.close()

    async def serve_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("gateway stopping")
        await self.stop()
