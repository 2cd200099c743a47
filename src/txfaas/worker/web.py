"""The worker's own HTTP endpoints (``--listen``): ``/healthz`` and ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server


class HealthResource(resource.Resource):
    """200 ``ok`` when the broker and Redis answer, else 503 naming what does not."""

    isLeaf = True
    log = Logger()

    def __init__(self, health: Callable[[], Coroutine[Any, Any, list[str]]]) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request: server.Request) -> object:
        d: defer.Deferred[list[str]] = defer.Deferred.fromCoroutine(self._health())
        gone: list[Failure] = []  # the client went away: nothing more is written

        def disconnected(reason: Failure) -> None:
            gone.append(reason)
            d.cancel()

        d.addCallbacks(self._answer, self._failed, callbackArgs=(request, gone), errbackArgs=(request, gone))
        request.notifyFinish().addErrback(disconnected)
        return server.NOT_DONE_YET

    def _answer(self, problems: list[str], request: server.Request, gone: list[Failure]) -> None:
        if problems:
            self._write(request, gone, 503, f"unavailable: {', '.join(problems)}\n")
        else:
            self._write(request, gone, 200, "ok\n")

    def _failed(self, failure: Failure, request: server.Request, gone: list[Failure]) -> None:
        if failure.check(defer.CancelledError):
            return
        self.log.failure("health check failed", failure)
        self._write(request, gone, 503, "unavailable: health check failed\n")

    @staticmethod
    def _write(request: server.Request, gone: list[Failure], code: int, text: str) -> None:
        if gone or request.finished:
            return
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.write(text.encode())
        request.finish()


class MetricsResource(resource.Resource):
    """The registry's metrics in Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)


def worker_resource(
    health: Callable[[], Coroutine[Any, Any, list[str]]], registry: CollectorRegistry
) -> resource.Resource:
    """A worker's ``/healthz`` and ``/metrics``."""
    root = resource.Resource()
    root.putChild(b"healthz", HealthResource(health))
    root.putChild(b"metrics", MetricsResource(registry))
    return root


class SupervisorHealth(resource.Resource):
    """200 while every supervised worker process runs, else 503 naming the missing ones."""

    isLeaf = True

    def __init__(self, alive: Callable[[], list[int]], count: int) -> None:
        super().__init__()
        self._alive = alive
        self._count = count

    def render_GET(self, request: server.Request) -> bytes:
        running = set(self._alive())
        missing = [str(i) for i in range(1, self._count + 1) if i not in running]
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if missing:
            request.setResponseCode(503)
            return f"unhealthy: worker processes {', '.join(missing)} not running\n".encode()
        return b"OK\n"


class MultiProcessMetrics(resource.Resource):
    """The metrics of every worker process, added up (prometheus_client's multiprocess folder)."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(registry)


def supervisor_resource(alive: Callable[[], list[int]], count: int) -> resource.Resource:
    """The supervisor's ``/healthz`` (all processes alive) and ``/metrics`` (their sum)."""
    root = resource.Resource()
    root.putChild(b"healthz", SupervisorHealth(alive, count))
    root.putChild(b"metrics", MultiProcessMetrics())
    return root
