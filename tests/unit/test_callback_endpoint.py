"""txfaas.ssrf.CallbackEndpointFactory: callback connections go only where the policy allows.

Every test runs on a ``MemoryReactorClock`` with a resolver that answers what the test says
DNS answers (synchronously, or when the test completes it), so nothing touches the network.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TCPTimedOutError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface.verify import verifyObject

from tests.fakes import FakeResolver
from txfaas.client import CONNECT_TIMEOUT, PoolAgent
from txfaas.ssrf import AddressPolicy, CallbackEndpointFactory

PUBLIC = "93.184.216.34"
PUBLIC6 = "2606:4700::1111"
PRIVATE = "10.0.0.5"


def endpoint_for(
    url: bytes,
    answers: dict[str, list[str]] | None = None,
    policy: AddressPolicy | None = None,
    **kwargs: Any,
) -> tuple[IStreamClientEndpoint, MemoryReactorClock, FakeResolver]:
    reactor = MemoryReactorClock()
    resolver = FakeResolver(answers or {}, hold=kwargs.pop("hold", False))
    reactor.installNameResolver(resolver)
    factory = CallbackEndpointFactory(reactor, policy or AddressPolicy(), **kwargs)
    return factory.endpointForURI(URI.fromBytes(url)), reactor, resolver


def connect(endpoint: IStreamClientEndpoint) -> tuple[defer.Deferred, list[Any]]:
    """Start a connection; the list gets its result (a protocol or a Failure)."""
    results: list[Any] = []
    d = endpoint.connect(Factory.forProtocol(Protocol))
    d.addBoth(results.append)
    return d, results


def succeed(reactor: MemoryReactorClock, index: int = -1) -> Protocol:
    """The attempt ``index`` connects: its factory builds the protocol, which gets a transport."""
    host, port, factory, _timeout, _bind = reactor.tcpClients[index]
    wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
    wrapper.makeConnection(StringTransport())
    return wrapper._wrappedProtocol


def fail(reactor: MemoryReactorClock, error: Exception, index: int = -1) -> None:
    """The attempt ``index`` fails with ``error``."""
    factory = reactor.tcpClients[index][2]
    factory.clientConnectionFailed(reactor.connectors[index], Failure(error))


def attempted(reactor: MemoryReactorClock) -> list[tuple[str, int]]:
    return [(host, port) for host, port, *_ in reactor.tcpClients]


def test_factory_provides_iagentendpointfactory():
    assert verifyObject(IAgentEndpointFactory, CallbackEndpointFactory(MemoryReactorClock(), AddressPolicy()))


def test_an_allowed_ip_address_is_connected_without_the_resolver():
    endpoint, reactor, resolver = endpoint_for(b"http://93.184.216.34:8080/cb")
    _d, results = connect(endpoint)
    assert attempted(reactor) == [(PUBLIC, 8080)]
    assert reactor.tcpClients[0][3] == CONNECT_TIMEOUT
    assert resolver.asked == []
    assert results == []
    protocol = succeed(reactor)
    assert results == [protocol]


def test_an_allowed_ipv6_address_is_connected_over_tcp6():
    endpoint, reactor, _resolver = endpoint_for(b"http://[2606:4700::1111]:81/cb")
    connect(endpoint)
    assert attempted(reactor) == [(PUBLIC6, 81)]
    assert isinstance(reactor.connectors[0].getDestination(), IPv6Address)


def test_a_refused_ip_address_is_never_connected_and_the_error_says_why():
    endpoint, reactor, _resolver = endpoint_for(b"http://127.0.0.1:9/cb")
    _d, results = connect(endpoint)
    assert reactor.tcpClients == []
    [failure] = results
    assert failure.check(DNSLookupError)
    assert "127.0.0.1" in str(failure.value)
    assert "not a public address" in str(failure.value)


def test_a_name_resolving_to_a_refused_and_an_allowed_address_connects_only_to_the_allowed_one():
    endpoint, reactor, resolver = endpoint_for(
        b"http://hooks.example.com:9000/cb", {"hooks.example.com": [PRIVATE, PUBLIC]}
    )
    _d, results = connect(endpoint)
    assert resolver.asked == [("hooks.example.com", 9000)]
    assert attempted(reactor) == [(PUBLIC, 9000)]
    fail(reactor, ConnectionRefusedError())  # and when that fails, the refused one is still not tried
    assert attempted(reactor) == [(PUBLIC, 9000)]
    assert results[0].check(ConnectionRefusedError)


def test_a_name_resolving_only_to_refused_addresses_fails_naming_the_host_and_the_reason():
    endpoint, reactor, _resolver = endpoint_for(
        b"http://hooks.example.com/cb", {"hooks.example.com": [PRIVATE]}
    )
    _d, results = connect(endpoint)
    assert reactor.tcpClients == []
    [failure] = results
    assert failure.check(DNSLookupError)
    assert "hooks.example.com" in str(failure.value)
    assert f"address {PRIVATE} is not a public address" in str(failure.value)


def test_a_name_resolving_to_nothing_fails_with_dnslookuperror_naming_the_host():
    endpoint, reactor, _resolver = endpoint_for(b"http://nowhere.example.com/cb", {})
    _d, results = connect(endpoint)
    assert reactor.tcpClients == []
    [failure] = results
    assert failure.check(DNSLookupError)
    assert "no results for hostname lookup: nowhere.example.com" in str(failure.value)


def test_a_host_allowed_wholesale_is_resolved_and_connected_at_its_internal_address():
    policy = AddressPolicy(allow_hosts=("hooks.internal",))
    endpoint, reactor, resolver = endpoint_for(
        b"http://hooks.internal:8000/cb", {"hooks.internal": [PRIVATE]}, policy
    )
    connect(endpoint)
    assert resolver.asked == [("hooks.internal", 8000)]
    assert attempted(reactor) == [(PRIVATE, 8000)]


def test_addresses_are_tried_one_at_a_time_in_order_and_the_last_error_is_reported():
    endpoint, reactor, _resolver = endpoint_for(
        b"http://hooks.example.com/cb", {"hooks.example.com": [PUBLIC, PUBLIC6]}, timeout=5
    )
    _d, results = connect(endpoint)
    reactor.advance(1)  # no second attempt while the first is in progress (HostnameEndpoint: 0.3 s)
    assert attempted(reactor) == [(PUBLIC, 80)]
    assert reactor.tcpClients[0][3] == 5
    fail(reactor, ConnectionRefusedError())
    assert attempted(reactor) == [(PUBLIC, 80), (PUBLIC6, 80)]
    assert reactor.tcpClients[1][3] == 5
    assert results == []
    fail(reactor, TCPTimedOutError())
    [failure] = results
    assert failure.check(TCPTimedOutError)


def test_the_second_address_connects_when_the_first_fails():
    endpoint, reactor, _resolver = endpoint_for(
        b"http://hooks.example.com/cb", {"hooks.example.com": [PUBLIC, PUBLIC6]}
    )
    _d, results = connect(endpoint)
    fail(reactor, ConnectionRefusedError())
    assert attempted(reactor) == [(PUBLIC, 80), (PUBLIC6, 80)]
    protocol = succeed(reactor)
    assert results == [protocol]


def test_cancelling_during_resolution_fails_with_cancellederror_and_ignores_the_late_answer():
    endpoint, reactor, resolver = endpoint_for(
        b"http://hooks.example.com/cb", {"hooks.example.com": [PUBLIC]}, hold=True
    )
    d, results = connect(endpoint)
    assert results == []
    d.cancel()
    [failure] = results
    assert failure.check(defer.CancelledError)
    assert resolver.resolutions[0].cancelled
    resolver.finish()  # the answer arrives anyway: no connection, no second result
    assert reactor.tcpClients == []
    assert len(results) == 1


def test_cancelling_a_resolution_that_cannot_be_stopped_still_fails_with_cancellederror():
    endpoint, reactor, resolver = endpoint_for(
        b"http://hooks.example.com/cb", {"hooks.example.com": [PUBLIC]}, hold=True
    )
    d, results = connect(endpoint)

    def refuse() -> None:
        raise NotImplementedError()  # as Twisted's getaddrinfo resolver does

    resolver.resolutions[0].cancel = refuse  # type: ignore[method-assign]
    d.cancel()
    assert results[0].check(defer.CancelledError)
    resolver.finish()
    assert reactor.tcpClients == []


def test_cancelling_during_an_attempt_stops_it_and_tries_no_other_address():
    endpoint, reactor, _resolver = endpoint_for(
        b"http://hooks.example.com/cb", {"hooks.example.com": [PUBLIC, PUBLIC6]}
    )
    d, results = connect(endpoint)
    assert attempted(reactor) == [(PUBLIC, 80)]
    d.cancel()
    assert reactor.connectors[0].stoppedConnecting
    [failure] = results
    assert failure.check(defer.CancelledError)
    assert attempted(reactor) == [(PUBLIC, 80)]


def test_every_connection_resolves_and_checks_the_host_again():
    """DNS that changed between two connections: the second is refused."""
    endpoint, reactor, resolver = endpoint_for(
        b"http://hooks.example.com/cb", {"hooks.example.com": [PUBLIC]}
    )
    connect(endpoint)
    succeed(reactor)
    resolver.answers["hooks.example.com"] = [PRIVATE]
    _d, results = connect(endpoint)
    assert resolver.asked == [("hooks.example.com", 80)] * 2
    assert attempted(reactor) == [(PUBLIC, 80)]
    assert results[0].check(DNSLookupError)


class _RecordingTLSPolicy:
    def __init__(self) -> None:
        self.asked: list[tuple[bytes, int]] = []

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        self.asked.append((hostname, port))
        return optionsForClientTLS(hostname.decode("ascii"))


def test_https_wraps_the_connection_in_tls_for_the_urls_host():
    tls = _RecordingTLSPolicy()
    endpoint, reactor, _resolver = endpoint_for(
        b"https://hooks.example.com:8443/cb", {"hooks.example.com": [PUBLIC]}, tls=tls
    )
    connect(endpoint)
    assert tls.asked == [(b"hooks.example.com", 8443)]
    assert attempted(reactor) == [(PUBLIC, 8443)]
    assert isinstance(reactor.tcpClients[0][2]._wrappedFactory, TLSMemoryBIOFactory)


def test_https_uses_browser_like_verification_by_default():
    endpoint, reactor, _resolver = endpoint_for(
        b"https://hooks.example.com/cb", {"hooks.example.com": [PUBLIC]}
    )
    connect(endpoint)
    assert attempted(reactor) == [(PUBLIC, 443)]
    assert isinstance(reactor.tcpClients[0][2]._wrappedFactory, TLSMemoryBIOFactory)


def test_plain_http_is_not_wrapped():
    endpoint, reactor, _resolver = endpoint_for(b"http://93.184.216.34/cb")
    connect(endpoint)
    assert not isinstance(reactor.tcpClients[0][2]._wrappedFactory, TLSMemoryBIOFactory)


def test_other_schemes_are_not_supported():
    factory = CallbackEndpointFactory(MemoryReactorClock(), AddressPolicy())
    with pytest.raises(SchemeNotSupported):
        factory.endpointForURI(URI.fromBytes(b"ftp://hooks.example.com/"))


def test_pool_agent_requests_connect_through_the_policy():
    """What the worker builds: PoolAgent over the factory; a refused host never gets a connection."""
    reactor = MemoryReactorClock()
    reactor.installNameResolver(
        FakeResolver({"hooks.example.com": [PRIVATE, PUBLIC], "internal.example.com": [PRIVATE]})
    )
    agent = PoolAgent(
        HTTPConnectionPool(reactor, persistent=False), CallbackEndpointFactory(reactor, AddressPolicy())
    )
    agent.request(b"POST", b"http://hooks.example.com:9000/cb?x=1").addErrback(lambda _: None)
    assert attempted(reactor) == [(PUBLIC, 9000)]
    failures: list[Failure] = []
    agent.request(b"POST", b"http://internal.example.com/cb").addErrback(failures.append)
    assert attempted(reactor) == [(PUBLIC, 9000)]
    assert failures[0].check(DNSLookupError)
