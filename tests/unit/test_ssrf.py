"""txfaas.http.ssrf: the one rule for which addresses a callback may reach."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import FakeResolver
from txfaas.config import parse_networks
from txfaas.http.ssrf import (
    AddressPolicy,
    CallbackRefused,
    FilteringResolver,
    check_callback_url,
    parse_callback_url,
    unwrap,
)


def teredo(client: str, server: str = "65.54.227.120") -> str:
    """The Teredo address of ``client`` (RFC 4380: 2001::/32, server, flags, port, ~client)."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= (0x8000 << 48) | ((~4096 & 0xFFFF) << 32) | (~int(ipaddress.IPv4Address(client)) & 0xFFFFFFFF)
    return str(ipaddress.IPv6Address(value))


LOOPBACK_TEREDO = teredo("127.0.0.1")

REFUSED = [
    "127.0.0.1",
    "127.1.2.3",
    "::1",
    "::ffff:127.0.0.1",
    "::127.0.0.1",
    "2002:7f00:1::",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    LOOPBACK_TEREDO,
    "169.254.169.254",
    "::ffff:169.254.169.254",
    "100.64.0.1",
    "100.127.255.254",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.0.1",
    "192.168.255.255",
    "0.0.0.0",
    "::",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "ff0e::1",
    "255.255.255.255",
    "192.0.2.1",
    "2001:db8::1",
    "64:ff9b:1::1",
    "not-an-ip",
    "",
]


@pytest.mark.parametrize("address", REFUSED)
def test_default_policy_refuses_loopback_private_link_local_shared_and_embedded_forms(address):
    reason = AddressPolicy().refusal(address)
    assert reason is not None
    assert "\n" not in reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2001:4860:4860::8888"])
def test_default_policy_allows_global_unicast(address):
    assert AddressPolicy().refusal(address) is None


def test_teredo_helper_really_embeds_the_client_address():
    assert ipaddress.IPv6Address(LOOPBACK_TEREDO).teredo[1] == ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize(
    ("wrapped", "inner"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::127.0.0.1", "127.0.0.1"),
        ("2002:7f00:1::", "127.0.0.1"),
        ("64:ff9b::7f00:1", "127.0.0.1"),
        (LOOPBACK_TEREDO, "127.0.0.1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("::", "::"),
        ("2606:4700::1111", "2606:4700::1111"),
        ("8.8.8.8", "8.8.8.8"),
    ],
)
def test_unwrap_finds_the_ipv4_address_inside_ipv6_forms(wrapped, inner):
    assert unwrap(ipaddress.ip_address(wrapped)) == ipaddress.ip_address(inner)


@given(st.ip_addresses(v=4))
def test_mapped_and_compatible_forms_are_judged_like_the_ipv4_inside(ip):
    policy = AddressPolicy()
    if policy.refusal(str(ip)) is not None:
        assert policy.refusal(f"::ffff:{ip}") is not None
        assert policy.refusal(str(ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80)))) is not None
        assert policy.refusal(str(ipaddress.IPv6Address((0x64FF9B << 96) | int(ip)))) is not None
        if int(ip) > 1:
            assert policy.refusal(f"::{ip}") is not None


