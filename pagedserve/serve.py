"""The serving commands: ``pagedserve up`` and its three parts ``engine``, ``tokenizer`` and
``gateway`` (what compose runs, one per container)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from protos.transport import Addresses, BindError, prepare_bind

log = logging.getLogger("pagedserve")

DEFAULT_ENGINE_ADDRESS = "tcp://127.0.0.1:5560"
DEFAULT_GATEWAY_ADDRESS = "tcp://127.0.0.1:5561"


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper bound when high is None); anything
    else is a usage error naming the range."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low or (high is not None and v > high):
            rng = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {v}")
        return v

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


positive_int = int_in(1)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


def setup_logging(level: str, part: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {part} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


# -- arguments ---------------------------------------------------------------------------------
def add_log_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (debug logs every engine step)",
    )


def add_gateway_args(p: argparse.ArgumentParser, standalone: bool) -> None:
    g = p.add_argument_group("gateway")
    g.add_argument(
        "--host",
        default="localhost",
        help="interface the gRPC and HTTP servers listen on (0.0.0.0 or [::] for all)",
    )
    g.add_argument("--port", type=int_in(1, 65535), default=50051, help="gRPC port")
    g.add_argument(
        "--http-port",
        type=int_in(0, 65535),
        default=8000,
        help="port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "...) on the same host, keys and TLS as gRPC (0 = off)",
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'authorization: Bearer KEY' (or 'x-api-key: KEY') metadata or HTTP "
        "header; repeat for several keys (also read from $PAGEDSERVE_API_KEY); health, "
        "reflection and HTTP /health and /metrics stay open",
    )
    g.add_argument(
        "--max-inflight",
        type=positive_int,
        default=1024,
        help="most generation requests in flight at once, gRPC and HTTP together; more get "
        "RESOURCE_EXHAUSTED (HTTP 429)",
    )
    g.add_argument(
        "--default-max-tokens",
        type=positive_int,
        default=256,
        help="max_tokens of a request that does not set it (capped by the context)",
    )
    g.add_argument(
        "--max-prompt-chars",
        type=positive_int,
        default=1_000_000,
        help="longest text prompt (or sum of chat message lengths) in characters",
    )
    g.add_argument(
        "--metrics-port",
        type=int_in(0, 65535),
        default=9400,
        help="port of the Prometheus /metrics endpoint (0 = off)",
    )
    g.add_argument("--metrics-host", default="localhost", help="interface of the metrics endpoint")
    g.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="serve gRPC over TLS (and HTTPS on the HTTP port) with this certificate chain, "
        "whose private key is the TLS key below (default: plaintext)",
    )
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the TLS private key")
    g.add_argument(
        "--tls-client-ca",
        default=None,
        metavar="PEM",
        help="mutual TLS: clients must present a certificate signed by this CA (with a TLS "
        "certificate and key)",
    )
    if standalone:
        g.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
        g.add_argument(
            "--listen",
            default=DEFAULT_GATEWAY_ADDRESS,
            help="ZeroMQ address the tokenizer workers connect to (tcp://host:port or ipc://path)",
        )
        g.add_argument(
            "--expect-workers",
            type=positive_int,
            default=1,
            help="report SERVING on health once this many tokenizer workers are ready",
        )


def add_tokenizer_args(p: argparse.ArgumentParser, standalone: bool) -> None:
    g = p.add_argument_group("tokenizer workers")
    g.add_argument(
        "--tokenizer-workers",
        "--workers",
        dest="tokenizer_workers",
        type=positive_int,
        default=2,
        help="tokenizer/detokenizer worker processes",
    )
    if standalone:
        g.add_argument(
            "--engine",
            action="append",
            default=None,
            help=f"an engine's address (default {DEFAULT_ENGINE_ADDRESS}); repeat it for "
            "data-parallel replicas of one model: each request goes to one of them, by prefix-"
            "cache affinity within a load margin",
        )
        g.add_argument("--gateway", default=DEFAULT_GATEWAY_ADDRESS, help="the gateway's address")
        g.add_argument(
            "--tokenizer",
            default=None,
            help="model directory to load tokenizer.json from (default: the path the engine "
            "reports, which must be readable here: a shared volume in compose)",
        )
        g.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)


# -- engine ------------------------------------------------------------------------------------
def cmd_engine(a: argparse.Namespace, engine_kwargs: dict) -> int:
    from engine_svc.config import EngineConfig
    from engine_svc.server import EngineServer
    from protos.errors import InvalidRequestError, ModelFetchError, ModelLoadError

    setup_logging(a.log_level, "engine" if a.index is None else f"engine-{a.index}")
    server = EngineServer(
        EngineConfig(model=a.model, **engine_kwargs), a.listen, a.served_model_name
    )

    def stop() -> None:
        if server.engine is None:  # still loading (model fetch, kernel build): stop right now
            raise KeyboardInterrupt
        server.stop()

    _on_term(stop)
    try:
        server.serve()
    except (BindError, InvalidRequestError, ModelLoadError) as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        if isinstance(e, ModelFetchError):
            return 1  # the network: worth the supervisor's retries
        return 2  # a configuration error (a bad model or flag): the supervisor does not retry it
    return 0


def add_engine_listen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen",
        default=DEFAULT_ENGINE_ADDRESS,
        help="ZeroMQ address the tokenizer workers connect to (tcp://host:port or ipc://path)",
    )
    p.add_argument("--index", type=int, default=None, help=argparse.SUPPRESS)  # replica k's logs


# -- tokenizer ---------------------------------------------------------------------------------
def cmd_tokenizer(a: argparse.Namespace) -> int:
    setup_logging(a.log_level, "tokenizer")
    engines = a.engine or [DEFAULT_ENGINE_ADDRESS]
    if len(set(engines)) != len(engines):
        _usage_error(f"an --engine address is given twice: {engines}")
    if a.tokenizer_workers == 1:
        from tokenizer_svc.worker import Worker, new_worker_id

        w = Worker(new_worker_id(a.index), a.gateway, engines, a.tokenizer)
        _on_term(w.stop)
        w.run()
        return 0
    from pagedserve.supervise import Child, Supervisor, python_argv

    base = ["tokenizer", "--workers", "1", "--gateway", a.gateway]
    for e in engines:
        base += ["--engine", e]
    base += ["--log-level", a.log_level] + (["--tokenizer", a.tokenizer] if a.tokenizer else [])
    sup = Supervisor(
        [
            Child(f"tokenizer worker {k}", python_argv(*base, "--index", str(k)))
            for k in range(a.tokenizer_workers)
        ]
    )
    return _supervise(sup)


# -- gateway -----------------------------------------------------------------------------------
def tls_config(a: argparse.Namespace):
    """The gateway's TlsConfig from its flags, or None for plaintext; exits 2 on a bad mix."""
    from gateway.server import TlsConfig

    if a.tls_cert is None and a.tls_key is None:
        if a.tls_client_ca is not None:
            _usage_error("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if a.tls_cert is None or a.tls_key is None:
        _usage_error("--tls-cert and --tls-key go together")
    return TlsConfig(a.tls_cert, a.tls_key, a.tls_client_ca)


def _usage_error(message: str):
    print(f"pagedserve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# `up` hands its --api-key values to the gateway in this variable (one per line), not on the
# gateway's command line, which every local user can read in `ps`.
KEYS_FROM_UP = "PAGEDSERVE_API_KEYS_FROM_UP"


def api_keys(a: argparse.Namespace) -> list[str]:
    """--api-key values and $PAGEDSERVE_API_KEY; a blank key is a usage error (it would let
    every call without a key through while looking like auth is on)."""
    handed = os.environ.get(KEYS_FROM_UP, "")
    keys = list(a.api_key or []) + (handed.split("\n") if handed else [])
    if os.environ.get("PAGEDSERVE_API_KEY"):
        keys.append(os.environ["PAGEDSERVE_API_KEY"])
    for k in keys:
        if not k.strip():
            _usage_error("an --api-key is empty (is the variable it came from unset?)")
        if k != k.strip() or not (k.isascii() and k.isprintable()):
            # gRPC metadata is printable ASCII; this also keeps up's hand-off one key per line
            _usage_error("an --api-key must be printable ASCII without leading or trailing spaces")
    return keys


def gateway_config(a: argparse.Namespace, workers_address: str, expect_workers: int):
    from gateway.server import GatewayConfig
    from protos.requests import Limits

    keys = api_keys(a)
    return GatewayConfig(
        host=a.host,
        port=a.port,
        workers_address=workers_address,
        expect_workers=expect_workers,
        api_keys=keys,
        max_inflight=a.max_inflight,
        metrics_host=a.metrics_host,
        metrics_port=a.metrics_port,
        limits=Limits(max_prompt_chars=a.max_prompt_chars, default_max_tokens=a.default_max_tokens),
        tls=tls_config(a),
        ready_file=getattr(a, "ready_file", None),
        http_port=a.http_port or None,
    )


def cmd_gateway(a: argparse.Namespace) -> int:
    import asyncio

    from gateway.server import Gateway, PortInUseError, TlsConfigError

    setup_logging(a.log_level, "gateway")
    cfg = gateway_config(a, a.listen, a.expect_workers)
    try:
        asyncio.run(Gateway(cfg).serve_forever())
    except (PortInUseError, TlsConfigError, BindError) as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2  # a configuration error: the supervisor does not retry it
    return 0


# -- up ----------------------------------------------------------------------------------------
def cmd_up(a: argparse.Namespace, engine_argv: list[str]) -> int:
    from pagedserve.supervise import Child, Supervisor, python_argv

    setup_logging(a.log_level, "up")
    dp = a.data_parallel_size
    tls = tls_config(a)  # checked here, so bad TLS flags stop `up` before anything starts
    if tls is not None:
        from gateway.server import TlsConfigError

        try:
            tls.credentials()
        except TlsConfigError as e:
            _usage_error(str(e))
    api_keys(a)  # checked here too, before anything starts
    if a.run_dir is not None:  # checked before anything starts: a usable, unused run dir
        try:
            for address in Addresses.in_run_dir(Path(a.run_dir), dp).all():
                prepare_bind(address, remove_stale=False)
        except BindError as e:
            _usage_error(f"--run-dir {a.run_dir}: {e}")
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="pagedserve-"))
    addr = Addresses.in_run_dir(run_dir, dp)
    log_args = ["--log-level", a.log_level]
    gw = ["gateway", "--listen", addr.gateway, "--expect-workers", str(a.tokenizer_workers)]
    gw += ["--host", a.host, "--port", str(a.port), "--max-inflight", str(a.max_inflight)]
    gw += ["--default-max-tokens", str(a.default_max_tokens)]
    gw += ["--max-prompt-chars", str(a.max_prompt_chars), "--http-port", str(a.http_port)]
    gw += ["--metrics-port", str(a.metrics_port), "--metrics-host", a.metrics_host]
    # Only the gateway checks keys: the others must not hold them (their environment is
    # readable by the same user in /proc). $PAGEDSERVE_API_KEY goes to it with the flags' keys.
    keys = api_keys(a)
    os.environ.pop("PAGEDSERVE_API_KEY", None)
    gw_env = {**os.environ, KEYS_FROM_UP: "\n".join(keys)} if keys else None
    if tls is not None:
        gw += ["--tls-cert", tls.cert, "--tls-key", tls.key]
        if tls.client_ca:
            gw += ["--tls-client-ca", tls.client_ca]
    ready_file = run_dir / "gateway.ready"
    ready_file.unlink(missing_ok=True)  # a run directory given again: not ready yet
    gw += ["--ready-file", str(ready_file)]
    engine_flags = [f for e in addr.engines for f in ("--engine", e)]
    sup = Supervisor(
        [
            *_engine_children(a, engine_argv, addr.engines, log_args),
            *[
                Child(
                    f"tokenizer worker {k}",
                    python_argv(
                        "tokenizer",
                        "--workers",
                        "1",
                        "--index",
                        str(k),
                        *engine_flags,
                        "--gateway",
                        addr.gateway,
                        *log_args,
                    ),
                )
                for k in range(a.tokenizer_workers)
            ],
            Child("gateway", python_argv(*gw, *log_args), env=gw_env),
        ]
    )
    where = f"{a.host}:{a.port}"
    announce = threading.Thread(
        target=_announce_when_serving,
        args=(where, a, addr.engines, ready_file, bool(keys)),
        daemon=True,
    )
    announce.start()
    try:
        return _supervise(sup)
    finally:
        if a.run_dir is None:  # ours: a temporary directory of sockets
            shutil.rmtree(run_dir, ignore_errors=True)


