"""An in-memory gateway for unit tests: MemoryStore, MemoryQueue, a Clock, and functions as resources.

Nothing here opens a socket: the gateway is driven with treq's ``StubTreq`` and
calls its functions through a ``RequestTraversalAgent`` (real HTTP parsing over
in-memory transports), so what the function receives is what it would on a wire.
"""

from __future__ import annotations

import time
from io import BytesIO
from typing import Any

import treq
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock, Cooperator
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from txfaas.gateway.app import AppSettings, GatewayApp
from txfaas.gateway.metrics import GatewayMetrics
from txfaas.gateway.proxy import FunctionProxy, ProxySettings
from txfaas.gateway.root import BasicAuth, GatewayRoot
from txfaas.model import FunctionSpec
from txfaas.store.cache import FunctionCache
from txfaas.testing import MemoryQueue, MemoryStore


class Function(resource.Resource):
    """A function: records what it receives, answers with ``answer`` (status, headers, body).

    With ``hang=True`` it never answers; ``lost`` counts requests whose connection closed.
    """

    isLeaf = True

    def __init__(self, answer: tuple[int, list[tuple[bytes, bytes]], bytes] = (200, [], b"hello")) -> None:
        super().__init__()
        self.answer = answer
        self.hang = False
        self.seen: list[dict[str, Any]] = []
        self.lost = 0

    def render(self, request: server.Request) -> Any:
        self.seen.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": [
                    (k.lower(), v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs
                ],
                "body": request.content.read(),
            }
        )
        if self.hang:
            request.notifyFinish().addErrback(lambda _: setattr(self, "lost", self.lost + 1))
            return server.NOT_DONE_YET
        code, headers, body = self.answer
        request.setResponseCode(code)
        for k, v in headers:
            request.responseHeaders.addRawHeader(k, v)
        return body

    def header(self, name: bytes, index: int = -1) -> list[bytes]:
        return [v for k, v in self.seen[index]["headers"] if k == name.lower()]


class NoResolver:
    """A resolver for tests that must not resolve anything."""

    def resolveHostName(self, receiver: Any, host: str, port: int = 0, *a: Any, **k: Any) -> None:
        raise AssertionError(f"unexpected name resolution of {host}")


class GatewayTestCase(SynchronousTestCase):
    """Builds a gateway around in-memory parts; ``self.client`` talks to it."""

    upstream_timeout = 10.0
    auth: tuple[str, str] | None = None
    max_body: int | None = None
    max_async_body: int | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.cooperator = Cooperator(scheduler=lambda f: self.clock.callLater(0, f))
        self.store = MemoryStore(clock=self.clock)
        self.queue = MemoryQueue(["faas-request"])
        self.function = Function()
        self.function_agent = RequestTraversalAgent(self.function)
        self.metrics = GatewayMetrics()
        self.functions = FunctionCache(self.store, self.clock)
        self.resolver = self.make_resolver()
        self.build()

    def build(
        self,
        proxy_settings: ProxySettings | None = None,
        function_client: Any = None,
        invocations: Any = None,
        *,
        queue: Any = None,
        resolver: Any = None,
        settings: AppSettings | None = None,
        secret_box: Any = None,
    ) -> None:
        """(Re)build the proxy, the app and the root around the same store, queue and clock."""
        self.proxy = FunctionProxy(
            self.clock,
            function_client or self.function_agent,
            self.functions,
            proxy_settings or ProxySettings("http://{name}.fn:8080", self.upstream_timeout),
            self.metrics,
            invocations=invocations,
        )
        self.app = GatewayApp(
            self.functions,
            self.store,
            queue or self.queue,
            resolver or self.resolver,
            self.metrics,
            settings or self.app_settings(),
            clock=self.clock,
            secret_box=secret_box,
        )
        self.root = GatewayRoot(
            self.proxy,
            self.app,
            BasicAuth(*self.auth) if self.auth else None,
            max_body=self.max_body,
            max_async_body=self.max_async_body,
        )
        # A raw agent, not StubTreq: treq's client would decode gzip, follow redirects and
        # keep cookies on the test's side, hiding what the gateway really answered.
        self.client = RequestTraversalAgent(self.root)
        # Served as the gateway serves: LimitedSite, its requests, the direct hot routes.
        self.site = self.root.site(self.clock)
        self.client._serverFactory = self.site
        self.treq = StubTreq(self.root)

    def make_resolver(self) -> Any:
        return NoResolver()

    def app_settings(self) -> AppSettings:
        return AppSettings()

    def deploy(self, name: str = "echo", **fields: Any) -> FunctionSpec:
        spec = FunctionSpec.from_json({"service": name, **fields})
        self.successResultOf(defer.Deferred.fromCoroutine(self.store.create_function(spec)))
        return spec

    def flush(self) -> None:
        for _ in range(3):
            for _ in range(50):
                self.clock.advance(0)
            self.function_agent.flush()
            self.client.flush()

    def start(self, method: str, path: str, headers: Any = None, data: bytes | None = None) -> defer.Deferred:
        if headers is not None and not isinstance(headers, Headers):
            headers = Headers(headers)
        producer = None if data is None else FileBodyProducer(BytesIO(data), cooperator=self.cooperator)
        d = self.client.request(method.encode(), b"http://gw.test" + path.encode(), headers, producer)
        self.flush()
        return d

    def call(self, method: str, path: str, headers: Any = None, data: bytes | None = None) -> Any:
        """Make a request; return (response, body) once everything settled."""
        response = self.successResultOf(self.start(method, path, headers, data))
        body_d = treq.content(response)
        self.flush()
        return response, self.successResultOf(body_d)


def make_gateway(
    *,
    auth: tuple[str, str] | None = None,
    max_body: int | None = None,
    max_async_body: int | None = None,
    upstream_timeout: float = 10.0,
    settings: AppSettings | None = None,
) -> GatewayTestCase:
    """A gateway for a pytest function: :class:`GatewayTestCase`'s, set up, with its helpers
    (``call``, ``deploy``, ``successResultOf``...)."""
    gateway = GatewayTestCase()
    gateway.auth = auth
    gateway.max_body = max_body
    gateway.max_async_body = max_async_body
    gateway.upstream_timeout = upstream_timeout
    if settings is not None:
        gateway.app_settings = lambda: settings  # type: ignore[method-assign]
    gateway.setUp()
    return gateway


def set_up(case: Any) -> Any:
    """``case`` (a :class:`GatewayTestCase`) set up, for a pytest fixture to return."""
    case.setUp()
    return case
