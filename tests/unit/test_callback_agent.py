"""txfaas.http.ssrf.callback_agent: callback connections go only where the policy allows.

Every test runs on a ``MemoryReactorClock`` with a resolver that answers what the test says
DNS answers (synchronously, or when the test completes it), so nothing touches the network.
The agent is a stock ``Agent``: how it tries several addresses is ``HostnameEndpoint``'s.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IPolicyForHTTPS
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import FakeResolver
from txfaas.http.client import CONNECT_TIMEOUT
from txfaas.http.ssrf import AddressPolicy, callback_agent

PUBLIC = "93.184.216.34"
PUBLIC6 = "2606:4700::1111"
PRIVATE = "10.0.0.5"


class Setup:
    """A callback agent over a ``MemoryReactorClock`` whose DNS answers ``answers``."""

    def __init__(
        self,
        answers: dict[str, list[str]] | None = None,
        policy: AddressPolicy | None = None,
        hold: bool = False,
        tls: Any = None,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver(answers or {}, hold=hold)
        self.reactor.installNameResolver(self.resolver)
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.agent = callback_agent(
            self.reactor, pool, policy or AddressPolicy(), connect_timeout=CONNECT_TIMEOUT, tls=tls
        )

    def request(self, url: bytes) -> tuple[defer.Deferred, list[Any]]:
        """Start a POST; the list gets its result (a response or a Failure)."""
        results: list[Any] = []
        d = self.agent.request(b"POST", url)
        d.addBoth(results.append)
        self.reactor.advance(0)
        return d, results

    def attempted(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def fail(self, error: Exception, index: int = -1) -> None:
        """The attempt ``index`` fails with ``error``."""
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(error))

    def head(self, index: int = -1) -> bytes:
        """What the request wrote on the connection ``index`` once connected."""
        transport = StringTransport()
        self.reactor.tcpClients[index][2].buildProtocol(None).makeConnection(transport)
        return transport.value().split(b"\r\n\r\n", 1)[0]


def test_the_callback_agent_provides_iagent():
    assert verifyObject(IAgent, Setup().agent)


def test_an_allowed_ip_address_is_connected_without_the_resolver():
    s = Setup()
    _d, results = s.request(b"http://93.184.216.34:8080/cb")
    assert s.attempted() == [(PUBLIC, 8080)]
    assert s.reactor.tcpClients[0][3] == CONNECT_TIMEOUT
    assert s.resolver.asked == []
    assert results == []


def test_an_allowed_ipv6_address_is_connected_over_tcp6():
    s = Setup()
    s.request(b"http://[2606:4700::1111]:81/cb")
    assert s.attempted() == [(PUBLIC6, 81)]
    assert isinstance(s.reactor.connectors[0].getDestination(), IPv6Address)


@pytest.mark.parametrize("url", [b"http://127.0.0.1:9/cb", b"http://[::ffff:127.0.0.1]:9/cb"])
def test_a_refused_ip_address_is_never_connected_and_the_error_says_why(url):
    s = Setup()
    _d, results = s.request(url)
    assert s.reactor.tcpClients == [] and s.resolver.asked == []
    [failure] = results
    assert failure.check(DNSLookupError)
    assert "127.0.0.1" in str(failure.value)
    assert "not a public address" in str(failure.value)


def test_an_ip_address_in_an_allowed_network_is_connected():
    s = Setup(policy=AddressPolicy(allow_networks=(ipaddress.ip_network("127.0.0.0/8"),)))
    s.request(b"http://127.0.0.1:9/cb")
    assert s.attempted() == [("127.0.0.1", 9)]


def test_a_name_resolving_to_a_refused_and_an_allowed_address_connects_only_to_the_allowed_one():
    s = Setup({"hooks.example.com": [PRIVATE, PUBLIC]})
    _d, results = s.request(b"http://hooks.example.com:9000/cb")
    assert s.resolver.asked == [("hooks.example.com", 9000)]
    assert s.attempted() == [(PUBLIC, 9000)]
    s.fail(ConnectionRefusedError())  # and when that fails, the refused one is still not tried
    s.reactor.advance(1)
    assert s.attempted() == [(PUBLIC, 9000)]
    assert results[0].check(ConnectionRefusedError)


def test_a_name_resolving_only_to_refused_addresses_fails_naming_the_host_and_the_reason():
    s = Setup({"hooks.example.com": [PRIVATE]})
    _d, results = s.request(b"http://hooks.example.com/cb")
    assert s.reactor.tcpClients == []
    [failure] = results
    assert failure.check(DNSLookupError)
    assert "hooks.example.com" in str(failure.value)
    assert f"address {PRIVATE} is not a public address" in str(failure.value)


def test_a_name_resolving_to_nothing_fails_with_dnslookuperror_naming_the_host():
    s = Setup({})
    _d, results = s.request(b"http://nowhere.example.com/cb")
    assert s.reactor.tcpClients == []
    [failure] = results
    assert failure.check(DNSLookupError)
    assert "nowhere.example.com" in str(failure.value)


def test_a_host_allowed_wholesale_is_resolved_and_connected_at_its_internal_address():
    s = Setup({"hooks.internal": [PRIVATE]}, AddressPolicy(allow_hosts=("hooks.internal",)))
    s.request(b"http://hooks.internal:8000/cb")
    assert s.resolver.asked == [("hooks.internal", 8000)]
    assert s.attempted() == [(PRIVATE, 8000)]


def test_cancelling_during_resolution_fails_and_ignores_the_late_answer():
    s = Setup({"hooks.example.com": [PUBLIC]}, hold=True)
    d, results = s.request(b"http://hooks.example.com/cb")
    assert results == []
    d.cancel()  # (HostnameEndpoint reports it as a failed lookup; fetch() says CancelledError)
    [failure] = results
    assert isinstance(failure, Failure)
    s.resolver.finish()  # the answer arrives anyway: no connection, no second result
    s.reactor.advance(1)
    assert s.reactor.tcpClients == []
    assert len(results) == 1


def test_every_connection_resolves_and_checks_the_host_again():
    """DNS that changed between two connections: the second is refused."""
    s = Setup({"hooks.example.com": [PUBLIC]})
    s.request(b"http://hooks.example.com/cb")
    s.resolver.answers["hooks.example.com"] = [PRIVATE]
    _d, results = s.request(b"http://hooks.example.com/cb")
    assert s.resolver.asked == [("hooks.example.com", 80)] * 2
    assert s.attempted() == [(PUBLIC, 80)]
    assert results[0].check(DNSLookupError)


def test_an_empty_path_is_sent_as_slash_and_the_host_header_names_the_urls_host():
    s = Setup({"hooks.example.com": [PUBLIC]})
    s.request(b"http://hooks.example.com:9000?x=1")
    head = s.head().split(b"\r\n")
    assert head[0] == b"POST /?x=1 HTTP/1.1"
    assert b"Host: hooks.example.com:9000" in head


@implementer(IPolicyForHTTPS)
class _RecordingTLSPolicy:
    def __init__(self) -> None:
        self.asked: list[tuple[bytes, int]] = []

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        self.asked.append((hostname, port))
        return optionsForClientTLS(hostname.decode("ascii"))


def test_https_wraps_the_connection_in_tls_for_the_urls_host():
    tls = _RecordingTLSPolicy()
    s = Setup({"hooks.example.com": [PUBLIC]}, tls=tls)
    s.request(b"https://hooks.example.com:8443/cb")
    assert tls.asked == [(b"hooks.example.com", 8443)]
    assert s.attempted() == [(PUBLIC, 8443)]
    assert isinstance(s.reactor.tcpClients[0][2]._wrappedFactory, TLSMemoryBIOFactory)


def test_https_uses_browser_like_verification_by_default():
    s = Setup({"hooks.example.com": [PUBLIC]})
    s.request(b"https://hooks.example.com/cb")
    assert s.attempted() == [(PUBLIC, 443)]
    assert isinstance(s.reactor.tcpClients[0][2]._wrappedFactory, TLSMemoryBIOFactory)


def test_plain_http_is_not_wrapped():
    s = Setup()
    s.request(b"http://93.184.216.34/cb")
    assert not isinstance(s.reactor.tcpClients[0][2]._wrappedFactory, TLSMemoryBIOFactory)


def test_other_schemes_are_not_supported():
    _d, results = Setup().request(b"ftp://hooks.example.com/")
    assert results[0].check(SchemeNotSupported)
