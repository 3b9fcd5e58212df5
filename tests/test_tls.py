"""gRPC over TLS and mutual TLS: ``--tls-cert`` / ``--tls-key`` / ``--tls-client-ca`` on the
gateway (real processes, real handshakes; certificates made by the openssl command for each
run), ``pagedserve health`` over TLS, and clear errors for bad TLS files."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving_stack import collect, free_port, pb, start_stack, stop_stack, stub
from tests.serving_stack import run_cli as _pagedserve

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, both
    signed by the CA, and a second CA that signed nothing here."""
    d = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=pagedserve test {ca}",
                 cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)  # fmt: skip
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out",
             "encrypted.key", cwd=d)  # fmt: skip
    return d


def _creds(certs: Path, ca: str = "ca.pem", client: bool = False) -> grpc.ChannelCredentials:
    key = (certs / "client.key").read_bytes() if client else None
    chain = (certs / "client.pem").read_bytes() if client else None
    return grpc.ssl_channel_credentials((certs / ca).read_bytes(), key, chain)


class Gateway:
    """``pagedserve gateway`` alone (no workers: health answers NOT_SERVING)."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.log = tmp / f"gateway-{self.port}.log"
        argv = [sys.executable, "-m", "pagedserve.cli", "gateway", "--port", str(self.port)]
        argv += ["--http-port", str(self.http_port)]
        argv += ["--listen", f"ipc://{tmp}/gw-{self.port}.sock", "--metrics-port", "0", *flags]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while "gateway listening on" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < end, self.log.read_text()
            time.sleep(0.1)

    def check(self, creds: grpc.ChannelCredentials | None) -> int:
        """Health status over a channel with ``creds`` (None: plaintext)."""
        target = f"localhost:{self.port}"
        ch = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
        with ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def https_health(self, certs: Path, ca: str = "ca.pem", client: bool = False) -> int:
        """The HTTP status of GET /health over HTTPS, verifying the server with ``ca``."""
        return _https_status(self.http_port, certs, "/health", ca, client)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _ssl_context(certs: Path, ca: str = "ca.pem", client: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / ca))
    if client:
        ctx.load_cert_chain(certs / "client.pem", certs / "client.key")
    return ctx


def _https_status(port: int, certs: Path, path: str, ca: str = "ca.pem", client=False) -> int:
    conn = http.client.HTTPSConnection(
        "localhost", port, timeout=10, context=_ssl_context(certs, ca, client)
    )
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture()
def gateway(tmp_path):
    started = []

    def start(*flags: str) -> Gateway:
        started.append(Gateway(tmp_path, *flags))
        return started[-1]

    yield start
    for g in started:
        g.stop()


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_tls_gateway_answers_only_over_tls_with_a_trusted_ca(certs, gateway):
    g = gateway("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"))
    assert "(TLS;" in g.log.read_text()
    assert g.check(_creds(certs)) == NOT_SERVING  # the handshake and the call went through
    for creds in (None, _creds(certs, ca="other-ca.pem")):  # plaintext; a CA that did not sign
        with pytest.raises(grpc.RpcError) as err:
            g.check(creds)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # pagedserve health: reached over TLS (it prints the status), not reached without it.
    target = f"localhost:{g.port}"
    ok = _pagedserve("health", "--target", target, "--tls-ca", str(certs / "ca.pem"))
    assert ok.returncode == 1 and ok.stdout.strip() == f"{target}: NOT_SERVING", ok
    plain = _pagedserve("health", "--target", target, "--timeout", "2")
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain
    # the HTTP port is HTTPS with the same certificate (503: no workers, so not serving)
    assert g.https_health(certs) == 503
    with pytest.raises(ssl.SSLCertVerificationError):
        g.https_health(certs, ca="other-ca.pem")
    conn = http.client.HTTPConnection("localhost", g.http_port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):  # plaintext is refused
        conn.request("GET", "/health")
        conn.getresponse()
    conn.close()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(certs, gateway):
    g = gateway(
        "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
        "--tls-client-ca", str(certs / "ca.pem"),
    )  # fmt: skip
    assert "(mutual TLS;" in g.log.read_text()
    assert g.check(_creds(certs, client=True)) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        g.check(_creds(certs))  # TLS, but no client certificate
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    target = f"localhost:{g.port}"
    ok = _pagedserve(
        "health", "--target", target, "--tls-ca", str(certs / "ca.pem"),
        "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key"),
    )  # fmt: skip
    assert ok.stdout.strip() == f"{target}: NOT_SERVING", ok
    assert g.https_health(certs, client=True) == 503
    with pytest.raises((ssl.SSLError, ConnectionError)):  # no client certificate
        g.https_health(certs)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "server.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (
            ["--tls-cert", "server.pem", "--tls-key", "missing.key"],
            "cannot read the TLS key {d}/missing.key: No such file or directory",
        ),
        (["--tls-cert", "san.ext", "--tls-key", "server.key"], "{d}/san.ext is not PEM"),
        (
            ["--tls-cert", "server.pem", "--tls-key", "client.key"],
            "do not make a pair: KEY_VALUES_MISMATCH",
        ),
        (
            ["--tls-cert", "server.pem", "--tls-key", "encrypted.key"],
            "the TLS key {d}/encrypted.key is encrypted: decrypt it first",
        ),
    ],
)
def test_bad_tls_flags_stop_at_once_with_a_clear_error(certs, tmp_path, flags, message):
    flags = [f if f.startswith("--") else str(certs / f) for f in flags]
    message = message.format(d=certs)
    # `up` checks them before it starts any process; the gateway alone exits 2 as well.
    up = _pagedserve("up", "--port", str(free_port()), "--run-dir", str(tmp_path / "run"), *flags)
    assert up.returncode == 2 and message in up.stderr, up
    assert "engine" not in up.stderr  # nothing was started
    gw = _pagedserve(
        "gateway", "--port", str(free_port()), "--metrics-port", "0", "--http-port", "0", *flags
    )
    assert gw.returncode == 2 and message in gw.stderr, gw


def test_up_with_tls_serves_generate_and_grpcurl(certs, tmp_path):
    stack = start_stack(
        tmp_path,
        "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
        creds=_creds(certs),
    )  # fmt: skip
    try:
        with stack.channel() as ch:
            req = pb.GenerateRequest(text="Hello", max_tokens=4, ignore_eos=True)
            out = collect(stub(ch).Generate(req, metadata=stack.auth, timeout=60))
        assert out[0]["final"].usage.completion_tokens == 4
        end = time.monotonic() + 10
        while "pagedserve is serving on" not in stack.log() and time.monotonic() < end:
            time.sleep(0.2)
        assert "(gRPC, TLS)" in stack.log() and "grpcurl -cacert CA.pem" in stack.log()
        grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
        base = [grpcurl, "-cacert", str(certs / "ca.pem")]
        listed = subprocess.run(
            [*base, stack.target, "list"], capture_output=True, text=True, timeout=60
        )
        assert listed.returncode == 0, listed.stderr
        assert "pagedserve.v1.Inference" in listed.stdout.split()
        tok = subprocess.run(
            [*base, "-H", f"authorization: Bearer {stack.api_key}", "-d", '{"text": "Hello"}',
             stack.target, "pagedserve.v1.Inference/Tokenize"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert tok.returncode == 0, tok.stderr
        assert json.loads(tok.stdout)["token_ids"]
        plain = subprocess.run(
            [grpcurl, "-plaintext", stack.target, "list"], capture_output=True, timeout=60
        )
        assert plain.returncode != 0
        # the OpenAI API over HTTPS, the official client verifying the certificate
        assert "OpenAI API on https://localhost:" in stack.log()
        http_client = openai.DefaultHttpxClient(verify=_ssl_context(certs))
        with openai.OpenAI(
            base_url=stack.base_url, api_key=stack.api_key, http_client=http_client
        ) as client:
            r = client.completions.create(
                model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=4,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
        assert r.usage.completion_tokens == 4
    finally:
        assert stop_stack(stack) == 0, stack.log()
