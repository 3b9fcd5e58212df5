"""The Prometheus metrics: vLLM-named request and engine metrics, refusals, and the Grafana
dashboard in docs/. End-to-end against ``pagedserve up`` (scraped over HTTP from its metrics
port and parsed with prometheus_client's own parser), plus the gateway's relay in process for
what a real stack cannot be made to do on demand (a full engine queue)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import QUEUE_FULL, Refused
from gateway.frontend import Aborted, Frontend
from gateway.metrics import Metrics
from gateway.workers import Stream, WorkerPool, WorkerState
from protos.pagedserve.internal.v1 import ipc_pb2
from protos.requests import Limits
from tests.serving_stack import REPO, collect, pb, start_stack, stop_stack, stub

DASHBOARD = REPO / "docs" / "grafana" / "pagedserve.json"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py): ours must contain every one of them,
# so a query or SLO written for vLLM on one of these ``le`` values reads the same here.
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
VLLM_TOKEN = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
              10.0, 20.0, 40.0, 80.0]  # fmt: skip
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": VLLM_TTFT,
    "vllm:inter_token_latency_seconds": VLLM_TOKEN,
    "vllm:request_time_per_output_token_seconds": VLLM_TOKEN,
    "vllm:e2e_request_latency_seconds": VLLM_REQUEST,
    "vllm:request_queue_time_seconds": VLLM_REQUEST,
    "vllm:request_prefill_time_seconds": VLLM_REQUEST,
    "vllm:request_decode_time_seconds": VLLM_REQUEST,
    "vllm:request_inference_time_seconds": VLLM_REQUEST,
}
PROMPT = "The three primary colors are"


class Scrape:
    """One /metrics page: every sample, and the type of every family (even one without
    samples yet, as a labelled metric is until its first observation)."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        self.types: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            self.samples += [(s.name, s.labels, s.value) for s in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        return sum(
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == x for k, x in labels.items())
        )

    def exposed_names(self) -> set[str]:
        """Every series name a query may use: samples present, and each family's by type."""
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        names = {n for n, _, _ in self.samples}
        for fam, kind in self.types.items():
            names |= {fam + s for s in suffixes.get(kind, [""])}
        return names


def scrape(stack) -> Scrape:
    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    return Scrape(urllib.request.urlopen(url, timeout=10).read().decode())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # --max-inflight 2: a third open stream is refused; --max-prompt-chars 1000: the HTTP body
    # bound is 6 * 1000 + 1 MiB, so a 1.1 MB body is refused without sending 8 MB.
    s = start_stack(
        tmp_path_factory.mktemp("metrics"), "--max-inflight", "2", "--max-prompt-chars", "1000"
    )
    yield s
    assert stop_stack(s) == 0, s.log()


@pytest.fixture(scope="module")
def model(stack) -> str:
    with stack.channel() as ch:
        return stub(ch).GetModelInfo(pb.GetModelInfoRequest(), metadata=stack.auth, timeout=30).id


def generate(stack, **fields) -> dict:
    with stack.channel() as ch:
        call = stub(ch).Generate(pb.GenerateRequest(**fields), metadata=stack.auth, timeout=120)
        return collect(call)[0]


def _http(stack, path: str, body: bytes, key: str | None) -> tuple[int, str]:
    """(status, body) of a POST to the HTTP front, with ``key`` as the bearer token."""
    conn = http.client.HTTPConnection("localhost", stack.http_port, timeout=60)
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def wait_for(stack, name: str, value: float, **labels: str) -> Scrape:
    """The first scrape where ``name`` (summed over ``labels``) is ``value``: engine stats
    reach the gateway with the workers' heartbeats."""
    end = time.monotonic() + 15
    while True:
        m = scrape(stack)
        if m.value(name, **labels) == value:
            return m
        assert time.monotonic() < end, f"{name} = {m.value(name, **labels)}, expected {value}"
        time.sleep(0.2)


