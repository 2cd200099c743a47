"""The gateway's Prometheus metrics, with OpenFaaS's names and labels (prometheus_client).

Each gateway has its own ``CollectorRegistry`` (injected), so tests and several
gateways in one process do not share counters.  With ``--workers N`` the values
live in prometheus_client's multiprocess folder and ``/metrics`` of any process
reports the sum over all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # OpenFaaS's name has no _total suffix, which prometheus_client adds to every
        # Counter: a Gauge that only goes up keeps the name dashboards query.
        self.invocation_started = Gauge(
            "gateway_function_invocation_started",
            "Function invocations started through the gateway (only increases)",
            ["function_name"],
            registry=r,
            multiprocess_mode="sum",
        )
        self.invocation_total = Counter(
            "gateway_function_invocation",
            "Function invocations through the gateway, by status code",
            ["function_name", "code"],
            registry=r,
        )
        self.seconds = Histogram(
            "gateway_functions_seconds",
            "Function invocation time through the gateway",
            ["function_name", "code"],
            registry=r,
        )
        self.service_count = Gauge(
            "gateway_service_count",
            "Recorded replicas of each function",
            ["function_name"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.inflight = Gauge(
            "gateway_function_invocation_inflight",
            "Synchronous invocations in progress",
            ["function_name"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.async_calls = Counter(
            "gateway_async_calls",
            "Asynchronous calls posted, by function and the gateway's answer",
            ["function_name", "code"],
            registry=r,
        )

        # Labelled children, looked up once per (function, code) rather than per call.
        self._started: dict[str, tuple] = {}
        self._finished: dict[tuple[str, int], tuple] = {}
        self._async: dict[tuple[str, int], object] = {}

    def started(self, name: str) -> None:
        children = self._started.get(name)
        if children is None:
            children = self._started[name] = (
                self.invocation_started.labels(name),
                self.inflight.labels(name),
            )
        children[0].inc()
        children[1].inc()

    def finished(self, name: str, code: int, seconds: float) -> None:
        children = self._finished.get((name, code))
        if children is None:
            label = str(code)
            children = self._finished[(name, code)] = (
                self.invocation_total.labels(name, label),
                self.seconds.labels(name, label),
            )
        self._started[name][1].dec()
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """Prometheus text; with several gateway processes, the sum over all of them."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def async_answer(self, name: str, code: int) -> None:
        child = self._async.get((name, code))
        if child is None:
            child = self._async[(name, code)] = self.async_calls.labels(name, str(code))
        child.inc()