def test_allow_networks_lets_loopback_and_its_mapped_form_through():
    policy = AddressPolicy(allow_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("127.9.9.9") is None
    assert policy.refusal("::ffff:127.0.0.1") is None
    assert policy.refusal("::1") is not None
    assert policy.refusal("10.0.0.1") is not None
    assert policy.refusal("169.254.169.254") is not None


def test_allow_networks_from_parse_networks_mixes_ipv4_and_ipv6():
    networks, _hosts = parse_networks("10.0.0.0/8, fd00::/8")
    policy = AddressPolicy(allow_networks=networks)
    assert policy.refusal("10.2.3.4") is None
    assert policy.refusal("fd00::5") is None
    assert policy.refusal("192.168.1.1") is not None


def test_allow_hosts_matches_case_insensitively_and_ignores_a_final_dot():
    policy = AddressPolicy(allow_hosts=("hooks.internal",))
    assert policy.host_allowed("hooks.internal")
    assert policy.host_allowed("HOOKS.Internal.")
    assert not policy.host_allowed("evil.hooks.internal")
    assert not policy.host_allowed("hooks.internal.evil")


# --- parse_callback_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://hooks.example/cb", ("http", "hooks.example", 80)),
        ("https://hooks.example/cb?x=1", ("https", "hooks.example", 443)),
        ("https://Hooks.Example:8443/", ("https", "hooks.example", 8443)),
        ("http://[2606:4700::1111]:81/", ("http", "2606:4700::1111", 81)),
    ],
)
def test_parse_callback_url_returns_scheme_host_and_port(url, expected):
    assert parse_callback_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example/",
        "file:///etc/passwd",
        "gopher://hooks.example/",
        "javascript:alert(1)",
        "/relative/path",
        "//hooks.example/cb",
        "hooks.example/cb",
        "http://",
        "http://user:pw@hooks.example/",
        "http://user@hooks.example/",
        "http://:@hooks.example/",
        "http://hooks.example/a b",
        "http://hooks.example/cb\r\nX-Injected: 1",
        "http://hooks.example/cb\n",
        "http://hooks.example/\tcb",
        "http://hooks.example/\x7f",
        "http://hooks.example:99999/",
        "http://[::1/",
        "http://hooks.example/" + "a" * 2040,
    ],
)
def test_parse_callback_url_refuses_non_http_relative_credentials_whitespace_and_over_long(url):
    with pytest.raises(CallbackRefused) as info:
        parse_callback_url(url)
    assert "X-Callback-Url" in str(info.value)


def test_parse_callback_url_allows_exactly_2048_characters():
    url = "http://hooks.example/"
    url += "a" * (2048 - len(url))
    assert parse_callback_url(url)[1] == "hooks.example"
    with pytest.raises(CallbackRefused):
        parse_callback_url(url + "a")


# --- resolution ---------------------------------------------------------------------------------


@implementer(IResolutionReceiver)
class Receiver:
    def __init__(self) -> None:
        self.began: IHostResolution | None = None
        self.addresses: list[str] = []
        self.complete = False

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self.began = resolution

    def addressResolved(self, address: IPv4Address | IPv6Address) -> None:
        self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.complete = True


def finished(coroutine: Any) -> Any:
    """Run a coroutine that must finish synchronously; return its result or raise its error."""
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert results, "the coroutine did not finish synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


RESOLVER = FakeResolver(
    {
        "public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "loopback.example": ["127.0.0.1"],
        "v6-loopback.example": ["::1"],
        "mapped.example": ["::ffff:127.0.0.1"],
        "metadata.example": ["169.254.169.254"],
        "mixed.example": ["93.184.216.34", "10.0.0.5"],
        "mixed-last.example": ["93.184.216.34", "2606:4700::1111", "fe80::1"],
        "nothing.example": [],
        "127.0.0.1": ["127.0.0.1"],
    }
)


def test_check_callback_url_accepts_a_name_resolving_to_public_addresses():
    assert finished(check_callback_url("https://public.example/cb", RESOLVER, AddressPolicy())) is None


def test_check_callback_url_resolves_the_urls_host_and_port():
    resolver = FakeResolver({"public.example": ["8.8.8.8"]})
    finished(check_callback_url("https://public.example:8443/cb", resolver, AddressPolicy()))
    assert resolver.asked == [("public.example", 8443)]


@pytest.mark.parametrize(
    "host", ["loopback.example", "v6-loopback.example", "mapped.example", "metadata.example", "127.0.0.1"]
)
def test_check_callback_url_refuses_a_name_resolving_to_an_internal_address(host):
    with pytest.raises(CallbackRefused, match="not a public address"):
        finished(check_callback_url(f"http://{host}/cb", RESOLVER, AddressPolicy()))


@pytest.mark.parametrize("host", ["mixed.example", "mixed-last.example"])
def test_check_callback_url_refuses_when_any_address_is_not_global(host):
    with pytest.raises(CallbackRefused, match=host):
        finished(check_callback_url(f"http://{host}/cb", RESOLVER, AddressPolicy()))


@pytest.mark.parametrize("host", ["nothing.example", "unknown.example"])
def test_check_callback_url_refuses_a_name_that_resolves_to_nothing(host):
    with pytest.raises(CallbackRefused, match="does not resolve"):
        finished(check_callback_url(f"http://{host}/cb", RESOLVER, AddressPolicy()))


def test_check_callback_url_refuses_a_bad_form_before_resolving():
    resolver = FakeResolver({})
    with pytest.raises(CallbackRefused):
        finished(check_callback_url("ftp://public.example/", resolver, AddressPolicy()))
    assert resolver.asked == []