# -- requests ----------------------------------------------------------------------------------
def test_two_requests_count_tokens_phases_and_finish_reason(stack, model):
    before = wait_for(stack, "vllm:num_requests_running", 0, model_name=model)
    gen_before = before.value("vllm:generation_tokens_total", model_name=model)
    outs = [
        generate(stack, text=PROMPT, max_tokens=5, ignore_eos=True, temperature=0) for _ in range(2)
    ]
    after = wait_for(stack, "vllm:generation_tokens_total", gen_before + 10, model_name=model)

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    finals = [o["final"] for o in outs]
    assert [f.finish_reason for f in finals] == [pb.LENGTH, pb.LENGTH]
    prompt_tokens = sum(f.usage.prompt_tokens for f in finals)
    assert grew("vllm:prompt_tokens_total", model_name=model) == prompt_tokens
    assert grew("vllm:request_success_total", model_name=model, finished_reason="length") == 2
    assert grew("vllm:request_success_total", model_name=model) == 2  # no other reason
    for name in HISTOGRAMS:
        want = 8 if name == "vllm:inter_token_latency_seconds" else 2  # 4 gaps per output
        assert grew(f"{name}_count", model_name=model) == want, name
    # The old names go on counting as before.
    assert grew("pagedserve_time_to_first_token_seconds_count") == 2
    assert grew("pagedserve_request_seconds_count") == 2
    assert grew("pagedserve_requests_total", method="Generate", code="OK") == 2

    # The phases add up, each measured once: the queue time is the one the finals report;
    # decode is the sum of the inter-token gaps; inference is prefill + decode; an output's
    # end-to-end time is its time to first token plus its decode time (the last token comes
    # with the final message); and the engine's queue + prefill sit inside the gateway's TTFT.
    def s(name: str) -> float:
        return grew(f"{name}_sum", model_name=model)

    approx = pytest.approx
    assert s("vllm:request_queue_time_seconds") == approx(
        sum(f.timing.queue_ms for f in finals) / 1000, rel=1e-6
    )
    assert s("vllm:inter_token_latency_seconds") == approx(
        s("vllm:request_decode_time_seconds"), rel=1e-9
    )
    assert s("vllm:request_inference_time_seconds") == approx(
        s("vllm:request_prefill_time_seconds") + s("vllm:request_decode_time_seconds"), rel=1e-9
    )
    assert s("vllm:e2e_request_latency_seconds") == approx(
        s("vllm:time_to_first_token_seconds") + s("vllm:request_decode_time_seconds"), rel=1e-9
    )
    assert s("vllm:request_time_per_output_token_seconds") == approx(
        s("vllm:request_decode_time_seconds") / 4, rel=1e-9
    )
    assert s("vllm:request_prefill_time_seconds") > 0  # a model forward at least
    assert s("vllm:time_to_first_token_seconds") > (
        s("vllm:request_queue_time_seconds") + s("vllm:request_prefill_time_seconds")
    )


def test_http_streams_count_the_same_way(stack, model):
    """The OpenAI front relays through the same code: a streamed completion of 3 tokens is one
    `length` success, one time to first token and 2 inter-token samples."""
    before = scrape(stack)
    body = {"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True, "stream": True}
    status, text = _http(stack, "/v1/completions", json.dumps(body).encode(), stack.api_key)
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    after = scrape(stack)

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert grew("vllm:request_success_total", model_name=model, finished_reason="length") == 1
    assert grew("vllm:time_to_first_token_seconds_count", model_name=model) == 1
    assert grew("vllm:inter_token_latency_seconds_count", model_name=model) == 2
    assert grew("pagedserve_requests_total", method="POST /v1/completions", code="OK") == 1


def test_histograms_have_vllms_buckets_and_add_up(stack, model):
    generate(stack, text=PROMPT, max_tokens=3, ignore_eos=True, temperature=0)
    m = scrape(stack)
    for name, vllm_buckets in HISTOGRAMS.items():
        assert m.types[name] == "histogram", name
        buckets = [
            (float(lab["le"]), v)
            for n, lab, v in m.samples
            if n == f"{name}_bucket" and lab["model_name"] == model
        ]
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf"), name
        assert set(vllm_buckets) <= set(bounds), name
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name}: buckets are cumulative"
        assert counts[-1] == m.value(f"{name}_count", model_name=model) > 0, name
        assert m.value(f"{name}_sum", model_name=model) >= 0, name


