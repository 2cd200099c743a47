"""The worker's /healthz and /metrics (served on --listen)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionDone

from txfaas.worker.web import worker_resource


def get(client: StubTreq, path: str) -> tuple[int, str, dict]:
    response = client.get("http://worker" + path).result
    body = client.content(response).result
    client.flush()
    return response.code, body.decode(), response.headers


def test_healthz_is_200_when_everything_answers():
    async def health():
        return []

    code, body, _ = get(StubTreq(worker_resource(health, CollectorRegistry())), "/healthz")
    assert (code, body) == (200, "ok\n")


def test_healthz_is_503_naming_what_does_not_answer():
    async def health():
        return ["broker", "redis"]

    code, body, _ = get(StubTreq(worker_resource(health, CollectorRegistry())), "/healthz")
    assert (code, body) == (503, "unavailable: broker, redis\n")


def test_healthz_waits_for_the_probes():
    """The answer comes when the probes finish (they may take up to their timeout)."""
    gate: defer.Deferred = defer.Deferred()

    async def health():
        return await gate

    client = StubTreq(worker_resource(health, CollectorRegistry()))
    answers: list = []
    client.get("http://worker/healthz").addCallback(answers.append)
    client.flush()
    assert answers == []
    gate.callback(["redis"])
    client.flush()
    assert [r.code for r in answers] == [503]


def test_metrics_serves_the_injected_registry_only():
    """/metrics is the Prometheus text of the worker's own registry (no process-global metrics)."""
    registry = CollectorRegistry()
    Counter("txfaas_worker_example", "x", registry=registry).inc(3)

    async def health():
        return []

    code, body, headers = get(StubTreq(worker_resource(health, registry)), "/metrics")
    assert code == 200
    assert "txfaas_worker_example_total 3.0" in body
    assert "python_gc" not in body
    assert headers.getRawHeaders("content-type")[0].startswith("text/plain")


def test_healthz_stops_probing_and_writes_nothing_once_the_client_is_gone():
    """A client that disconnects cancels the probes; an answer they still give is not written."""
    from twisted.python.failure import Failure
    from twisted.web.test.requesthelper import DummyRequest

    from txfaas.worker.web import HealthResource

    gate: defer.Deferred = defer.Deferred()
    cancelled: list = []

    async def health():
        try:
            return await gate
        except defer.CancelledError:  # as the worker's probes do: any failure names what failed
            cancelled.append(True)
            return ["redis"]

    request = DummyRequest([b""])
    HealthResource(health).render_GET(request)
    request.processingFailed(Failure(ConnectionDone("client gone")))
    assert cancelled == [True]
    assert request.written == [] and request.finished == 0