def _engine_children(
    a: argparse.Namespace, engine_argv: list[str], addresses: list[str], log_args: list[str]
) -> list:
    """One engine child per data-parallel replica. Replicas split the machine: on a GPU one
    device each (CUDA_VISIBLE_DEVICES), on the CPU an equal share of the cores each, unless
    --num-threads says otherwise."""
    from pagedserve.supervise import Child, python_argv

    dp = len(addresses)
    if dp == 1:
        return [
            Child(
                "engine", python_argv("engine", "--listen", addresses[0], *engine_argv, *log_args)
            )
        ]
    argv = list(engine_argv)
    if a.num_threads is None and a.device != "cuda":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        argv += ["--num-threads", str(max(1, (cores or os.cpu_count() or 1) // dp))]
    devices = _visible_gpus() if a.device != "cpu" else []
    if devices and len(devices) < dp:
        log.warning("%d engine replicas share %d GPUs", dp, len(devices))
    children = []
    for k, address in enumerate(addresses):
        env = None
        if devices:  # each replica sees one device
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices[k % len(devices)])
        argv_k = python_argv("engine", "--listen", address, "--index", str(k), *argv, *log_args)
        children.append(Child(f"engine {k}", argv_k, env=env))
    return children


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries ([] for none)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # set, even to "": the user's choice
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(k) for k in range(torch.cuda.device_count())]
    except Exception:  # no torch build with CUDA: no GPUs
        return []


def _announce_when_serving(
    where: str, a: argparse.Namespace, engines: list[str], ready_file: Path, keyed: bool
) -> None:
    # The gateway keeps ready_file while its health says SERVING (with TLS, a health call
    # from here could not verify a certificate made for another host name).
    while not ready_file.exists():
        time.sleep(0.5)
    # Health turns SERVING with the first ready replica; the announcement waits for all.
    while len(engines) > 1 and not all(_engine_ready(e, 2.0) for e in engines):
        time.sleep(0.5)
    metrics = (
        f", metrics on http://{a.metrics_host}:{a.metrics_port}/metrics" if a.metrics_port else ""
    )
    replicas = f", {len(engines)} engine replicas" if len(engines) > 1 else ""
    if a.tls_cert is None:
        security, flags = "plaintext", "-plaintext"
    else:
        security = "mutual TLS" if a.tls_client_ca else "TLS"
        flags = "-cacert CA.pem" + (
            " -cert CLIENT.pem -key CLIENT-KEY.pem" if a.tls_client_ca else ""
        )
    http = ""
    if a.http_port:
        scheme = "http" if a.tls_cert is None else "https"
        base = f"{scheme}://{_url_host(a.host)}:{a.http_port}/v1"
        http = (
            f"\n  OpenAI API on {base}: curl {base}/chat/completions -H 'content-type: "
            "application/json'"
            + (" -H 'authorization: Bearer KEY'" if keyed else "")
            + ' -d \'{"messages": [{"role": "user", "content": "Hi"}]}\''
        )
    print(
        f"pagedserve is serving on {where} (gRPC, {security}){replicas}{metrics}\n"
        f'  try: {_grpcurl()} {flags} -d \'{{"text": "Hello", "max_tokens": 16}}\' '
        f"{where} pagedserve.v1.Inference/Generate{http}\n  Ctrl-C stops everything.",
        file=sys.stderr,
        flush=True,
    )


def _grpcurl() -> str:
    """grpcurl as the user can run it: on PATH, or the one setup installed beside this
    Python (``.venv/bin``, not on PATH unless the venv is activated)."""
    if shutil.which("grpcurl"):
        return "grpcurl"
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside) if beside.exists() else "grpcurl"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::", "[::]"):
        return "localhost"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _supervise(sup) -> int:
    stop = threading.Event()
    _on_term(stop.set)
    sup.start()
    code = 0
    try:
        while not stop.wait(0.5):
            reason = sup.check()
            if reason is not None:
                print(f"pagedserve: {reason}; stopping", file=sys.stderr)
                code = 1
                break
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop()
    return code


