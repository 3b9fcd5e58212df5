"""Serving benchmark: a load generator (gRPC or OpenAI HTTP API) against the pagedserve stack,
and the offline engine.

Requests (random token-id prompts and output lengths, seeded; greedy, exactly ``max_tokens``
tokens each with EOS ignored) are sent at a Poisson or fixed request rate (``inf`` = all at
once), optionally under a concurrency cap, through one of the gateway's fronts (``--api``):

- ``grpc`` (default): ``Inference.Generate`` over one ``grpc.aio`` channel.
- ``openai``: ``POST /v1/completions`` with the token ids as ``prompt``, ``ignore_eos`` at the
  top level (vLLM's extra field), ``stream`` and ``stream_options.include_usage``, read as
  server-sent events through one ``httpx2.AsyncClient`` (no retries, no connection limit,
  one-hour timeouts).

From the client's clock, per request: TTFT (send to the first delta, or SSE chunk, carrying
tokens), ITL (gaps between deltas or chunks carrying tokens), TPOT ((last token time - first
token time) / (tokens - 1)) and end-to-end latency; per run: requests/s and output tokens/s,
and p50/p90/p99 of each latency. OpenAI chunks carry text, not token ids: a chunk carries
tokens when it has text or no finish reason yet (pagedserve sends one per engine step, its
text empty while the detokenizer holds back part of a character), and a request's output
tokens are what its final usage chunk says (the chunks counted when there is none). A non-OK
gRPC status, an HTTP error status (429 when the server is at its in-flight limit) or an error
event in the stream is the request's error, and fails the run.

Why plain httpx2 rather than the ``openai`` package's ``AsyncOpenAI`` (itself built on httpx2)
for ``--api openai``: the client shares the CPUs with the server it measures, and
``AsyncOpenAI`` builds pydantic objects from every chunk. On the 2-core dev machine (32
streams of 64 tokens at once, float32 SmolLM2-135M) the client spent about 550 µs of CPU per
chunk with ``AsyncOpenAI``, 265 µs with httpx2's SSE reader and ``json.loads``, and 120 µs per
delta with ``grpc.aio``; ``AsyncOpenAI`` cost the stack about 3% of its output tokens/s. On the
wire the requests are the JSON ``AsyncOpenAI`` sends (plus ``x-request-id``).

The same requests first go through the offline engine (``engine_svc.LLM.generate``) in this
process, before the stack starts so the two never share the CPU, with the same engine settings;
the stack's output tokens/s at the highest load is compared with the offline figure (target:
the stack keeps >= 90% of it). Results, with the machine, the command and the date, go to a
section of ``docs/benchmarks.md``, one per API (so a gRPC and an OpenAI section sit side by
side).

Run it from the repo root on a quiet machine (it starts ``pagedserve up`` itself, on free
ports for gRPC, metrics and HTTP whichever API is driven):

    python -m benchmarks.serving
    python -m benchmarks.serving --api openai

A smoke run (about 30 s, writes nothing unless --output is given):

    python -m benchmarks.serving --quick

Against a server that is already running (its engine settings are then its own): ``--target``
is the gRPC address, or with ``--api openai`` the OpenAI API's base URL (a bare HOST:PORT
means ``http://HOST:PORT/v1``):

    python -m benchmarks.serving --target localhost:50051
    python -m benchmarks.serving --api openai --target http://localhost:8000/v1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import resource
import shlex
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import httpx2
import numpy as np

from benchmarks.offline_throughput import (
    DEFAULT_OUTPUT,
    REPO_ROOT,
    Workload,
    WorkloadSpec,
    _engine_default,
    _span,
    _tps,
    machine_info,
    make_workload,
    warm_up_pagedserve,
    write_section,
)
from protos.pagedserve.v1 import inference_pb2 as pb
from protos.pagedserve.v1 import inference_pb2_grpc as pb_grpc

SECTION_START = "<!-- serving:start -->"
SECTION_END = "<!-- serving:end -->"
OPENAI_SECTION_START = "<!-- serving-openai:start -->"  # the --api openai run's own section
OPENAI_SECTION_END = "<!-- serving-openai:end -->"
TARGET_RATIO = 0.90  # the stack should keep this share of the offline engine's throughput
PERCENTILES = (50, 90, 99)
APIS = ("grpc", "openai")  # the gateway's fronts the load generator can drive (--api)


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """Engine settings given identically to the offline engine and to ``pagedserve up``."""

    dtype: str  # resolved (never "auto") once the offline engine has loaded
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_gib: float | None
    num_threads: int | None
    prefix_caching: bool

    def llm_kwargs(self) -> dict:
        kw: dict = dict(
            dtype=self.dtype,
            progress=False,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.prefix_caching,
            num_threads=self.num_threads,
        )
        if self.kv_cache_gib is not None:
            kw["kv_cache_memory"] = int(self.kv_cache_gib * 1024**3)
        return kw

    def up_argv(self) -> list[str]:
        argv = ["--dtype", self.dtype, "--max-num-seqs", str(self.max_num_seqs)]
        argv += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.kv_cache_gib is not None:
            argv += ["--kv-cache-memory", str(int(self.kv_cache_gib * 1024**3))]
        if self.num_threads is not None:
            argv += ["--num-threads", str(self.num_threads)]
        if not self.prefix_caching:
            argv.append("--no-prefix-caching")
        return argv

    def describe(self) -> str:
        kv = f"{self.kv_cache_gib:g} GiB" if self.kv_cache_gib is not None else "default (2 GiB)"
        threads = self.num_threads if self.num_threads is not None else "torch's default"
        return (
            f"dtype {self.dtype}, max_num_seqs {self.max_num_seqs}, max_num_batched_tokens "
            f"{self.max_num_batched_tokens}, KV cache {kv}, torch threads {threads}, prefix "
            f"caching {'on' if self.prefix_caching else 'off'}"
        )


@dataclass(frozen=True)
class LoadSpec:
    rate: float  # requests/s; math.inf = every request at once
    arrival: str  # "poisson" or "fixed"
    max_concurrency: int | None  # None = no cap

    @property
    def label(self) -> str:
        if math.isinf(self.rate):
            rate = "all at once"
        else:
            rate = f"{self.rate:g} req/s {self.arrival}"
        cap = f", ≤{self.max_concurrency} in flight" if self.max_concurrency else ""
        return rate + cap


def arrival_times(load: LoadSpec, n: int, seed: int) -> list[float]:
    """Seconds after the start at which each request is released (before the concurrency cap)."""
    if math.isinf(load.rate):
        return [0.0] * n
    if load.arrival == "fixed":
        return [i / load.rate for i in range(n)]
    rng = np.random.default_rng([seed, 1000])
    gaps = rng.exponential(1.0 / load.rate, n)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


# -- offline engine ------------------------------------------------------------------------------


@dataclass
class OfflineResult:
    output_tokens: int
    wall_s: float
    steps: int

    @property
    def tps(self) -> float:
        return _tps(self.output_tokens, self.wall_s)


def run_offline(llm, wl: Workload) -> OfflineResult:  # llm: engine_svc.LLM
    """Every request at once through ``LLM.generate``; engine steps counted on the side."""
    from engine_svc import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in wl.output_lens]
    engine = llm.engine
    step = engine.step
    steps = 0

    def counted_step():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted_step
    try:
        t0 = time.perf_counter()
        outs = llm.generate(wl.prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    finally:
        del engine.step  # back to the class's method
    tokens = 0
    for i, (o, want) in enumerate(zip(outs, wl.output_lens)):
        got = len(o.outputs[0].token_ids)
        if got != want:
            raise RuntimeError(f"offline request {i} produced {got} tokens, expected {want}")
        tokens += got
    return OfflineResult(tokens, wall, steps)


# -- requests and runs ---------------------------------------------------------------------------


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    max_tokens: int
    send: float = 0.0  # perf_counter when the call was made
    token_times: list[float] = field(default_factory=list)  # per delta/chunk carrying tokens
    token_counts: list[int] = field(default_factory=list)  # tokens in each of those deltas
    end: float = 0.0
    completion_tokens: int = 0  # as the final message's usage says (OpenAI: see chunked)
    cached_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None
    # OpenAI's chunks carry text, not token ids: token_counts are one per chunk carrying
    # tokens, and completion_tokens is the usage chunk's count (else the chunks counted).
    chunked: bool = False

    @property
    def streamed_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def output_tokens(self) -> int:
        """The tokens in the deltas (gRPC), or as the usage says (OpenAI)."""
        return self.completion_tokens if self.chunked else self.streamed_tokens

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.send

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e(self) -> float:
        return self.end - self.send


@dataclass
class Dist:
    mean: float
    p: dict[int, float]  # percentile -> value

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        if not values:
            return cls(math.nan, {q: math.nan for q in PERCENTILES})
        a = np.asarray(values, dtype=float)
        return cls(float(a.mean()), {q: float(np.percentile(a, q)) for q in PERCENTILES})

    def cell(self, scale: float = 1000.0, fmt: str = ".0f") -> str:
        return " / ".join(format(self.p[q] * scale, fmt) for q in PERCENTILES)


@dataclass
class ServingResult:
    load: LoadSpec
    records: list[RequestRecord]
    duration_s: float  # first release to the last final message
    cpu_s: dict[str, float] = field(default_factory=dict)  # process role -> CPU seconds
    engine_steps: int | None = None  # from the gateway's metrics, when it has them

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.error is None]

    @property
    def errors(self) -> list[str]:
        return [f"request {r.index}: {r.error}" for r in self.records if r.error is not None]

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)

    @property
    def requested_tokens(self) -> int:
        return sum(r.max_tokens for r in self.records)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.ok)

    @property
    def req_per_s(self) -> float:
        return _tps(len(self.ok), self.duration_s)

    @property
    def tok_per_s(self) -> float:
        return _tps(self.output_tokens, self.duration_s)

    @property
    def ttft(self) -> Dist:
        return Dist.of([r.ttft for r in self.ok if r.token_times])

    @property
    def tpot(self) -> Dist:
        return Dist.of([t for r in self.ok if (t := r.tpot) is not None])

    @property
    def itl(self) -> Dist:
        return Dist.of([g for r in self.ok for g in r.itls])

    @property
    def e2e(self) -> Dist:
        return Dist.of([r.e2e for r in self.ok])

    def check(self) -> None:
        """Every request completed with exactly the tokens asked for; raise otherwise."""
        problems = self.errors
        for r in self.ok:
            if r.output_tokens != r.max_tokens or r.completion_tokens != r.max_tokens:
                unit = "chunks" if r.chunked else "tokens"
                problems.append(
                    f"request {r.index}: streamed {r.streamed_tokens} {unit}, usage says "
                    f"{r.completion_tokens}, asked {r.max_tokens} (finish {r.finish_reason})"
                )
        if problems:
            raise RuntimeError(
                f"[{self.load.label}] {len(problems)} bad requests:\n  "
                + "\n  ".join(problems[:10])
            )


# -- clients: one per API ------------------------------------------------------------------------

WARM_UP_PROMPTS = (list(range(200, 216)), list(range(300, 309)))


class GrpcClient:
    """``Inference.Generate`` over one ``grpc.aio`` channel."""

    def __init__(self, target: str, api_key: str | None, timeout: float = 3600.0) -> None:
        self.target, self.timeout = target, timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def __aenter__(self) -> GrpcClient:
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.InferenceStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def warm_up(self) -> None:
        for ids in WARM_UP_PROMPTS:
            req = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=ids), max_tokens=4, temperature=0.0, ignore_eos=True
            )
            async for _ in self.stub.Generate(req, metadata=self.metadata, timeout=300):
                pass

    async def generate(self, rec: RequestRecord, prompt: list[int], request_id: str) -> None:
        """One request, its timings and counts into ``rec``; a non-OK status is its error."""
        try:
            req = pb.GenerateRequest(
                request_id=request_id,
                token_ids=pb.TokenIds(ids=prompt),
                max_tokens=rec.max_tokens,
                temperature=0.0,
                ignore_eos=True,
            )
            rec.send = time.perf_counter()
            call = self.stub.Generate(req, metadata=self.metadata, timeout=self.timeout)
            async for r in call:
                now = time.perf_counter()
                if r.HasField("delta"):
                    if r.delta.token_ids:
                        rec.token_times.append(now)
                        rec.token_counts.append(len(r.delta.token_ids))
                else:
                    rec.completion_tokens = r.final.usage.completion_tokens
                    rec.cached_tokens = r.final.usage.cached_tokens
                    rec.finish_reason = pb.FinishReason.Name(r.final.finish_reason)
            rec.end = time.perf_counter()
            if not rec.finish_reason:
                rec.error = "stream ended without a final message"
        except grpc.aio.AioRpcError as e:
            rec.end = time.perf_counter()
            rec.error = f"{e.code().name}: {e.details()}"


class OpenAIClient:
    """``POST /v1/completions``, streamed as server-sent events, through one
    ``httpx2.AsyncClient`` (why not ``openai.AsyncOpenAI``: the module's docstring)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float = 3600.0,
        transport: httpx2.AsyncBaseTransport | None = None,  # tests: httpx2.MockTransport
    ) -> None:
        self.base_url, self.timeout, self.transport = base_url.rstrip("/"), timeout, transport
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = ""  # the served model's id, from GET /models in warm_up()

    async def __aenter__(self) -> OpenAIClient:
        # No connection limit, so no request waits for a connection in the client's pool (the
        # concurrency cap is run_load's); httpx2 never retries (its transport's retries are 0).
        self.http = httpx2.AsyncClient(
            base_url=self.base_url,
            headers=self.headers,
            timeout=httpx2.Timeout(self.timeout),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None),
            transport=self.transport,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def warm_up(self) -> None:
        r = await self.http.get("/models")
        r.raise_for_status()
        self.model = r.json()["data"][0]["id"]
        for i, ids in enumerate(WARM_UP_PROMPTS):
            rec = RequestRecord(-1, len(ids), 4)
            await self.generate(rec, ids, f"warm-up-{i}")
            if rec.error is not None:
                raise RuntimeError(f"warm-up request failed: {rec.error}")

    async def generate(self, rec: RequestRecord, prompt: list[int], request_id: str) -> None:
        """One request, its timings and counts into ``rec``; an HTTP error status, an error
        event in the stream or a transport error is its error."""
        rec.chunked = True
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": rec.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"x-request-id": request_id}
        rec.send = time.perf_counter()
        try:
            async with self.http.sse(
                "/completions", method="POST", json=body, headers=headers
            ) as events:
                if events.response.status_code == 200:
                    await _read_chunks(events, rec)
                else:
                    rec.error = _http_error(
                        events.response.status_code, await events.response.aread()
                    )
        except (httpx2.HTTPError, ValueError) as e:  # transport errors, timeouts, bad JSON
            rec.error = f"{type(e).__name__}: {e}"
        rec.end = time.perf_counter()
        if rec.error is None and not rec.finish_reason:
            rec.error = "stream ended without a finish reason"


