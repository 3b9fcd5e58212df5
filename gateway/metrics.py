"""Prometheus metrics of the gateway and (as last reported through the workers) the engines.

Two families of names. ``pagedserve_*`` are this server's own (kept as they were: scrapers rely
on them). ``vllm:*`` are the metrics vLLM also exposes, with vLLM's names, types, labels
(``model_name``, ``engine``, ``finished_reason``) and meanings, so dashboards and alerts built
for vLLM work here unchanged. The gateway records the request-level ones (it sees every delta
and final message) from the engine's queue and prefill times, which each stream's first delta
carries; the engine-level ones are the engines' stats as the workers last heard them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from operator import attrgetter

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway.errors import Refused
from protos.pagedserve.internal.v1 import ipc_pb2

log = logging.getLogger("pagedserve.gateway")

MODEL = "model_name"  # vLLM's label for the served model

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), with finer ones below where a small
# model on a GPU lands under vLLM's smallest bucket. A superset of vLLM's, so a query or an SLO
# on one of vLLM's ``le`` values reads the same here.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
    15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

# Refusals counted in pagedserve_requests_refused_total: turned away before any work, for the
# caller's credentials or the server's load. Other failures count in pagedserve_requests_total.
REFUSAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED)

# Engine stats fields exported as gauges (a value now) and counters (a running total).
_ENGINE_GAUGES = {
    "num_running": "sequences running in the engine",
    "num_waiting": "sequences waiting for admission",
    "kv_blocks_used": "KV cache blocks referenced by a running sequence",
    "kv_blocks_cached": "free KV cache blocks still holding a reusable prefix",
    "kv_blocks_free": "KV cache blocks holding nothing",
    "last_step_num_seqs": "sequences in the engine's last step",
    "max_step_num_seqs": "most sequences in one engine step since start",
}
_ENGINE_COUNTERS = {
    "steps": "engine steps",
    "prompt_tokens_total": "prompt tokens received",
    "generation_tokens_total": "tokens generated",
    "cached_tokens_total": "prompt tokens served from the prefix cache",
    "preemptions_total": "sequences preempted (recomputed later)",
    "requests_finished_total": "sequences finished",
}


class _EngineCollector:
    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        engines = self.pool.engine_states()
        yield from self._pagedserve(engines)
        info = self.pool.engine_info()
        model = info.model_id if info is not None else ""
        yield from _vllm_engine_families(engines, model)

    def _pagedserve(self, engines):
        ready = GaugeMetricFamily("pagedserve_ready", "1 when every part is ready")
        ready.add_metric([], 1.0 if self.pool.ready else 0.0)
        yield ready
        workers = GaugeMetricFamily("pagedserve_tokenizer_workers_ready", "ready tokenizer workers")
        workers.add_metric([], float(len(self.pool.ready_workers())))
        yield workers
        # One series per engine (data-parallel replicas), labelled by its place in the
        # workers' engine list; the stats of an engine that is not ready are left out (stale).
        up = GaugeMetricFamily(
            "pagedserve_engine_ready",
            "1 when the engine takes requests (address: where the workers connect)",
            labels=["engine", "address"],
        )
        for i, e in engines.items():
            up.add_metric([str(i), e.address], 1.0 if e.ready else 0.0)
        yield up
        live = {str(i): e.stats for i, e in engines.items() if e.ready}
        for name, doc in _ENGINE_GAUGES.items():
            g = GaugeMetricFamily(f"pagedserve_engine_{name}", doc, labels=["engine"])
            for i, stats in live.items():
                g.add_metric([i], float(getattr(stats, name)))
            yield g
        for name, doc in _ENGINE_COUNTERS.items():
            c = CounterMetricFamily(
                f"pagedserve_engine_{name.removesuffix('_total')}", doc, labels=["engine"]
            )
            for i, stats in live.items():
                c.add_metric([i], float(getattr(stats, name)))
            yield c


def _kv_usage(s: ipc_pb2.EngineStats) -> float:
    # As vLLM: blocks a sequence holds over all blocks; a cached prefix nobody holds is free.
    total = s.kv_blocks_used + s.kv_blocks_cached + s.kv_blocks_free
    return s.kv_blocks_used / total if total else 0.0


# vLLM's engine-level metrics: name, type, help, and how to read it from an engine's stats.
_VLLM_ENGINE = (
    ("vllm:num_requests_running", GaugeMetricFamily, "sequences in the running batch",
     attrgetter("num_running")),
    ("vllm:num_requests_waiting", GaugeMetricFamily, "sequences waiting for admission",
     attrgetter("num_waiting")),
    ("vllm:kv_cache_usage_perc", GaugeMetricFamily, "KV-cache usage. 1 means 100 percent usage.",
     _kv_usage),
    ("vllm:prompt_tokens", CounterMetricFamily, "prompt tokens received (n times for n outputs)",
     attrgetter("prompt_tokens_total")),
    ("vllm:generation_tokens", CounterMetricFamily, "tokens generated",
     attrgetter("generation_tokens_total")),
    ("vllm:num_preemptions", CounterMetricFamily, "sequences preempted (recomputed later)",
     attrgetter("preemptions_total")),
)  # fmt: skip


def _vllm_engine_families(engines: dict[int, ipc_pb2.EngineState], model: str):
    """One series per ready engine, labelled as vLLM labels its data-parallel engines."""
    live = {str(i): e.stats for i, e in engines.items() if e.ready}
    for name, kind, doc, read in _VLLM_ENGINE:
        f = kind(name, doc, labels=[MODEL, "engine"])
        for i, stats in live.items():
            f.add_metric([model, i], float(read(stats)))
        yield f


@dataclass(slots=True)
class FinishedOutput:
    """One output index's final message, as the gateway's request histograms take it."""

    finished_reason: str  # vLLM's word: "stop", "length" or "abort"
    e2e_s: float  # request received by the gateway to this final message
    num_tokens: int  # tokens this output streamed
    queue_s: float = 0.0  # the engine's: arrival to first scheduled
    prefill_s: float = 0.0  # the engine's: first scheduled to first token
    decode_s: float | None = None  # first to last token at the gateway; None: no token came


class Metrics:
    def __init__(self, pool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pagedserve_requests",
            "finished RPCs by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "pagedserve_streams_in_flight", "open Generate/Chat streams", registry=self.registry
        )
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram(
            "pagedserve_time_to_first_token_seconds",
            "request received to first token sent",
            buckets=buckets,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "pagedserve_request_seconds",
            "request received to final message, per output index",
            buckets=buckets,
            registry=self.registry,
        )
        self.refused = Counter(
            "pagedserve_requests_refused",
            "calls turned away before any work: an API key missing or wrong (UNAUTHENTICATED), "
            "or the server at a load bound (RESOURCE_EXHAUSTED)",
            ["code", "reason"],
            registry=self.registry,
        )
        self._vllm_request_metrics()
        self.registry.register(_EngineCollector(pool))

    def _vllm_request_metrics(self) -> None:
        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, [MODEL], buckets=buckets, registry=self.registry)

        self.request_success = Counter(
            "vllm:request_success",
            "outputs that ended with a final message, by finish reason",
            [MODEL, "finished_reason"],
            registry=self.registry,
        )
        self.vllm_ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "request received to an output's first token, per output index",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "time between an output's consecutive tokens, as the gateway relays them",
            TOKEN_BUCKETS,
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "an output's mean time per token after its first (outputs of 2 tokens or more)",
            TOKEN_BUCKETS,
        )
        self.vllm_e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "request received to an output's final message",
            REQUEST_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "time in the engine's waiting queue, arrival to first scheduled",
            REQUEST_BUCKETS,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "the engine's first scheduling of an output to its first token",
            REQUEST_BUCKETS,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "an output's first token to its last",
            REQUEST_BUCKETS,
        )
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "prefill plus decode time: first scheduled to last token",
            REQUEST_BUCKETS,
        )

    # -- recording -------------------------------------------------------------------------
    def count_refusal(self, r: Refused) -> None:
        """Count an auth or overload refusal (every other code is not one: ignored)."""
        if r.code in REFUSAL_CODES:
            self.refused.labels(r.code.name, r.reason or "other").inc()

    def first_token(self, model: str, since_request_s: float) -> None:
        self.vllm_ttft.labels(model).observe(since_request_s)

    def tokens(self, model: str, gap_s: float, n: int) -> None:
        """``n`` tokens that came ``gap_s`` after the output's previous ones: one inter-token
        sample each (the gap shared out), so the count is tokens after the first."""
        itl = self.itl.labels(model)
        for _ in range(n):
            itl.observe(gap_s / n)

    def finished(self, model: str, out: FinishedOutput) -> None:
        self.request_success.labels(model, out.finished_reason).inc()
        self.vllm_e2e.labels(model).observe(out.e2e_s)
        if out.decode_s is None:  # aborted before its first token: no phases to time
            return
        self.queue_time.labels(model).observe(out.queue_s)
        self.prefill_time.labels(model).observe(out.prefill_s)
        self.decode_time.labels(model).observe(out.decode_s)
        self.inference_time.labels(model).observe(out.prefill_s + out.decode_s)
        if out.num_tokens > 1:
            self.tpot.labels(model).observe(out.decode_s / (out.num_tokens - 1))

    def serve(self, host: str, port: int) -> bool:
        """Expose /metrics over HTTP; a busy port is logged, not fatal."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            log.warning("metrics endpoint on %s:%d not started: %s", host, port, e)
            return False
        return True
