"""Gateway memory under maximum-size requests: the gateway's resident set (VmRSS) and its peak
(VmHWM) while 8 clients at once send the largest request each front accepts, and 8 send more.

A request is read whole before any check runs (gRPC parses the message, HTTP reads the body),
so the receive bound, not the in-flight bound, is what caps the gateway's memory per request:
six bytes per ``--max-prompt-chars`` character plus 1 MiB (7 MiB by default). Phases, in turn,
on one ``pagedserve up`` (default model), each with 8 concurrent requests:

1. gRPC ``Generate`` with a prompt of ``--max-prompt-chars`` 4-byte characters (the largest
   text a request may carry; the worker then refuses it as longer than the context);
2. gRPC with a message over the bound (refused by gRPC before the handler);
3. HTTP ``/v1/completions`` bodies just under the bound (JSON-escaped 4-byte characters);
4. HTTP bodies over the bound (413 after reading no more than the bound).

    python -m benchmarks.gateway_memory [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import grpc

from benchmarks.offline_throughput import write_section
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.pagedserve.v1 import inference_pb2_grpc as pb_grpc
from tests.serving_stack import start_stack, stop_stack

SECTION_START = "<!-- gateway-memory:start -->"
SECTION_END = "<!-- gateway-memory:end -->"
CLIENTS = 8
MAX_PROMPT_CHARS = 1_000_000  # the server's default --max-prompt-chars
BOUND = 6 * MAX_PROMPT_CHARS + (1 << 20)


def _mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def _grpc(stack, text: str) -> str:
    with grpc.insecure_channel(stack.target, options=[("grpc.max_send_message_length", -1)]) as ch:
        try:
            for _ in pb_grpc.InferenceStub(ch).Generate(
                pb.GenerateRequest(text=text, max_tokens=1), metadata=stack.auth, timeout=300
            ):
                pass
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def _http(stack, body: bytes) -> str:
    conn = http.client.HTTPConnection("localhost", stack.http_port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", body=body, headers={
            "content-type": "application/json", "authorization": f"Bearer {stack.api_key}"})  # fmt: skip
        return str(conn.getresponse().status)
    except (BrokenPipeError, ConnectionResetError):
        return "connection closed by the server"
    finally:
        conn.close()


def _phase(name: str, fn, arg, size: int, gateway: int) -> dict:
    print(f"[{name}] {CLIENTS} x {size / 2**20:.1f} MiB ...", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(lambda _: fn(arg), range(CLIENTS)))
    time.sleep(1.0)
    return {
        "phase": name,
        "size": size,
        "outcomes": sorted(set(outcomes)),
        "rss": _mib(gateway, "VmRSS"),
        "peak": _mib(gateway, "VmHWM"),
    }


def run() -> tuple[list[dict], float]:
    emoji = "\U0001f642"
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp))
        try:
            (gw,) = [p for p in stack.processes() if "pagedserve.cli gateway " in p]
            gateway = int(gw.split()[0])
            idle = _mib(gateway, "VmRSS")
            big_text = emoji * MAX_PROMPT_CHARS
            escaped = json.dumps({"prompt": emoji * ((BOUND - 4096) // 12)}).encode()
            over = b'{"prompt": "' + b"a" * (BOUND + 1024) + b'"}'
            rows = [
                _phase("gRPC, largest prompt", lambda t: _grpc(stack, t), big_text,
                       len(big_text.encode()), gateway),
                _phase("gRPC, over the bound", lambda t: _grpc(stack, t), "a" * (BOUND + 1024),
                       BOUND + 1024, gateway),
                _phase("HTTP, body under the bound", lambda b: _http(stack, b), escaped,
                       len(escaped), gateway),
                _phase("HTTP, body over the bound", lambda b: _http(stack, b), over, len(over),
                       gateway),
            ]  # fmt: skip
        finally:
            stop_stack(stack)
    return rows, idle


def render(rows: list[dict], idle: float, command: str) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION_START,
        "## Gateway memory under maximum-size requests",
        "",
        f"- Date: {date}; command: `{command}`",
        f"- `pagedserve up` with defaults (`--max-prompt-chars {MAX_PROMPT_CHARS}`: receive "
        f"bound {BOUND / 2**20:.1f} MiB for a gRPC message and an HTTP body); {CLIENTS} clients "
        "at once per phase, phases in turn; the gateway's VmRSS after each phase and its peak "
        "(VmHWM) so far",
        f"- Gateway RSS before the first phase: {idle:.0f} MiB",
        "",
        "| phase | request size (MiB) | answers | gateway RSS after (MiB) | peak so far (MiB) |",
        "|---|--:|---|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['phase']} | {r['size'] / 2**20:.1f} | {', '.join(r['outcomes'])} | "
            f"{r['rss']:.0f} | {r['peak']:.0f} |"
        )
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", help="write the section into this markdown file")
    a = ap.parse_args(argv)
    rows, idle = run()
    text = render(rows, idle, "python -m benchmarks.gateway_memory" + (
        f" --output {a.output}" if a.output else ""))  # fmt: skip
    print(text)
    if a.output:
        write_section(Path(a.output), text, SECTION_START, SECTION_END)
        print(f"wrote {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