async def _read_chunks(events: httpx2.EventSource, rec: RequestRecord) -> None:
    """A chunk carries tokens when it has text or no finish reason yet: pagedserve's last chunk
    has neither tokens nor text, vLLM's may carry the last token's text."""
    usage = None
    async for ev in events:
        now = time.perf_counter()
        if ev.data.startswith("[DONE]"):
            continue  # the body ends next; read to its end so the connection is reused
        chunk = json.loads(ev.data)
        if chunk.get("error"):
            rec.error = _error_text(chunk["error"])
            return
        for choice in chunk.get("choices") or ():
            if choice.get("text") or choice.get("finish_reason") is None:
                rec.token_times.append(now)
                rec.token_counts.append(1)
            rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
        usage = chunk.get("usage") or usage
    rec.completion_tokens = usage["completion_tokens"] if usage else rec.streamed_tokens
    details = (usage or {}).get("prompt_tokens_details") or {}
    rec.cached_tokens = details.get("cached_tokens") or 0


def _error_text(err: object) -> str:
    """'CODE: message' from OpenAI's error object (pagedserve's codes are gRPC's names)."""
    if not isinstance(err, dict):
        return str(err)[:200]
    return f"{err.get('code') or err.get('type')}: {err.get('message')}"


def _http_error(status: int, body: bytes) -> str:
    try:
        return f"HTTP {status} {_error_text(json.loads(body)['error'])}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


