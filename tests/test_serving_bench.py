"""benchmarks/serving.py on a tiny workload: the offline run, a stack it starts, two loads over
gRPC and one over the OpenAI HTTP API; and its HTTP client against canned responses.

Checks the report's consistency only (token counts, ordered percentiles, the ratio, the
section), never timings."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx2

from benchmarks import serving
from benchmarks.serving import (
    OPENAI_SECTION_END,
    OPENAI_SECTION_START,
    SECTION_END,
    SECTION_START,
    EngineSettings,
    LoadSpec,
    OpenAIClient,
    RequestRecord,
    render_section,
    run_benchmark,
    workload_spec,
)

SETTINGS = EngineSettings(
    dtype="float32",
    max_num_seqs=8,
    max_num_batched_tokens=256,
    kv_cache_gib=0.05,
    num_threads=None,
    prefix_caching=False,
)


def _ordered(d: serving.Dist) -> bool:
    p = [d.p[q] for q in serving.PERCENTILES]
    return all(not math.isnan(v) for v in p) and p == sorted(p)


def test_serving_benchmark_report(tmp_path: Path) -> None:
    loads = [
        LoadSpec(math.inf, "poisson", None),
        LoadSpec(20.0, "fixed", 2),
    ]
    rep = run_benchmark(
        workload_spec((4, 12), (2, 8)),
        4,
        loads,
        SETTINGS,
        api_key="bench-key",
        tokenizer_workers=1,
        seed=3,
        work_dir=tmp_path,
    )
    wl = rep.workload
    assert wl.num_requests == 4 and all(2 <= k <= 8 for k in wl.output_lens)
    assert rep.offline is not None and rep.offline.output_tokens == wl.requested_tokens
    assert rep.offline.steps > 0
    assert [r.load for r in rep.runs] == loads
    for run in rep.runs:
        assert not run.errors
        assert len(run.ok) == 4
        for rec, want in zip(run.records, wl.output_lens):
            assert rec.max_tokens == want
            assert rec.streamed_tokens == rec.completion_tokens == want
            assert rec.finish_reason == "LENGTH"
            assert rec.send <= rec.token_times[0] <= rec.token_times[-1] <= rec.end
        assert run.output_tokens == wl.requested_tokens
        assert run.cached_tokens == 0  # prefix caching is off: the second run prefills too
        assert run.duration_s > 0 and run.tok_per_s > 0
        for d in (run.ttft, run.itl, run.e2e):
            assert _ordered(d)
        assert _ordered(run.tpot) or max(wl.output_lens) < 2
        assert run.cpu_s.get("engine", 0) > 0 and "tokenizer" in run.cpu_s
    assert rep.peak is rep.runs[0]
    assert rep.ratio == rep.runs[0].tok_per_s / rep.offline.tps
    assert rep.settings.dtype == "float32"

    section = render_section(rep, "python -m benchmarks.serving (test)")
    assert section.startswith(SECTION_START) and section.rstrip().endswith(SECTION_END)
    assert f"{rep.ratio:.1%}" in section
    assert section.count("| gRPC stack,") == 2

    # Written into a copy of a file with another benchmark's section: only ours changes.
    doc = tmp_path / "benchmarks.md"
    other = "<!-- offline_throughput:start -->\nkeep me\n<!-- offline_throughput:end -->\n"
    doc.write_text("# Benchmarks\n\n" + other)
    serving.write_section(doc, section, SECTION_START, SECTION_END)
    serving.write_section(doc, section, SECTION_START, SECTION_END)  # replaced, not appended
    text = doc.read_text()
    assert other in text and text.count(SECTION_START) == 1


def test_serving_benchmark_over_the_openai_api(tmp_path: Path) -> None:
    """The same workload through POST /v1/completions (SSE) of a stack started with a key."""
    load = LoadSpec(math.inf, "poisson", None)
    rep = run_benchmark(
        workload_spec((4, 12), (2, 8)),
        3,
        [load],
        SETTINGS,
        api_key="bench-key",
        tokenizer_workers=1,
        seed=5,
        work_dir=tmp_path,
        api="openai",
    )
    wl = rep.workload
    assert rep.api == "openai" and rep.target is None
    assert rep.offline is not None and rep.offline.output_tokens == wl.requested_tokens
    (run,) = rep.runs
    assert run.load == load and not run.errors and len(run.ok) == 3
    for rec, want in zip(run.records, wl.output_lens):
        assert rec.chunked and rec.max_tokens == want
        # pagedserve sends one chunk per engine step, i.e. per token here; usage agrees
        assert rec.streamed_tokens == rec.completion_tokens == rec.output_tokens == want
        assert rec.finish_reason == "length"  # OpenAI's word: the HTTP front answered
        assert rec.send <= rec.token_times[0] <= rec.token_times[-1] <= rec.end
    assert run.output_tokens == wl.requested_tokens and run.cached_tokens == 0
    for d in (run.ttft, run.itl, run.e2e):
        assert _ordered(d)

    section = render_section(rep, "python -m benchmarks.serving --api openai (test)")
    assert section.startswith(OPENAI_SECTION_START + "\n## Serving: OpenAI HTTP API")
    assert section.rstrip().endswith(OPENAI_SECTION_END)
    assert section.count("| OpenAI API stack, all at once |") == 1
    assert "through the OpenAI HTTP API (all at once)" in section
    assert f"{rep.ratio:.1%}" in section and "gRPC" not in section

    # Beside the gRPC section in the same file: each API replaces only its own.
    doc = tmp_path / "benchmarks.md"
    grpc_section = f"{SECTION_START}\n## Serving: gRPC stack\n{SECTION_END}\n"
    doc.write_text("# Benchmarks\n\n" + grpc_section)
    for _ in range(2):
        serving.write_section(doc, section, OPENAI_SECTION_START, OPENAI_SECTION_END)
    text = doc.read_text()
    assert grpc_section in text and text.count(OPENAI_SECTION_START) == 1


def _sse(*events: object) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )


def _chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}


def _run_client(response: httpx2.Response, max_tokens: int = 3) -> tuple[RequestRecord, list]:
    """One request of OpenAIClient against a transport that answers ``response``."""
    seen = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return response

    async def go() -> RequestRecord:
        rec = RequestRecord(0, 3, max_tokens)
        transport = httpx2.MockTransport(handler)
        async with OpenAIClient("http://test/v1", "k", transport=transport) as client:
            client.model = "m"
            await client.generate(rec, [5, 6, 7], "bench-0")
        return rec

    return asyncio.run(go()), seen


SSE = {"content-type": "text/event-stream"}


def test_openai_client_request_and_usage_count() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    usage["prompt_tokens_details"] = {"cached_tokens": 2}
    body = _sse(
        _chunk("a"),
        _chunk(""),  # a token whose character is not complete yet: still a token
        _chunk("b"),
        _chunk("", "length"),
        {"choices": [], "usage": usage},
        b"[DONE]",
    )
    rec, (req,) = _run_client(httpx2.Response(200, headers=SSE, content=body))
    assert req.method == "POST" and req.url == "http://test/v1/completions"
    assert req.headers["authorization"] == "Bearer k"
    assert req.headers["x-request-id"] == "bench-0"
    assert json.loads(req.content) == {
        "model": "m",
        "prompt": [5, 6, 7],
        "max_tokens": 3,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert rec.error is None and rec.finish_reason == "length"
    assert rec.token_counts == [1, 1, 1] and len(rec.token_times) == 3
    assert rec.completion_tokens == rec.output_tokens == 3 and rec.cached_tokens == 2
    assert rec.send <= rec.token_times[0] <= rec.end


def test_openai_client_counts_chunks_without_usage() -> None:
    body = _sse(_chunk("a"), _chunk("b"), _chunk("c", "length"), b"[DONE]")  # vLLM's last
    rec, _ = _run_client(httpx2.Response(200, headers=SSE, content=body), max_tokens=4)
    assert rec.error is None and rec.finish_reason == "length"
    assert rec.completion_tokens == rec.output_tokens == 3  # one per chunk carrying text


def test_openai_client_records_errors() -> None:
    err = {"message": "the queue is full", "type": "rate_limit", "code": "RESOURCE_EXHAUSTED"}
    rec, seen = _run_client(httpx2.Response(429, json={"error": err}))
    assert len(seen) == 1  # no retry
    assert rec.error == "HTTP 429 RESOURCE_EXHAUSTED: the queue is full"
    assert not rec.token_times and rec.send <= rec.end

    rec, _ = _run_client(httpx2.Response(502, content=b"<html>bad gateway</html>"))
    assert rec.error == "HTTP 502: <html>bad gateway</html>"

    body = _sse(_chunk("a"), {"error": {"message": "engine gone", "code": "UNAVAILABLE"}})
    rec, _ = _run_client(httpx2.Response(200, headers=SSE, content=body))
    assert rec.error == "UNAVAILABLE: engine gone" and len(rec.token_times) == 1

    body = _sse(_chunk("a"), b"[DONE]")
    rec, _ = _run_client(httpx2.Response(200, headers=SSE, content=body))
    assert rec.error == "stream ended without a finish reason"


def test_http_base_url() -> None:
    assert serving.http_base_url("localhost:8000") == "http://localhost:8000/v1"
    assert serving.http_base_url("https://h:1/v1/") == "https://h:1/v1"
