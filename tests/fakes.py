"""Test doubles shared by the unit tests: a name resolver, a listening endpoint, a refusing agent.

Each stands in for one Twisted interface and records what it was asked, so a test can drive it
synchronously and check the calls afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from zope.interface import implementer


@implementer(IHostResolution)
class Resolution:
    """One name being resolved; remembers whether it was cancelled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@implementer(IHostnameResolver)
class FakeResolver:
    """Answers each name with ``answers[name]`` (IPv4 or IPv6 literals), else with ``default``.

    It answers inline, or, with ``hold``, only when the test calls :meth:`finish`.
    """

    def __init__(
        self,
        answers: Mapping[str, list[str]] | None = None,
        hold: bool = False,
        default: Iterable[str] = (),
    ) -> None:
        self.answers = dict(answers or {})
        self.hold = hold
        self.default = list(default)
        self.asked: list[tuple[str, int]] = []
        self.pending: list[tuple[IResolutionReceiver, str, int]] = []
        self.resolutions: list[Resolution] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append((hostName, portNumber))
        resolution = Resolution(hostName)
        self.resolutions.append(resolution)
        resolutionReceiver.resolutionBegan(resolution)
        if self.hold:
            self.pending.append((resolutionReceiver, hostName, portNumber))
        else:
            self._answer(resolutionReceiver, hostName, portNumber)
        return resolution

    def finish(self) -> None:
        """Answer every held resolution."""
        pending, self.pending = self.pending, []
        for receiver, host, port in pending:
            self._answer(receiver, host, port)

    def _answer(self, receiver: IResolutionReceiver, host: str, port: int) -> None:
        for address in self.answers.get(host, self.default):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, port))
        receiver.resolutionComplete()


class FakePort:
    """A listening port that only records that it was stopped."""

    def __init__(self) -> None:
        self.stopped = False

    def stopListening(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


class FakeEndpoint:
    """A server endpoint: listens at once on a :class:`FakePort`, fails with ``error``, or, with
    ``later``, answers only when the test fires :attr:`pending`."""

    def __init__(self, error: Exception | None = None, later: bool = False) -> None:
        self.error = error
        self.port = FakePort()
        self.factories: list[Any] = []
        self.pending: Deferred[Any] | None = Deferred() if later else None

    def listen(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        if self.pending is not None:
            return self.pending
        return fail(self.error) if self.error else succeed(self.port)


class RefusingAgent:
    """An ``IAgent`` whose every request fails with connection refused; counts the requests."""

    def __init__(self) -> None:
        self.requests = 0

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.requests += 1
        return fail(ConnectionRefusedError("nobody listens"))