Client = GrpcClient | OpenAIClient


def http_base_url(target: str) -> str:
    """The OpenAI API's base URL: ``target`` itself, or ``http://HOST:PORT/v1`` for a bare
    ``HOST:PORT``."""
    return target.rstrip("/") if "://" in target else f"http://{target}/v1"


def make_client(api: str, target: str, api_key: str | None) -> Client:
    if api == "openai":
        return OpenAIClient(http_base_url(target), api_key)
    return GrpcClient(target, api_key)


# -- load ----------------------------------------------------------------------------------------


async def _one_request(
    client: Client,
    rec: RequestRecord,
    prompt: list[int],
    release_at: float,
    sem: asyncio.Semaphore | None,
    tag: str,
) -> None:
    delay = release_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    if sem is not None:
        await sem.acquire()
    try:
        await client.generate(rec, prompt, f"{tag}-{rec.index}")
    finally:
        if sem is not None:
            sem.release()


async def run_load(
    client: Client, wl: Workload, load: LoadSpec, seed: int, tag: str = "bench"
) -> ServingResult:
    """Send every request of ``wl`` at ``load`` through ``client``; the records of all of them."""
    records = [
        RequestRecord(i, len(p), k) for i, (p, k) in enumerate(zip(wl.prompts, wl.output_lens))
    ]
    sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    offsets = arrival_times(load, wl.num_requests, seed)
    start = time.perf_counter()
    await asyncio.gather(
        *(
            _one_request(client, rec, p, start + off, sem, tag)
            for rec, p, off in zip(records, wl.prompts, offsets)
        )
    )
    duration = max(r.end for r in records) - start
    return ServingResult(load, records, duration)


