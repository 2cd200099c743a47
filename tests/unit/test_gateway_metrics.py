"""GatewayMetrics holds a call's counts in plain dicts and applies them to prometheus_client in one
step: whoever reads the registry, ``/metrics``, the timer and the gateway's stop all see them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from txfaas.gateway.metrics import FlushMetrics, GatewayMetrics


def _applied(metric, **labels):
    """The value prometheus_client itself holds (its own collect, not the registry's flush)."""
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels == labels and not sample.name.endswith("_created"):
                return sample.value
    return None


def _calls(metrics: GatewayMetrics, started: int, finished: int) -> None:
    for _ in range(started):
        metrics.started("echo")
    for _ in range(finished):
        metrics.finished("echo", 200, 0.01)
    metrics.async_answer("echo", 202)


def test_counts_wait_until_a_flush() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    _calls(metrics, started=3, finished=2)
    assert _applied(metrics.invocation_started, function_name="echo") is None
    assert _applied(metrics.seconds, function_name="echo", code="200", le="+Inf") == 2.0  # at once
    metrics.flush()
    assert _applied(metrics.invocation_started, function_name="echo") == 3.0
    assert _applied(metrics.inflight, function_name="echo") == 1.0
    assert _applied(metrics.invocation_total, function_name="echo", code="200") == 2.0
    assert _applied(metrics.async_calls, function_name="echo", code="202") == 1.0
    metrics.finished("echo", 200, 0.02)
    metrics.flush()
    metrics.flush()  # nothing held: nothing applied twice
    assert _applied(metrics.inflight, function_name="echo") == 0.0
    assert _applied(metrics.invocation_total, function_name="echo", code="200") == 3.0


def test_reading_the_registry_applies_what_is_held() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    _calls(metrics, started=2, finished=1)
    assert registry.get_sample_value("gateway_function_invocation_inflight", {"function_name": "echo"}) == 1.0
    assert (
        registry.get_sample_value(
            "gateway_function_invocation_total", {"function_name": "echo", "code": "200"}
        )
        == 1.0
    )
    assert b'gateway_async_calls_total{code="202",function_name="echo"} 1.0' in metrics.render()


def test_the_timer_applies_every_second_and_at_stop() -> None:
    clock = Clock()
    metrics = GatewayMetrics(CollectorRegistry())
    service = FlushMetrics(metrics, clock)
    service.startService()
    _calls(metrics, started=1, finished=0)
    clock.advance(0.5)
    assert _applied(metrics.invocation_started, function_name="echo") is None
    clock.advance(0.5)
    assert _applied(metrics.invocation_started, function_name="echo") == 1.0
    metrics.finished("echo", 500, 0.1)
    service.stopService()
    assert _applied(metrics.invocation_total, function_name="echo", code="500") == 1.0
    assert _applied(metrics.inflight, function_name="echo") == 0.0
