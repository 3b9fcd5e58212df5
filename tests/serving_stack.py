"""Start ``pagedserve up`` as a real process tree for the end-to-end tests, and talk to it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pagedserve.v1 import inference_pb2 as pb
from protos.pagedserve.v1 import inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    api_key: str | None  # None: the server was started without a key
    run_dir: Path
    log_path: Path
    creds: grpc.ChannelCredentials | None = None  # a server started with --tls-cert
    http_port: int = 0  # the OpenAI-compatible HTTP API

    @property
    def base_url(self) -> str:
        scheme = "http" if self.creds is None else "https"
        return f"{scheme}://localhost:{self.http_port}/v1"

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def channel(self) -> grpc.Channel:
        if self.creds is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.creds)

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def metrics(self) -> dict[str, float]:
        """Every sample by its name with labels; a labelled family (the engine metrics carry
        an ``engine`` label) also under its bare name, summed over its series."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out: dict[str, float] = {}
        sums: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
                if m.group(2):
                    sums[m.group(1)] = sums.get(m.group(1), 0.0) + float(m.group(3))
        for name, total in sums.items():
            out.setdefault(name, total)
        return out

    def wait_metric(self, name: str, pred, timeout: float = 10.0) -> float:
        end = time.monotonic() + timeout
        while True:
            v = self.metrics().get(name)
            if v is not None and pred(v):
                return v
            if time.monotonic() > end:
                raise AssertionError(f"{name} = {v} did not reach the expected value")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def processes(self) -> list[str]:
        """Command lines of live processes that belong to this stack (by its run dir)."""
        out = subprocess.run(
            ["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True
        ).stdout
        return [line for line in out.splitlines() if str(self.run_dir) in line]


def start_stack(
    tmp: Path,
    *extra: str,
    timeout: float = 300.0,
    api_key: str | None = "test-key",
    creds: grpc.ChannelCredentials | None = None,
    env: dict[str, str] | None = None,
) -> Stack:
    """``pagedserve up`` on free ports with ``extra`` flags, once health says SERVING.

    ``api_key=None`` starts it without a key (and without $PAGEDSERVE_API_KEY, unless ``env``,
    variables added to the environment, sets it); ``creds``
    are the client's TLS credentials for a server started with ``--tls-cert`` in ``extra``."""
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    run_dir = tmp / "run"
    log_path = tmp / "up.log"
    argv = [
        sys.executable, "-m", "pagedserve.cli", "up",
        "--port", str(port), "--metrics-port", str(metrics_port),
        "--http-port", str(http_port), "--run-dir", str(run_dir),
    ]  # fmt: skip
    if api_key is not None:
        argv += ["--api-key", api_key]
    argv += extra
    extra_env = env or {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if api_key is None:
        env.pop("PAGEDSERVE_API_KEY", None)
    env.update(extra_env)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=env)
    stack = Stack(proc, port, metrics_port, api_key, run_dir, log_path, creds, http_port)
    wait_serving(stack, timeout)
    return stack


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``pagedserve ARGS`` in a child process, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_serving(stack: Stack, timeout: float) -> None:
    end = time.monotonic() + timeout
    with stack.channel() as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            if stack.proc.poll() is not None:
                raise RuntimeError(f"pagedserve up exited early:\n{stack.log()}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    stop_stack(stack)
    raise RuntimeError(f"pagedserve up did not become ready in {timeout}s:\n{stack.log()}")


def stop_stack(stack: Stack, timeout: float = 30.0) -> int:
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            stack.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait()
    return stack.proc.returncode


def stub(channel: grpc.Channel | grpc.aio.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


def collect(responses) -> dict:
    """Fold a Generate/Chat stream into {index: {"text", "token_ids", "final", "deltas"}}."""
    out: dict[int, dict] = {}
    for r in responses:
        slot = out.setdefault(r.index, {"text": "", "token_ids": [], "final": None, "deltas": 0})
        if r.HasField("delta"):
            assert slot["final"] is None, "a delta after the final message"
            slot["text"] += r.delta.text
            slot["token_ids"] += list(r.delta.token_ids)
            slot["deltas"] += 1
        else:
            assert slot["final"] is None, "two final messages for one index"
            slot["final"] = r.final
    return out


__all__ = [
    "Stack",
    "collect",
    "free_port",
    "run_cli",
    "pb",
    "start_stack",
    "stop_stack",
    "stub",
    "wait_serving",
]
