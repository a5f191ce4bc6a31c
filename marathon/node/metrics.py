"""The node's metrics, served with its health on ``metrics_listen`` (node/status.py): sandbox
starts by backend (warm or cold) and warm-pool claims, the metering proxy's requests (latency,
time to first byte, upstream status codes), and, read at scrape time, the node's slots, active
tasks, draining, its link to the orchestrator and the warm pool's size, hits and misses."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from marathon.metrics import REQUEST_BUCKETS, START_BUCKETS, ScrapeCollector, new_registry, render

if TYPE_CHECKING:
    from marathon.node.proxy import RequestRecord
    from marathon.node.service import NodeService

CLAIM_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1)
PROXY_PATHS = ("/v1/messages", "/v1/messages/count_tokens")  # what the proxy forwards (proxy.ALLOWED_PATHS)
START_FAILURES_NOT_READY = 3  # this many sandbox starts failing in a row: the node is not ready


class NodeMetrics:
    def __init__(self, service: NodeService | None = None):
        self.registry = r = new_registry()
        self.sandbox_start = Histogram(
            "marathon_sandbox_start_seconds",
            "Time to a sandbox whose agent answers, by backend and kind (warm: claimed from the pool; cold: booted)",
            ["backend", "kind"],
            buckets=START_BUCKETS,
            registry=r,
        )
        self.sandbox_start_failures = Counter(
            "marathon_sandbox_start_failures_total",
            "Sandboxes that did not come up, by backend",
            ["backend"],
            registry=r,
        )
        self.pool_claim = Histogram(
            "marathon_warm_pool_claim_seconds",
            "Time to claim a warm sandbox from the pool",
            buckets=CLAIM_BUCKETS,
            registry=r,
        )
        self.proxy_latency = Histogram(
            "marathon_proxy_request_seconds",
            "Metering proxy: time from a request to the end of its response, by API path",
            ["path"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.proxy_ttfb = Histogram(
            "marathon_proxy_time_to_first_byte_seconds",
            "Metering proxy: time from a request to the upstream's first byte of response",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_responses = Counter(
            "marathon_proxy_upstream_responses_total",
            "Metering proxy: upstream responses by status code (unreachable: none came)",
            ["status"],
            registry=r,
        )
        self.start_failures_in_a_row = 0
        self.service = service
        self.url = ""  # where metrics_listen is bound, once it is
        r.register(ScrapeCollector(self._scrape_families))

    # ------------------------------------------------------------------ events

    def sandbox_started(self, backend: str, kind: str, seconds: float) -> None:
        self.sandbox_start.labels(backend, kind).observe(seconds)
        self.start_failures_in_a_row = 0

    def sandbox_failed(self, backend: str) -> None:
        self.sandbox_start_failures.labels(backend).inc()
        self.start_failures_in_a_row += 1

    def pool_claimed(self, seconds: float) -> None:
        self.pool_claim.observe(seconds)

    def proxy_request(self, rec: RequestRecord) -> None:
        path = rec.path if rec.path in PROXY_PATHS else "other"
        self.proxy_latency.labels(path).observe(rec.duration_s)
        if rec.ttft_s is not None:
            self.proxy_ttfb.observe(rec.ttft_s)
        unreachable = rec.response_bytes == 0 and (rec.error or "").startswith("upstream:")
        status = "unreachable" if unreachable else str(rec.status) if 100 <= rec.status <= 599 else "other"
        self.upstream_responses.labels(status).inc()

    # ------------------------------------------------------------------ health

    def sandbox_problem(self) -> str | None:
        """Why the sandbox backend is not usable now, or None."""
        svc = self.service
        if svc is None:
            return "no node service"
        if self.start_failures_in_a_row >= START_FAILURES_NOT_READY:
            return f"the last {self.start_failures_in_a_row} sandboxes did not come up"
        if not os.access(svc.config.data_dir, os.W_OK | os.X_OK):
            return f"the data dir {svc.config.data_dir} is not writable"
        return None

    # ------------------------------------------------------------------ scrape

    def scrape(self) -> bytes:
        return render(self.registry)

    def _scrape_families(self) -> Iterable[Metric]:
        svc = self.service
        if svc is None:
            return
        cap = svc.capacity()
        yield GaugeMetricFamily("marathon_node_slots", "Task slots of this node", value=cap.slots)
        yield GaugeMetricFamily("marathon_node_active_tasks", "Tasks running on this node", value=cap.active)
        yield GaugeMetricFamily(
            "marathon_node_draining", "1 while this node takes no new tasks", value=int(cap.draining)
        )
        yield GaugeMetricFamily(
            "marathon_node_gateway_connected",
            "1 while this node is connected to the orchestrator's gateway",
            value=int(svc.connected.is_set()),
        )
        pool = svc.pool
        if pool is None:
            return
        yield GaugeMetricFamily("marathon_warm_pool_size", "Warm sandboxes ready to claim", value=len(pool.ready))
        yield GaugeMetricFamily("marathon_warm_pool_target", "Warm sandboxes the pool keeps ready", value=pool.target)
        yield GaugeMetricFamily(
            "marathon_warm_pool_enabled", "0 when the warm pool is disabled", value=int(not pool.disabled)
        )
        yield CounterMetricFamily("marathon_warm_pool_hits", "Tasks that started on a warm sandbox", value=pool.hits)
        yield CounterMetricFamily(
            "marathon_warm_pool_misses", "Tasks that found the pool empty and booted cold", value=pool.misses
        )
        yield CounterMetricFamily(
            "marathon_warm_pool_restore_failures",
            "Warm sandboxes that failed to restore or died in the pool",
            value=pool.failures,
        )