def _on_term(fn) -> None:
    """SIGTERM, SIGINT and SIGHUP (its terminal closed) call fn, so a part stops cleanly under
    compose and supervisors, and `up` cleans up after its children."""

    def handler(signum, frame):
        fn()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


# -- health ------------------------------------------------------------------------------------
def cmd_health(a: argparse.Namespace) -> int:
    """Exit 0 when the part answers that it is ready (for container health checks)."""
    if a.engine:
        return _engine_health(a.engine, a.timeout)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(a) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout
            )
        except grpc.RpcError as e:
            print(f"{a.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(f"{a.target}: {name}")
    return 0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1


def _engine_health(address: str, timeout: float) -> int:
    st = _engine_status(address, timeout)
    if st is None:
        print(f"{address}: no answer in {timeout}s", file=sys.stderr)
        return 1
    state = "ready" if st.ready else f"not ready{': ' + st.error if st.error else ' (loading)'}"
    print(f"{address}: engine {state}")
    return 0 if st.ready else 1


def _engine_ready(address: str, timeout: float) -> bool:
    st = _engine_status(address, timeout)
    return st is not None and st.ready


def _engine_status(address: str, timeout: float):
    """The engine's EngineStatus, or None when it does not answer within ``timeout``."""
    import zmq

    from protos.pagedserve.internal.v1 import ipc_pb2

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, f"health-{os.getpid()}".encode())
    try:
        s.connect(address)
    except zmq.ZMQError as e:
        s.close()
        ctx.term()
        _usage_error(f"cannot connect to {address}: {e}")
    try:
        s.send(ipc_pb2.WorkerToEngine(hello=ipc_pb2.Hello(worker_id="health")).SerializeToString())
        if not s.poll(int(timeout * 1000)):
            return None
        return ipc_pb2.EngineToWorker.FromString(s.recv()).status
    finally:
        s.close()
        ctx.term()