def test_engine_gauges_carry_model_and_engine_labels(stack, model):
    m = wait_for(stack, "vllm:num_requests_running", 0, model_name=model)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total",
                 "vllm:prompt_tokens_total", "vllm:num_preemptions_total"):  # fmt: skip
        labels = [lab for n, lab, _ in m.samples if n == name]
        assert labels == [{"model_name": model, "engine": "0"}], name
    assert m.value("vllm:num_requests_waiting") == 0
    assert m.value("vllm:kv_cache_usage_perc") == 0  # nothing running holds a block

    async def hold_one():
        async with grpc.aio.insecure_channel(stack.target) as ch:
            call = stub(ch).Generate(
                pb.GenerateRequest(text=PROMPT, max_tokens=400, ignore_eos=True),
                metadata=stack.auth,
            )
            await call.read()  # streaming: it holds its blocks
            # Usage is blocks held over all blocks, as the engine's block counts give it.
            m = wait_for(stack, "vllm:num_requests_running", 1, model_name=model)
            used = m.value("pagedserve_engine_kv_blocks_used")
            total = used + sum(
                m.value(f"pagedserve_engine_kv_blocks_{k}") for k in ("cached", "free")
            )
            call.cancel()
            return used, total, m.value("vllm:kv_cache_usage_perc")

    used, total, usage = asyncio.run(hold_one())
    assert used > 0 and usage == pytest.approx(used / total)


def test_stop_and_abort_finish_reasons(stack, model):
    first = generate(stack, text=PROMPT, max_tokens=2, ignore_eos=True, temperature=0)
    before = scrape(stack)
    stopped = generate(
        stack, text=PROMPT, max_tokens=5, temperature=0, stop_token_ids=[first["token_ids"][0]]
    )
    assert stopped["final"].finish_reason == pb.STOP

    async def abort_after_first_delta():
        async with grpc.aio.insecure_channel(stack.target) as ch:
            c = stub(ch)
            call = c.Generate(
                pb.GenerateRequest(text=PROMPT, max_tokens=400, ignore_eos=True,
                                   request_id="abort-me"),
                metadata=stack.auth,
            )  # fmt: skip
            out = []
            async for r in call:
                out.append(r)
                if len(out) == 1:
                    await c.Abort(pb.AbortRequest(request_ids=["abort-me"]), metadata=stack.auth)
            return out[-1].final

    assert asyncio.run(abort_after_first_delta()).finish_reason == pb.ABORTED
    after = scrape(stack)

    def grew(reason: str) -> float:
        key = dict(model_name=model, finished_reason=reason)
        return after.value("vllm:request_success_total", **key) - before.value(
            "vllm:request_success_total", **key
        )

    assert (grew("stop"), grew("abort"), grew("length")) == (1, 1, 0)


# -- refusals ----------------------------------------------------------------------------------
def _refused(m: Scrape, code: str, reason: str) -> float:
    return m.value("pagedserve_requests_refused_total", code=code, reason=reason)


def test_refused_keys_count_by_code_and_reason(stack):
    before = scrape(stack)
    with stack.channel() as ch:
        c = stub(ch)
        with pytest.raises(grpc.RpcError) as wrong:
            collect(c.Generate(pb.GenerateRequest(text="hi"), metadata=(("x-api-key", "nope"),)))
        with pytest.raises(grpc.RpcError) as missing:
            c.Tokenize(pb.TokenizeRequest(text="hi"), timeout=30)
    assert wrong.value.code() == missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _http(stack, "/v1/completions", b'{"prompt": "hi"}', key="nope")[0] == 401
    after = scrape(stack)

    def grew(fn, *args) -> float:
        return fn(after, *args) - fn(before, *args)

    assert grew(_refused, "UNAUTHENTICATED", "invalid_api_key") == 2  # gRPC and HTTP
    assert grew(_refused, "UNAUTHENTICATED", "missing_api_key") == 1

    # ... and each is also a finished call in pagedserve_requests_total, with its method.
    def calls(m: Scrape, method: str) -> float:
        return m.value("pagedserve_requests_total", method=method, code="UNAUTHENTICATED")

    assert grew(calls, "Generate") == 1 and grew(calls, "Tokenize") == 1
    assert grew(calls, "POST /v1/completions") == 1


