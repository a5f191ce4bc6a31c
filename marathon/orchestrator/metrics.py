"""The orchestrator's metrics (``GET /metrics``): what the shells count as it happens (tasks
scheduled and ended, metered usage, store calls), and what is read at scrape time (tasks by
state in one grouped query, the connected nodes).  The decision modules (scheduler,
lifecycle, reconcile) know nothing of this."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from functools import wraps
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from marathon.errors import StoreError
from marathon.metrics import (
    FAST_BUCKETS,
    TASK_BUCKETS,
    BoundedLabel,
    ScrapeCollector,
    new_registry,
    render,
)
from marathon.orchestrator.lifecycle import TERMINAL, State
from marathon.store.models import LedgerRow

if TYPE_CHECKING:
    from marathon.orchestrator.nodes import NodeRegistry
    from marathon.store import Store

SCHEDULING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
TERMINAL_OUTCOMES = frozenset(str(s) for s in TERMINAL)
TOKEN_KINDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_creation": "cache_creation_input_tokens",
    "cache_read": "cache_read_input_tokens",
}


class OrchestratorMetrics:
    def __init__(self) -> None:
        self.registry = r = new_registry()
        self.scheduling_latency = Histogram(
            "marathon_scheduling_latency_seconds",
            "Time from a task being queued (submitted, requeued or answered) to its assignment to a node",
            buckets=SCHEDULING_BUCKETS,
            registry=r,
        )
        self.task_duration = Histogram(
            "marathon_task_duration_seconds",
            "Time from submission to the end of a task, by how it ended",
            ["outcome"],
            buckets=TASK_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "marathon_tokens_total",
            "Tokens metered on the Anthropic API, by model and kind",
            ["model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "marathon_cost_usd_total", "Cost of the metered API requests, by model", ["model"], registry=r
        )
        self.api_requests = Counter(
            "marathon_api_requests_total",
            "Metered Anthropic API requests reported by nodes, by model and upstream status code",
            ["model", "status"],
            registry=r,
        )
        self.store_latency = Histogram(
            "marathon_store_operation_seconds",
            "Latency of store calls, by operation",
            ["operation"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "marathon_store_errors_total", "Store calls that failed, by operation", ["operation"], registry=r
        )
        for outcome in sorted(TERMINAL_OUTCOMES):  # every outcome shows from the first scrape
            self.task_duration.labels(outcome)
        self._models = BoundedLabel(50)
        self._store: Store | None = None
        self._nodes: NodeRegistry | None = None
        self._counts: dict[str, int] = {}
        self.leading: Callable[[], bool] | None = None  # whether this replica schedules (its cluster's)
        r.register(ScrapeCollector(self._scrape_families))

    def attach(self, store: Store, nodes: NodeRegistry) -> None:
        """Where the scrape-time figures come from."""
        self._store, self._nodes = store, nodes

    # ------------------------------------------------------------------ events (the shells call these)

    def task_scheduled(self, queued_since: float, now: float | None = None) -> None:
        self.scheduling_latency.observe(max(0.0, (now or time.time()) - queued_since))

    def task_ended(self, outcome: str, created_at: float, finished_at: float | None) -> None:
        if outcome in TERMINAL_OUTCOMES:
            self.task_duration.labels(outcome).observe(max(0.0, (finished_at or time.time()) - created_at))

    def metered(self, row: LedgerRow) -> None:
        """One API request entered the ledger (once: duplicates the store refused are not here)."""
        model = self._models(row.model)
        for kind, field in TOKEN_KINDS.items():
            n = getattr(row, field)
            if n:
                self.tokens.labels(model, kind).inc(n)
        if row.cost_usd:
            self.cost.labels(model).inc(row.cost_usd)
        self.api_requests.labels(model, str(row.status) if 100 <= row.status <= 599 else "none").inc()

    def timed_store(self, store: Store) -> Store:
        """``store`` with every call timed (``marathon_store_operation_seconds``)."""
        return cast("Store", TimedStore(store, self))

    # ------------------------------------------------------------------ scrape

    async def scrape(self) -> bytes:
        """The text exposition; the task counts are read from the store first (one query)."""
        if self._store is not None:
            self._counts = await self._store.count_tasks_by_state()
        return render(self.registry)

    def _scrape_families(self) -> Iterable[Metric]:
        by_state = GaugeMetricFamily("marathon_tasks", "Tasks in the store, by state", labels=["state"])
        for state in State:
            by_state.add_metric([str(state)], self._counts.get(str(state), 0))
        yield by_state
        yield GaugeMetricFamily(
            "marathon_queue_depth", "Tasks waiting to be scheduled", value=self._counts.get(str(State.QUEUED), 0)
        )
        if self.leading is not None:
            yield GaugeMetricFamily(
                "marathon_scheduler_leader", "1 while this replica leads (schedules)", value=int(self.leading())
            )
        if self._nodes is None:
            return
        sessions = [s for s in self._nodes.sessions.values() if s.connected]
        yield GaugeMetricFamily(
            "marathon_gateway_connections", "Nodes connected to this orchestrator's gateway", value=len(sessions)
        )
        slots = GaugeMetricFamily("marathon_node_slots", "Task slots of each connected node", labels=["node"])
        active = GaugeMetricFamily("marathon_node_active_tasks", "Tasks on each connected node", labels=["node"])
        warm = GaugeMetricFamily(
            "marathon_node_warm_sandboxes", "Warm sandboxes each connected node holds", labels=["node"]
        )
        draining = GaugeMetricFamily(
            "marathon_node_draining", "1 when a connected node takes no new tasks", labels=["node"]
        )
        for s in sessions:
            slots.add_metric([s.node_id], s.capacity.slots)
            active.add_metric([s.node_id], s.view().active)
            warm.add_metric([s.node_id], s.capacity.warm)
            draining.add_metric([s.node_id], 1 if s.draining else 0)
        yield from (slots, active, warm, draining)


class TimedStore:
    """A Store whose coroutine methods are timed by operation (the method's name: a fixed,
    small set); everything else passes through."""

    def __init__(self, store: Store, metrics: OrchestratorMetrics):
        self._inner = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or name == "close" or not inspect.iscoroutinefunction(attr):
            return attr
        hist = self._metrics.store_latency.labels(name)
        errors = self._metrics.store_errors

        @wraps(attr)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            except StoreError:
                errors.labels(name).inc()
                raise
            finally:
                hist.observe(time.perf_counter() - t0)

        self.__dict__[name] = timed  # made once per operation
        return timed
