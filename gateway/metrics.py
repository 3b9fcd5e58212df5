"""Prometheus metrics of the gateway and (as last reported through the workers) the engines."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("pagedserve.gateway")

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
        self.registry.register(_EngineCollector(pool))

    def serve(self, host: str, port: int) -> bool:
        """Expose /metrics over HTTP; a busy port is logged, not fatal."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            log.warning("metrics endpoint on %s:%d not started: %s", host, port, e)
            return False
        return True
