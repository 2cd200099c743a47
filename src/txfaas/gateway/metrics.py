"""The gateway's Prometheus metrics, with OpenFaaS's names and labels (prometheus_client).

Each gateway has its own ``CollectorRegistry`` (injected), so tests and several
gateways in one process do not share counters.  With ``--workers N`` the values
live in prometheus_client's multiprocess folder and ``/metrics`` of any process
reports the sum over all of them.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.application.internet import TimerService


class _Flush:
    """Registered ahead of the gateway's metrics: whoever collects the registry (``/metrics``,
    ``get_sample_value``) gets the counts still held by :class:`GatewayMetrics` applied first."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self._metrics.flush()
        return []


class GatewayMetrics:
    """The gateway's metrics, counted in plain dicts and applied to prometheus_client's in one
    step per label set (:meth:`flush`): when the registry is collected, when ``/metrics`` is
    rendered, and every second (so that with ``--workers N`` the other processes' files are at
    most a second behind).  The duration histogram is observed at once.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        r.register(_Flush(self))  # first: collected before the metrics below
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
        self._histograms: dict[tuple[str, int], Any] = {}
        # Not yet applied: calls started and finished per function, finished per (function, code),
        # async answers per (function, code).
        self._started: dict[str, int] = {}
        self._ended: dict[str, int] = {}
        self._finished: dict[tuple[str, int], int] = {}
        self._async: dict[tuple[str, int], int] = {}

    def started(self, name: str) -> None:
        started = self._started
        started[name] = started.get(name, 0) + 1

    def finished(self, name: str, code: int, seconds: float) -> None:
        key = (name, code)
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = self.seconds.labels(name, str(code))
        histogram.observe(seconds)
        ended, finished = self._ended, self._finished
        ended[name] = ended.get(name, 0) + 1
        finished[key] = finished.get(key, 0) + 1

    def async_answer(self, name: str, code: int) -> None:
        answers = self._async
        answers[(name, code)] = answers.get((name, code), 0) + 1

    def flush(self) -> None:
        """Apply the counts held since the last flush to the prometheus_client metrics."""
        started, self._started = self._started, {}
        ended, self._ended = self._ended, {}
        finished, self._finished = self._finished, {}
        answers, self._async = self._async, {}
        for name, n in started.items():
            self.invocation_started.labels(name).inc(n)
        for name in started.keys() | ended.keys():
            delta = started.get(name, 0) - ended.get(name, 0)
            if delta:
                self.inflight.labels(name).inc(delta)
        for (name, code), n in finished.items():
            self.invocation_total.labels(name, str(code)).inc(n)
        for (name, code), n in answers.items():
            self.async_calls.labels(name, str(code)).inc(n)

    def render(self) -> bytes:
        """Prometheus text; with several gateway processes, the sum over all of them."""
        self.flush()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class FlushMetrics(TimerService):
    """Applies the held counts every ``interval`` seconds, and once more when the gateway stops."""

    def __init__(self, metrics: GatewayMetrics, clock: Any, interval: float = 1.0) -> None:
        super().__init__(interval, metrics.flush)
        self.clock = clock
        self._metrics = metrics

    def stopService(self) -> Any:
        self._metrics.flush()
        return super().stopService()
