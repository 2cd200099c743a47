"""The one SSRF rule: which addresses a callback may reach.

Used by the gateway (checking ``X-Callback-Url`` before accepting a call) and
by the worker (filtering every address at delivery time, so DNS that changed
since cannot reach an internal host).  Only global unicast addresses pass,
unless the operator allowed a network or host name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import implementer

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: is_private misses it
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_6TO4 = ipaddress.ip_network("2002::/16")
_COMPAT = ipaddress.ip_network("::/96")


class CallbackRefused(ValueError):
    """A callback URL or address the policy does not allow; ``str()`` says why."""


def unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address embedded in an IPv6 one (mapped, compatible, 6to4, NAT64, Teredo)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
        if ip in _NAT64 or ip in _COMPAT:
            if ip in _COMPAT and int(ip) <= 1:
                return ip  # :: and ::1 are themselves
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_global(ip: IPAddress) -> bool:
    """Globally routable unicast, after unwrapping embedded IPv4."""
    inner = unwrap(ip)
    if inner is not ip and not is_global(inner):
        return False
    if ip in _NAT64_LOCAL or ip in _SHARED:
        return False
    return bool(ip.is_global and not ip.is_multicast and not ip.is_reserved)


@attrs.frozen
class AddressPolicy:
    """Global addresses, plus what the operator allowed (``--callback-allow``)."""

    allow_networks: tuple[Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()

    def refusal(self, address: str) -> str | None:
        """``None`` when ``address`` may be reached, else the reason it may not."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        candidates = {ip, unwrap(ip)}
        if any(c in net for c in candidates for net in self.allow_networks if c.version == net.version):
            return None
        if is_global(ip):
            return None
        return f"address {address} is not a public address"

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allow_hosts


def parse_callback_url(url: str) -> tuple[str, str, int]:
    """Check the form of a callback URL: ``(scheme, host, port)``; :class:`CallbackRefused` if bad."""
    if len(url) > 2048:
        raise CallbackRefused("X-Callback-Url is longer than 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise CallbackRefused(f"X-Callback-Url is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("X-Callback-Url must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("X-Callback-Url may not carry credentials")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise CallbackRefused("X-Callback-Url contains spaces or control characters")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: defer.Deferred[list[str]] = defer.Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


async def check_callback_url(url: str, resolver: IHostnameResolver, policy: AddressPolicy) -> None:
    """Refuse a callback URL whose form is bad or any of whose addresses the policy refuses."""
    _scheme, host, port = parse_callback_url(url)
    if policy.host_allowed(host):
        return
    if _literal(host) is not None:  # an address: no resolver (and no thread) needed
        reason = policy.refusal(host)
        if reason is not None:
            raise CallbackRefused(f"callback host {host!r}: {reason}")
        return
    collector = _Collector()
    resolver.resolveHostName(collector, host, port)
    addresses = await collector.done
    if not addresses:
        raise CallbackRefused(f"callback host {host!r} does not resolve")
    for address in addresses:
        reason = policy.refusal(address)
        if reason is not None:
            raise CallbackRefused(f"callback host {host!r}: {reason}")


@implementer(IResolutionReceiver)
class _FilteringReceiver:
    log = Logger()

    def __init__(self, receiver: IResolutionReceiver, policy: AddressPolicy, host: str) -> None:
        self._receiver = receiver
        self._policy = policy
        self._host = host

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address: IPv4Address | IPv6Address) -> None:
        reason = self._policy.refusal(address.host)
        if reason is None:
            self._receiver.addressResolved(address)
        else:
            self.log.warn(
                "refusing {host} -> {address}: {reason}", host=self._host, address=address.host, reason=reason
            )

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class FilteringResolver:
    """A name resolver that hides every address the policy refuses (so no connection is made)."""

    def __init__(self, resolver: IHostnameResolver, policy: AddressPolicy) -> None:
        self._resolver = resolver
        self._policy = policy

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        receiver = resolutionReceiver
        if not self._policy.host_allowed(hostName):
            receiver = _FilteringReceiver(resolutionReceiver, self._policy, hostName)
        return self._resolver.resolveHostName(
            receiver, hostName, portNumber, addressTypes, transportSemantics
        )


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class LiteralResolver:
    """Answers IP addresses at once; asks ``resolver`` for names.

    Twisted's default resolver sends every host, addresses included, through a
    thread pool (``getaddrinfo``): for functions and callbacks at ``127.0.0.1`` or
    ``10.x`` that is a thread hop per new connection for nothing.
    """

    def __init__(self, resolver: IHostnameResolver) -> None:
        self._resolver = resolver

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        ip = _literal(hostName)
        if ip is None:
            return self._resolver.resolveHostName(
                resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
            )
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        kind = IPv6Address if ip.version == 6 else IPv4Address
        if addressTypes is None or kind in addressTypes:
            resolutionReceiver.addressResolved(kind("TCP", str(ip), portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class ResolverReactor:
    """The reactor, seen through another name resolver (give it to an ``Agent``)."""

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self._resolver = resolver

    @property
    def nameResolver(self) -> IHostnameResolver:
        return self._resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError("this reactor view's resolver is fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def literal_first(reactor: Any) -> ResolverReactor:
    """The reactor with IP addresses resolved at once (names still through its resolver)."""
    return ResolverReactor(reactor, LiteralResolver(reactor.nameResolver))


class FilteringReactor(ResolverReactor):
    """The reactor, seen through a :class:`FilteringResolver` (give it to an ``Agent``)."""

    def __init__(self, reactor: Any, policy: AddressPolicy) -> None:
        super().__init__(reactor, FilteringResolver(LiteralResolver(reactor.nameResolver), policy))