# -- where the CPU went (Linux /proc) ------------------------------------------------------------


def _proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def stack_cpu_seconds(root_pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process ("client") and of each part of the
    ``pagedserve up`` tree under ``root_pid``, by role (engine, tokenizer, gateway, up)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"client": usage.ru_utime + usage.ru_stime}
    if root_pid is None or not os.path.isdir("/proc"):
        return out
    tick = os.sysconf("SC_CLK_TCK")
    kids = _proc_children()
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        role = "up"
        if "pagedserve.cli" in argv:
            after = argv[argv.index("pagedserve.cli") + 1 :]
            role = after[0] if after else "up"
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        out[role] = out.get(role, 0.0) + cpu
    return out


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def scrape_engine_steps(metrics_port: int | None) -> int | None:
    if not metrics_port:
        return None
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    steps = [  # one series per engine (data-parallel replicas): their sum
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(("pagedserve_engine_steps_total ", "pagedserve_engine_steps_total{"))
    ]
    return int(sum(steps)) if steps else None


# -- one benchmark, start to end -----------------------------------------------------------------


@dataclass
class Report:
    workload: Workload
    settings: EngineSettings
    offline: OfflineResult | None
    runs: list[ServingResult]
    target: str | None  # None: the benchmark started the stack itself
    tokenizer_workers: int
    data_parallel_size: int = 1
    machine: str = ""
    model: str = "?"
    api: str = "grpc"  # the front driven (one of APIS)

    @property
    def peak(self) -> ServingResult:
        """The run at the highest load: highest rate, then the loosest concurrency cap."""
        return max(
            self.runs,
            key=lambda r: (r.load.rate, r.load.max_concurrency or math.inf),
        )

    @property
    def ratio(self) -> float | None:
        if self.offline is None or not self.runs:
            return None
        return self.peak.tok_per_s / self.offline.tps


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_benchmark(
    spec: WorkloadSpec,
    num_requests: int,
    loads: Sequence[LoadSpec],
    settings: EngineSettings,
    *,
    model: str | None = None,
    target: str | None = None,
    api_key: str | None = None,
    tokenizer_workers: int = 2,
    data_parallel_size: int = 1,
    offline: bool = True,
    seed: int = 0,
    work_dir: Path | None = None,
    api: str = "grpc",
) -> Report:
    """Offline engine first (unless ``offline`` is False), then each load against the stack's
    ``api`` front: ``target`` if given (with ``api="openai"``, the API's base URL or HOST:PORT),
    else a ``pagedserve up`` started here and stopped at the end. The prompts are drawn from the
    model's vocabulary, hence the workload is made here."""
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    if target is not None and api == "openai":
        target = http_base_url(target)
    import torch

    from engine_svc import LLM

    load_avg = os.getloadavg()[0]
    llm = LLM(model=model, **settings.llm_kwargs())
    dtype = str(llm.engine.dtype).removeprefix("torch.")
    settings = EngineSettings(**{**settings.__dict__, "dtype": dtype})
    machine = machine_info(llm.engine, torch.get_num_threads(), load_avg)
    wl = make_workload(spec, num_requests, llm.engine.model_config.vocab_size, seed)
    off = None
    if offline:
        _print(f"[offline] {wl.num_requests} requests, {wl.requested_tokens:,} tokens ...")
        warm_up_pagedserve(llm)
        off = run_offline(llm, wl)
        _print(f"[offline] {off.tps:,.1f} output tok/s ({off.wall_s:.1f} s)")
    model_path = llm.engine.model_path
    del llm
    gc.collect()  # free the offline KV cache before the stack allocates its own

    stack = None
    with tempfile.TemporaryDirectory(prefix="serving-bench-", dir=work_dir) as tmp:
        try:
            if target is None:
                from tests.serving_stack import start_stack

                up = [*settings.up_argv(), "--tokenizer-workers", str(tokenizer_workers)]
                if data_parallel_size > 1:
                    up += ["--data-parallel-size", str(data_parallel_size)]
                up += ["--max-inflight", str(max(1024, 2 * wl.num_requests))]
                if model is not None:
                    up += ["--model", str(model)]
                _print(f"[stack] pagedserve up {shlex.join(up)} ...")
                # On free ports for gRPC, metrics and HTTP (--http-port), whatever the API.
                stack = start_stack(Path(tmp), *up, api_key=api_key)
                target = stack.base_url if api == "openai" else stack.target
            runs = asyncio.run(_drive(make_client(api, target, api_key), wl, loads, seed, stack))
        finally:
            if stack is not None:
                from tests.serving_stack import stop_stack

                stop_stack(stack)
    return Report(
        wl,
        settings,
        off,
        runs,
        None if stack is not None else target,
        tokenizer_workers,
        data_parallel_size,
        machine,
        model_path.name if model_path else "?",
        api,
    )