def test_shed_calls_count_by_code_and_reason(stack):
    before = scrape(stack)
    # An HTTP body over the receive bound: 413.
    big = b'{"prompt": "' + b"a" * 1_100_000 + b'"}'
    assert _http(stack, "/v1/completions", big, key=stack.api_key)[0] == 413

    # A third stream while --max-inflight 2 are open.
    async def third_of_three():
        async with grpc.aio.insecure_channel(stack.target) as ch:
            c = stub(ch)
            calls = [
                c.Generate(pb.GenerateRequest(text=PROMPT, max_tokens=400, ignore_eos=True),
                           metadata=stack.auth)
                for _ in range(2)
            ]  # fmt: skip
            for call in calls:
                await call.read()  # open and streaming
            try:
                third = c.Generate(pb.GenerateRequest(text=PROMPT), metadata=stack.auth)
                async for _ in third:
                    pass
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()
            finally:
                for call in calls:
                    call.cancel()

    assert asyncio.run(third_of_three()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = scrape(stack)
    grew = {
        reason: _refused(after, "RESOURCE_EXHAUSTED", reason)
        - _refused(before, "RESOURCE_EXHAUSTED", reason)
        for reason in ("body_too_large", "max_inflight", "queue_full", "other")
    }
    assert grew == {"body_too_large": 1, "max_inflight": 1, "queue_full": 0, "other": 0}


def test_a_full_engine_queue_counts_as_queue_full():
    """The workers report RESOURCE_EXHAUSTED for a request only when every engine's waiting
    queue refused it; the relay raises it with reason queue_full, which the fronts count. On
    the gateway's real relay and pool, without sockets: no engine flag makes a queue that
    small."""
    pool = WorkerPool("ipc:///nonexistent")
    try:
        metrics = Metrics(pool)
        front = Frontend(pool, Limits(), 8, metrics)
        stream = Stream("r1", b"tok-0")
        full = ipc_pb2.RequestError(request_id="r1", code=ipc_pb2.RESOURCE_EXHAUSTED)
        stream.queue.put_nowait(full)

        async def relay():
            async for _ in front.relay(stream, 1, time.monotonic()):
                pass

        with pytest.raises(Refused) as refused:
            asyncio.run(relay())
        assert refused.value.reason == QUEUE_FULL
        metrics.count_refusal(refused.value)
        counted = metrics.registry.get_sample_value(
            "pagedserve_requests_refused_total",
            {"code": "RESOURCE_EXHAUSTED", "reason": "queue_full"},
        )
        assert counted == 1
    finally:
        pool._ctx.term()


def test_inter_token_gaps_are_shared_by_tokens_that_come_together():
    """A message with several token ids (one engine step that made several) gives each its
    share of the gap, so the sample count stays tokens after the first; an output aborted
    before its first token has no phases to time."""
    pool = WorkerPool("ipc:///nonexistent")
    try:
        status = ipc_pb2.WorkerStatus(
            worker_id="tok-0", tokenizer_ready=True, engine_ready=True,
            engine=ipc_pb2.EngineInfo(model_id="tiny"),
        )  # fmt: skip
        pool.workers[b"tok-0"] = WorkerState(b"tok-0", status, time.monotonic())
        metrics = Metrics(pool)
        front = Frontend(pool, Limits(), 8, metrics)
        stream = Stream("r1", b"tok-0")
        for ids, finish in (([1], ipc_pb2.FINISH_NONE), ([2, 3, 4], ipc_pb2.FINISH_LENGTH)):
            d = ipc_pb2.TextDelta(request_id="r1", token_ids=ids, finish_reason=finish)
            stream.queue.put_nowait(d)

        async def relay(s: Stream):
            return [r async for r in front.relay(s, 1, time.monotonic())]

        asyncio.run(relay(stream))

        def value(name: str, **labels: str) -> float | None:
            return metrics.registry.get_sample_value(name, {"model_name": "tiny", **labels})

        assert value("vllm:inter_token_latency_seconds_count") == 3
        assert value("vllm:inter_token_latency_seconds_sum") == pytest.approx(
            value("vllm:request_decode_time_seconds_sum")
        )
        assert value("vllm:request_success_total", finished_reason="length") == 1

        aborted = Stream("r2", b"tok-0")
        aborted.queue.put_nowait(Aborted())
        (final,) = asyncio.run(relay(aborted))
        assert final.final.finish_reason == pb.ABORTED
        assert value("vllm:request_success_total", finished_reason="abort") == 1
        assert value("vllm:e2e_request_latency_seconds_count") == 2
        assert value("vllm:request_decode_time_seconds_count") == 1  # not the aborted one
    finally:
        pool._ctx.term()


# -- the dashboard -----------------------------------------------------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset"}  # fmt: skip


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once label matchers, ranges,
    grouping clauses and strings are gone, and neither a function (followed by ``(``) nor a
    keyword."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if not expr[m.end() :].lstrip().startswith("(") and m.group() not in PROMQL_WORDS:
            names.add(m.group())
    return names


def dashboard_queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):  # label_values(METRIC, label): the metric is a query too
            m = re.fullmatch(r"label_values\(([^,]+),\s*\w+\)", q["query"])
            exprs.append(m.group(1))
    return exprs


def test_promql_metrics_finds_names_and_only_names():
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(a:b_bucket{model_name=~"$m"}[$__rate_interval])))'
        " / sum(rate(c_total[5m])) + d"
    )
    assert promql_metrics(expr) == {"a:b_bucket", "c_total", "d"}


