"""What the orchestrator's and the node's metrics share: a registry per service (never the
process-wide default one, so several services in one process keep their figures apart), label
values kept bounded, and the Prometheus text format.

Conventions: names start with ``marathon_`` and carry their unit (``_seconds``, ``_total``,
``_usd``); labels take values from small sets only (states, outcomes, models, operations,
status codes), never a task id or a user id.  Figures a service already keeps (task counts in
the store, the pool's size, a node's slots) are read when Prometheus scrapes, by collectors;
events (a task ended, a request was metered) are counted where they happen, by the shells.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# no ``*_created`` series beside every counter and histogram: in the 0.0.4 text format they are
# plain gauges that only double what a scrape carries (the library's switch is process-wide)
disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what every Prometheus version reads (our names need no escaping)
OTHER = "other"

# bucket bounds (seconds) by what is measured
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TASK_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)


def new_registry() -> CollectorRegistry:
    """A registry of one service's metrics, with the process's own (CPU, memory, open files)
    as ``marathon_process_*``."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(namespace="marathon", registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (version 0.0.4)."""
    return generate_latest(registry)


class BoundedLabel:
    """Label values as they come, up to ``limit`` distinct ones; any later new value is
    ``other``.  For values a service does not choose (a model name in a response), so that
    what arrives can never grow the number of series without bound."""

    def __init__(self, limit: int = 50):
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        v = value or "unknown"
        if v in self.seen:
            return v
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(v)
        return v


class ScrapeCollector(Collector):
    """Metric families made when the registry is collected, by ``make`` (a plain function of
    what the service holds in memory: no I/O here, collection is synchronous)."""

    def __init__(self, make: Callable[[], Iterable[Metric]]):
        self.make = make

    def collect(self) -> Iterable[Metric]:
        return list(self.make())

    def describe(self) -> Iterable[Metric]:
        return []  # no fixed names: the registry does not check them against other collectors