async def _drive(
    client: Client,
    wl: Workload,
    loads: Sequence[LoadSpec],
    seed: int,
    stack,  # tests.serving_stack.Stack | None
) -> list[ServingResult]:
    root = stack.proc.pid if stack is not None else None
    metrics_port = stack.metrics_port if stack is not None else None
    runs = []
    async with client:
        await client.warm_up()
        for k, load in enumerate(loads):
            _print(f"[stack] {load.label} ...")
            steps0 = scrape_engine_steps(metrics_port)
            cpu0 = stack_cpu_seconds(root)
            res = await run_load(client, wl, load, seed, tag=f"bench{k}")
            res.cpu_s = _cpu_delta(cpu0, stack_cpu_seconds(root))
            await asyncio.sleep(0.3)  # the engine's stats reach the gateway with its outputs
            steps1 = scrape_engine_steps(metrics_port)
            if steps0 is not None and steps1 is not None:
                res.engine_steps = steps1 - steps0
            res.check()
            _print(f"[stack] {load.label}: {res.tok_per_s:,.1f} output tok/s")
            runs.append(res)
    return runs


# -- report --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiText:
    """How a report names the API it drove, so each API has its own section in the doc."""

    markers: tuple[str, str]  # the section's start and end markers
    title: str
    row: str  # table rows: "{row}, {load}"
    via: str  # "... output tok/s through {via}"
    client: str
    timings: str