def test_check_callback_url_allowed_host_skips_resolution():
    resolver = FakeResolver({"hooks.internal": ["10.0.0.7"]})
    policy = AddressPolicy(allow_hosts=("hooks.internal",))
    assert finished(check_callback_url("http://hooks.internal/cb", resolver, policy)) is None
    assert resolver.asked == []


def test_check_callback_url_allowed_network_lets_an_internal_answer_through():
    policy = AddressPolicy(allow_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    resolver = FakeResolver({"hooks.internal": ["10.0.0.7"]})
    assert finished(check_callback_url("http://hooks.internal/cb", resolver, policy)) is None


def test_filtering_resolver_hides_refused_addresses_from_the_receiver():
    resolver = FilteringResolver(RESOLVER, AddressPolicy())
    receiver = Receiver()
    resolution = resolver.resolveHostName(receiver, "mixed-last.example", 443)
    assert receiver.addresses == ["93.184.216.34", "2606:4700::1111"]
    assert receiver.began is resolution
    assert receiver.complete


def test_filtering_resolver_leaves_nothing_for_a_loopback_name():
    receiver = Receiver()
    FilteringResolver(RESOLVER, AddressPolicy()).resolveHostName(receiver, "loopback.example", 80)
    assert receiver.addresses == []
    assert receiver.complete


def test_filtering_resolver_passes_every_address_of_an_allowed_host():
    receiver = Receiver()
    policy = AddressPolicy(allow_hosts=("mixed.example",))
    FilteringResolver(RESOLVER, policy).resolveHostName(receiver, "mixed.example", 80)
    assert receiver.addresses == ["93.184.216.34", "10.0.0.5"]


def test_filtering_resolver_provides_ihostnameresolver():
    assert verifyObject(IHostnameResolver, FilteringResolver(RESOLVER, AddressPolicy()))


def test_filtering_resolver_tells_a_receiver_that_asks_why_each_address_was_hidden():
    refused: list[tuple[str, str]] = []

    class Asking(Receiver):
        def addressRefused(self, address, reason):
            refused.append((address.host, reason))

    receiver = Asking()
    FilteringResolver(RESOLVER, AddressPolicy()).resolveHostName(receiver, "mixed.example", 80)
    assert receiver.addresses == ["93.184.216.34"]
    assert refused == [("10.0.0.5", "address 10.0.0.5 is not a public address")]


class _NoThreads:
    """A resolver that must not be asked (it stands for Twisted's thread-pool resolver)."""

    def resolveHostName(self, *args, **kwargs):
        raise AssertionError("an IP address went to the resolver")


class _Receiver:
    def __init__(self):
        self.addresses = []
        self.done = False

    def resolutionBegan(self, resolution):
        self.name = resolution.name

    def addressResolved(self, address):
        self.addresses.append((type(address).__name__, address.host, address.port))

    def resolutionComplete(self):
        self.done = True


def test_ip_addresses_are_answered_without_the_resolver():
    from txfaas.http.ssrf import LiteralResolver

    for host, expected in [
        ("127.0.0.1", ("IPv4Address", "127.0.0.1", 80)),
        ("::1", ("IPv6Address", "::1", 80)),
    ]:
        receiver = _Receiver()
        LiteralResolver(_NoThreads()).resolveHostName(receiver, host, 80)
        assert receiver.done and receiver.addresses == [expected]


def test_callback_ip_literals_are_checked_without_the_resolver():
    from twisted.internet.defer import Deferred

    from txfaas.http.ssrf import AddressPolicy, CallbackRefused, check_callback_url

    d = Deferred.fromCoroutine(check_callback_url("http://127.0.0.1:9/", _NoThreads(), AddressPolicy()))
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(CallbackRefused)
    d = Deferred.fromCoroutine(check_callback_url("http://8.8.8.8/", _NoThreads(), AddressPolicy()))
    results = []
    d.addCallback(results.append)
    assert results == [None]


def test_filtering_resolver_still_refuses_literal_private_addresses():
    from txfaas.http.ssrf import AddressPolicy, FilteringResolver, LiteralResolver

    receiver = _Receiver()
    FilteringResolver(LiteralResolver(_NoThreads()), AddressPolicy()).resolveHostName(
        receiver, "127.0.0.1", 80
    )
    assert receiver.done and receiver.addresses == []


def test_literal_first_reactor_answers_addresses_itself_and_delegates_everything_else():
    from twisted.internet.testing import MemoryReactorClock

    from txfaas.http.ssrf import literal_first

    reactor = MemoryReactorClock()
    reactor.installNameResolver(RESOLVER)
    view = literal_first(reactor)
    receiver = Receiver()
    view.nameResolver.resolveHostName(receiver, "127.0.0.1", 80)
    view.nameResolver.resolveHostName(receiver, "mixed.example", 80)
    assert receiver.addresses == ["127.0.0.1", "93.184.216.34", "10.0.0.5"]
    view.callLater(5, lambda: None)
    assert len(reactor.getDelayedCalls()) == 1
    assert view.seconds() == reactor.seconds()
    with pytest.raises(NotImplementedError):
        view.installNameResolver(RESOLVER)


# --- CachingResolver: the gateway's callback check remembers names for a few seconds ------------


def _resolve(resolver: Any, host: str, port: int = 80) -> Receiver:
    receiver = Receiver()
    resolver.resolveHostName(receiver, host, port)
    return receiver


def test_caching_resolver_answers_a_name_again_from_memory_until_its_time_is_up():
    from twisted.internet.task import Clock

    from txfaas.http.ssrf import CachingResolver

    clock = Clock()
    upstream = FakeResolver({"hooks.example": ["203.0.113.7", "2001:db8::7"]})
    resolver = CachingResolver(upstream, clock, ttl=5.0)
    verifyObject(IHostnameResolver, resolver)
    first = _resolve(resolver, "hooks.example")
    clock.advance(4.9)
    again = _resolve(resolver, "hooks.example")
    assert upstream.asked == [("hooks.example", 80)]  # the second came from memory
    assert again.addresses == first.addresses == ["203.0.113.7", "2001:db8::7"]
    assert again.complete and again.began is not None and again.began.name == "hooks.example"
    verifyObject(IHostResolution, again.began)
    _resolve(resolver, "hooks.example", 443)  # another port: another question
    clock.advance(0.2)
    _resolve(resolver, "hooks.example")  # past its time: asked again
    assert upstream.asked == [("hooks.example", 80), ("hooks.example", 443), ("hooks.example", 80)]


def test_caching_resolver_does_not_remember_a_name_that_resolved_to_nothing():
    from twisted.internet.task import Clock

    from txfaas.http.ssrf import CachingResolver

    upstream = FakeResolver({})
    resolver = CachingResolver(upstream, Clock())
    assert _resolve(resolver, "nowhere.example").addresses == []
    assert _resolve(resolver, "nowhere.example").complete
    assert len(upstream.asked) == 2


def test_caching_resolver_keeps_at_most_limit_names_dropping_the_oldest():
    from twisted.internet.task import Clock

    from txfaas.http.ssrf import CachingResolver

    upstream = FakeResolver({f"h{i}.example": ["203.0.113.1"] for i in range(4)})
    resolver = CachingResolver(upstream, Clock(), limit=3)
    for i in range(4):
        _resolve(resolver, f"h{i}.example")
    _resolve(resolver, "h3.example")  # still known
    _resolve(resolver, "h0.example")  # dropped for h3: asked again
    assert [h for h, _ in upstream.asked] == [
        "h0.example",
        "h1.example",
        "h2.example",
        "h3.example",
        "h0.example",
    ]


def test_a_callback_check_through_the_caching_resolver_still_refuses_what_the_policy_refuses():
    from twisted.internet.task import Clock

    from txfaas.http.ssrf import CachingResolver

    upstream = FakeResolver({"inside.example": ["10.0.0.5"], "hooks.example": ["93.184.216.34"]})
    resolver = CachingResolver(upstream, Clock())
    policy = AddressPolicy()
    for _ in range(2):  # the second time from memory
        refused = Deferred.fromCoroutine(check_callback_url("http://inside.example/cb", resolver, policy))
        failures: list[Failure] = []
        refused.addErrback(failures.append)
        assert failures and failures[0].check(CallbackRefused)
        ok = Deferred.fromCoroutine(check_callback_url("https://hooks.example/cb", resolver, policy))
        results: list[Any] = []
        ok.addBoth(results.append)
        assert results == [None]
    assert len(upstream.asked) == 2