def _channel(a: argparse.Namespace):
    """A channel to ``a.target``: plaintext, or TLS with --tls / --tls-ca (and a client
    certificate for mutual TLS)."""
    import grpc

    if not (a.tls or a.tls_ca or a.tls_cert or a.tls_key or a.tls_server_name):
        return grpc.insecure_channel(a.target)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return open(path, "rb").read()
        except OSError as e:
            _usage_error(f"cannot read {path}: {e.strerror}")

    if (a.tls_cert is None) != (a.tls_key is None):
        _usage_error("--tls-cert and --tls-key go together")
    creds = grpc.ssl_channel_credentials(read(a.tls_ca), read(a.tls_key), read(a.tls_cert))
    options = [("grpc.ssl_target_name_override", a.tls_server_name)] if a.tls_server_name else []
    return grpc.secure_channel(a.target, creds, options)


def add_health_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target", default="localhost:50051", help="gateway address (host:port) to check"
    )
    p.add_argument("--service", default="", help="health service name ('' = the whole server)")
    p.add_argument(
        "--engine",
        default=None,
        help="check an engine's ZeroMQ address instead (e.g. tcp://127.0.0.1:5560)",
    )
    p.add_argument(
        "--timeout", type=positive_float, default=5.0, help="seconds to wait for an answer"
    )
    g = p.add_argument_group("TLS (a gateway started with --tls-cert)")
    g.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system CAs")
    g.add_argument(
        "--tls-ca", default=None, metavar="PEM", help="connect over TLS, trusting this CA"
    )
    g.add_argument(
        "--tls-server-name",
        default=None,
        help="the name the server's certificate must carry, if not the target's host",
    )
    g.add_argument(
        "--tls-cert", default=None, metavar="PEM", help="client certificate, for mutual TLS"
    )
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the client certificate's key")