API_TEXT = {
    "grpc": ApiText(
        (SECTION_START, SECTION_END),
        "Serving: gRPC stack vs the offline engine",
        "gRPC stack",
        "the gRPC stack",
        "one `grpc.aio` channel",
        "TTFT = call to the first delta carrying tokens; ITL = gaps between deltas carrying "
        "tokens; TPOT = (last token − first token time) / (tokens − 1) per request; e2e = call "
        "to the final message. Duration = first request released to the last final message.",
    ),
    "openai": ApiText(
        (OPENAI_SECTION_START, OPENAI_SECTION_END),
        "Serving: OpenAI HTTP API (`/v1/completions`, SSE) vs the offline engine",
        "OpenAI API stack",
        "the OpenAI HTTP API",
        "one `httpx2.AsyncClient`, `POST /v1/completions` with token-id prompts, `stream` and "
        "`stream_options.include_usage`",
        "TTFT = request to the first SSE chunk carrying tokens (one with text or before the "
        "finish reason); ITL = gaps between such chunks; output tokens = the final usage "
        "chunk's count; TPOT = (last token − first token time) / (tokens − 1) per request; "
        "e2e = request to the end of the stream. Duration = first request released to the "
        "last stream's end.",
    ),
}


TABLE_HEADER = (
    "| load | requests | duration (s) | req/s | output tok/s | TTFT ms p50 / p90 / p99 "
    "| TPOT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 | e2e s p50 / p90 / p99 |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def table_rows(rep: Report) -> list[str]:
    rows = []
    if rep.offline is not None:
        o = rep.offline
        rows.append(
            f"| offline `LLM.generate`, all at once | {rep.workload.num_requests} "
            f"| {o.wall_s:.2f} | {_tps(rep.workload.num_requests, o.wall_s):.2f} "
            f"| {o.tps:,.1f} | — | — | — | — |"
        )
    for r in rep.runs:
        rows.append(
            f"| {API_TEXT[rep.api].row}, {r.load.label} | {len(r.ok)} | {r.duration_s:.2f} "
            f"| {r.req_per_s:.2f} | {r.tok_per_s:,.1f} | {r.ttft.cell()} | {r.tpot.cell()} "
            f"| {r.itl.cell()} | {r.e2e.cell(1.0, '.1f')} |"
        )
    return rows


def comparison(rep: Report) -> str:
    if rep.ratio is None or rep.offline is None:
        return "No offline comparison (--no-offline)."
    met = "met" if rep.ratio >= TARGET_RATIO else "**not met**"
    return (
        f"**Stack vs offline:** {rep.peak.tok_per_s:,.1f} output tok/s through "
        f"{API_TEXT[rep.api].via} "
        f"({rep.peak.load.label}) against {rep.offline.tps:,.1f} offline: "
        f"**{rep.ratio:.1%}** of the offline engine's throughput (target ≥ "
        f"{TARGET_RATIO:.0%}: {met})."
    )


def notes(rep: Report) -> list[str]:
    out = []
    steps_off = rep.offline.steps if rep.offline is not None else None
    for r in rep.runs:
        parts = [f"{r.load.label}: {r.output_tokens:,} output tokens"]
        if r.engine_steps is not None:
            parts.append(f"{r.engine_steps} engine steps")
        if r.cached_tokens:
            parts.append(f"{r.cached_tokens:,} prompt tokens from the prefix cache")
        if r.cpu_s:
            total = sum(r.cpu_s.values())
            cpu = ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(r.cpu_s.items(), key=lambda kv: -kv[1])
            )
            parts.append(
                f"CPU seconds {cpu} (total {total:.2f} in {r.duration_s:.2f} s of wall time)"
            )
        out.append("; ".join(parts) + ".")
    if steps_off is not None:
        out.append(f"The offline run took {steps_off} engine steps.")
    return out