def test_dashboard_is_valid_and_queries_only_served_metrics(stack):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "pagedserve" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    queried = set().union(*(promql_metrics(e) for e in dashboard_queries(dash)))
    assert queried - scrape(stack).exposed_names() == set()
    # the panels the dashboard is for
    assert {
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc", "pagedserve_requests_refused_total",
    } <= queried  # fmt: skip
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_deploy_docs_name_the_dashboard_file():
    assert str(DASHBOARD.relative_to(REPO)) in (REPO / "docs" / "deploy.md").read_text()


def test_a_status_grpc_cannot_send_ends_the_call_as_a_cancel_counted_once():
    """The gateway's deadline abort can race the call's own end in grpc core: sending the
    status then fails with grpc's ExecuteBatchError, which grpc logged with a traceback. The
    servicer ends such a call as the cancel it is (grpc does not log those), and the refusal
    stays counted once, under its code. A double of the call's context raises the real grpc
    error: the race itself cannot be produced on demand."""
    from grpc._cython import cygrpc

    from gateway.service import InferenceService

    class EndedCall:  # a grpc.aio context whose call grpc core has already ended
        async def abort(self, code, message):
            raise cygrpc.ExecuteBatchError('Failed "execute_batch": (SendStatusFromServer,)')

        def time_remaining(self):
            return 0.0

    pool = WorkerPool("ipc:///nonexistent")
    try:
        metrics = Metrics(pool)
        svc = InferenceService(Frontend(pool, Limits(), 8, metrics))
        ctx = EndedCall()
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(svc._abort(ctx, "Generate", grpc.StatusCode.DEADLINE_EXCEEDED, "late"))
        svc._count_cancel("Generate", ctx)  # the unwinding handler's cancel: already counted
        counted = metrics.requests.labels("Generate", "DEADLINE_EXCEEDED")._value.get()
        cancelled = metrics.requests.labels("Generate", "CANCELLED")._value.get()
        assert (counted, cancelled) == (1, 0)
    finally:
        pool._ctx.term()
