"""Prometheus metrics for ``GET /metrics`` (``prometheus_client`` text format), one registry per server.

Counted by the HTTP layer as requests come and go:

    latentmoe_requests_total{endpoint, status}       every API request by HTTP status (of a stream: at its start)
    latentmoe_client_disconnects_total                requests cancelled because the client went away
    latentmoe_stream_errors_total                     streams that ended with an error event
    latentmoe_prompt_tokens_total                     prompt tokens of finished requests
    latentmoe_generation_tokens_total                 tokens generated for them
    latentmoe_time_to_first_token_seconds             histogram, request received -> first token out
    latentmoe_inter_token_latency_seconds             histogram, per generated token after the first
    latentmoe_request_duration_seconds                histogram, request received -> last token out

Read from the backend's snapshot when scraped (the engine's state at its last step boundary):

    latentmoe_queue_depth                             requests waiting for admission
    latentmoe_running_requests                        requests in the running batch
    latentmoe_cache_blocks{state="used"|"free"}       paged latent cache blocks
    latentmoe_speculative_draft_tokens_total          MTP drafts verified ...
    latentmoe_speculative_accepted_tokens_total       ... and accepted (acceptance = accepted / draft)
    latentmoe_kv_transfer_bytes_total{kind}           disaggregated: bytes prefill workers sent the decode
                                                      worker ("kv" latent rows, "hidden" MTP hidden states)
    latentmoe_kv_transfer_tokens_total                disaggregated: prompt tokens those rows hold
    latentmoe_healthy                                 1 while the engine (and every worker) is alive

Latencies are measured where a client sees them: from the moment the server has the request to the moment
the event leaves the engine for the response (a speculative step that emits k tokens after a gap d counts
k inter-token latencies of d / k).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from latentmoe.serve.backend import BackendSnapshot

PREFIX = "latentmoe"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _SnapshotCollector:
    """Gauges and engine counters computed from the backend's snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], BackendSnapshot | None]):
        self._snapshot = snapshot

    def collect(self):
        s = self._snapshot()
        healthy = GaugeMetricFamily(f"{PREFIX}_healthy", "1 while the engine and every worker are alive")
        healthy.add_metric([], 1.0 if s is not None and s.alive else 0.0)
        yield healthy
        if s is None:
            return
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "requests waiting for admission", value=s.num_waiting)
        yield GaugeMetricFamily(f"{PREFIX}_running_requests", "requests in the running batch", value=s.num_running)
        blocks = GaugeMetricFamily(f"{PREFIX}_cache_blocks", "paged latent cache blocks", labels=["state"])
        blocks.add_metric(["used"], s.used_blocks)
        blocks.add_metric(["free"], s.free_blocks)
        yield blocks
        yield CounterMetricFamily(f"{PREFIX}_speculative_draft_tokens", "MTP draft tokens verified",
                                  value=s.draft_tokens)
        yield CounterMetricFamily(f"{PREFIX}_speculative_accepted_tokens", "MTP draft tokens accepted",
                                  value=s.accepted_draft_tokens)
        transfer = CounterMetricFamily(f"{PREFIX}_kv_transfer_bytes", "bytes sent from prefill to decode workers",
                                       labels=["kind"])
        transfer.add_metric(["kv"], s.transfer_kv_bytes)
        transfer.add_metric(["hidden"], s.transfer_hidden_bytes)
        yield transfer
        yield CounterMetricFamily(f"{PREFIX}_kv_transfer_tokens", "prompt tokens sent from prefill to decode workers",
                                  value=s.transfer_tokens)


class ServerMetrics:
    """The server's metrics (see the module docstring); ``render()`` is the ``/metrics`` body."""

    def __init__(self, snapshot: Callable[[], BackendSnapshot | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "API requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "request received to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between generated tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.disconnects = Counter(f"{PREFIX}_client_disconnects", "requests cancelled because the client left",
                                   registry=r)
        self.stream_errors = Counter(f"{PREFIX}_stream_errors", "streams ended by an error event (a worker died, "
                                     "shutdown)", registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "request received to last token",
                                  buckets=DURATION_BUCKETS, registry=r)
        r.register(_SnapshotCollector(snapshot))

    def observe_tokens(self, *, gap_s: float, num_tokens: int) -> None:
        """``num_tokens`` arrived together ``gap_s`` after the previous ones."""
        for _ in range(num_tokens):
            self.itl.observe(gap_s / num_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