def render_section(rep: Report, command: str) -> str:
    wl, api = rep.workload, API_TEXT[rep.api]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = (
        f"`pagedserve up` started by the benchmark ({rep.tokenizer_workers} tokenizer workers"
        + (f", {rep.data_parallel_size} engine replicas" if rep.data_parallel_size > 1 else "")
        + ")"
        if rep.target is None
        else f"the server at `{rep.target}` (its own engine settings)"
    )
    lines = [
        api.markers[0],
        f"## {api.title}",
        "",
        f"- Date: {date}",
        f"- Machine: {rep.machine}",
        f"- Model: {rep.model}",
        f"- Command: `{command}`",
        f"- Engine settings (both sides): {rep.settings.describe()}",
        f"- Workload: {wl.num_requests} requests, prompts {_span(wl.spec.prompt_range)} random "
        f"token ids, outputs {_span(wl.spec.output_range)} tokens ({wl.requested_tokens:,} "
        f"in all), greedy, EOS ignored; seeded, identical on both sides",
        f"- Server: {where}; the client ({api.client}) runs on the same machine",
        "",
        "The offline engine runs first, in the benchmark's process, before the stack starts. "
        f"Client-side timings: {api.timings}",
        "",
        TABLE_HEADER,
        *table_rows(rep),
        "",
        comparison(rep),
        "",
        *[f"- {n}" for n in notes(rep)],
        api.markers[1],
    ]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if a < 1 or b < a:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return a, b


def _rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        r = math.inf if part in ("inf", "infinity") else float(part)
        if not r > 0:
            raise argparse.ArgumentTypeError(f"request rates must be > 0, got {part!r}")
        out.append(r)
    if not out:
        raise argparse.ArgumentTypeError("no request rate given")
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help text says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    g = ap.add_argument_group("workload")
    g.add_argument(
        "--num-requests", type=int, default=None, help="requests per run (64; 8 with --quick)"
    )
    g.add_argument(
        "--prompt-len",
        type=_range,
        default=None,
        metavar="MIN:MAX",
        help="prompt length range in tokens, inclusive (16:256; 16:64 with --quick)",
    )
    g.add_argument(
        "--output-len",
        type=_range,
        default=None,
        metavar="MIN:MAX",
        help="output length range in tokens, inclusive (16:128; 8:32 with --quick)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrivals")

    g = ap.add_argument_group("load")
    g.add_argument(
        "--request-rates",
        type=_rates,
        default=None,
        metavar="R[,R...]",
        help="requests/s of each run, comma-separated; inf = all at once (the highest load, "
        "compared with the offline engine) (default: inf,1; inf with --quick)",
    )
    g.add_argument(
        "--arrival",
        choices=["poisson", "fixed"],
        default="poisson",
        help="inter-arrival times of finite rates: exponential (Poisson process) or constant",
    )
    g.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight at once, client side (default: no cap)",
    )

    g = ap.add_argument_group("server")
    g.add_argument(
        "--api",
        choices=APIS,
        default="grpc",
        help="the front the load generator drives: gRPC Inference.Generate, or the OpenAI "
        "HTTP API (POST /v1/completions, streamed as SSE); each writes its own section",
    )
    g.add_argument(
        "--target",
        default=None,
        metavar="HOST:PORT|URL",
        help="benchmark a running server instead of starting `pagedserve up`: its gRPC "
        "address, or with --api openai its OpenAI API base URL (HOST:PORT means "
        "http://HOST:PORT/v1)",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("PAGEDSERVE_API_KEY") or None,
        help="API key sent as 'authorization: Bearer' (default: $PAGEDSERVE_API_KEY); a stack "
        "started here requires it",
    )
    g.add_argument(
        "--tokenizer-workers",
        type=int,
        default=2,
        help="tokenizer worker processes of the stack started here",
    )
    g.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engine replicas of the stack started here (each gets its share of the cores "
        "unless --num-threads is given; the offline engine is one engine either way)",
    )

    g = ap.add_argument_group("engine (offline engine and the stack started here alike)")
    g.add_argument(
        "--model",
        default=None,
        help="HF-format model directory or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights/activations/KV dtype; auto = bfloat16 with native bf16 matmul, else "
        "float32 (resolved once, then given to both sides)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=_engine_default("max_num_seqs"),
        help="most requests running at once in the engine",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=_engine_default("max_num_batched_tokens"),
        help="token budget of one engine step (prefill chunks + decodes)",
    )
    g.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="KV cache size in GiB (default: the engine's, 2 GiB)",
    )
    g.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch intra-op threads of the engine (default: torch's choice)",
    )
    g.add_argument(
        "--prefix-caching",
        action="store_true",
        help="keep prefix caching on (off by default: every run resends the same prompts, "
        "which would then skip their prefill)",
    )

    g = ap.add_argument_group("output")
    g.add_argument("--no-offline", action="store_true", help="skip the offline engine run")
    g.add_argument(
        "--output",
        default=None,
        help=f"markdown file whose serving section is written or replaced (default: "
        f"{DEFAULT_OUTPUT.relative_to(REPO_ROOT)}; nothing with --quick); '-' writes nothing",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (~30 s): 8 requests, prompts 16-64, outputs 8-32, all at once",
    )
    args = ap.parse_args(argv)
    if args.num_requests is None:
        args.num_requests = 8 if args.quick else 64
    if args.prompt_len is None:
        args.prompt_len = (16, 64) if args.quick else (16, 256)
    if args.output_len is None:
        args.output_len = (8, 32) if args.quick else (16, 128)
    if args.request_rates is None:
        args.request_rates = [math.inf] if args.quick else [math.inf, 1.0]
    for name in (
        "num_requests",
        "tokenizer_workers",
        "data_parallel_size",
        "max_num_seqs",
        "max_num_batched_tokens",
    ):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        ap.error("--max-concurrency must be >= 1")
    if args.output is None:
        args.output = "-" if args.quick else str(DEFAULT_OUTPUT)
    return args


def workload_spec(prompt_len: tuple[int, int], output_len: tuple[int, int]) -> WorkloadSpec:
    fixed = prompt_len[0] == prompt_len[1] and output_len[0] == output_len[1]
    return WorkloadSpec("fixed" if fixed else "mixed", prompt_len, output_len)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    if load > 0.5:
        _print(
            f"warning: load average {load:.2f} at start: other work shares the CPU and the "
            "timings will be noisy"
        )
    command = shlex.join(
        ["python", "-m", "benchmarks.serving", *(sys.argv[1:] if argv is None else argv)]
    )
    loads = [LoadSpec(r, args.arrival, args.max_concurrency) for r in args.request_rates]
    settings = EngineSettings(
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gib=args.kv_cache_gib,
        num_threads=args.num_threads,
        prefix_caching=args.prefix_caching,
    )
    t0 = time.perf_counter()
    rep = run_benchmark(
        workload_spec(args.prompt_len, args.output_len),
        args.num_requests,
        loads,
        settings,
        model=args.model,
        target=args.target,
        api_key=args.api_key,
        tokenizer_workers=args.tokenizer_workers,
        data_parallel_size=args.data_parallel_size,
        offline=not args.no_offline,
        seed=args.seed,
        api=args.api,
    )
    _print(f"benchmark took {time.perf_counter() - t0:.0f} s")
    section = render_section(rep, command)
    start, end = API_TEXT[args.api].markers
    print(section.replace(start + "\n", "").replace(end + "\n", ""))
    if args.output != "-":
        path = Path(args.output)
        write_section(path, section, start, end)
        _print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
