"""The one SSRF rule: which addresses a callback may reach, and the stock parts that enforce it.

The gateway checks ``X-Callback-Url`` before accepting a call (:func:`check_callback_url`).
The worker connects through a plain ``Agent`` whose reactor resolves names through
:class:`FilteringResolver` (:func:`blocklisting_reactor`), so every new connection only goes to
addresses the policy allows, whatever DNS says by then; :class:`BlocklistingAgent` refuses
IP-literal URLs up front.  Only global unicast addresses pass, unless the operator allowed a
network or host name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
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


#: What the resolver can take (its IDNA encoding refuses an empty label or one over 63).
_HOST_NAME = re.compile(r"(?=.{1,253}\.?\Z)[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")


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
    if not url.isascii():
        # The resolver would fail on it in its thread, and the check would wait for nothing.
        raise CallbackRefused(
            "X-Callback-Url must be ASCII (an international host name in its xn-- form, the rest "
            "percent-encoded)"
        )
    host = parts.hostname
    if _literal(host) is None and not _HOST_NAME.fullmatch(host):
        raise CallbackRefused(
            f"X-Callback-Url host {host!r} is not a host name (dot-separated labels of 1 to 63 "
            "letters, digits, '-' or '_', at most 253 characters)"
        )
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


@implementer(IResolutionReceiver)
class _Resolved:
    """The addresses of one resolution; ``done`` fires with them when it completes.

    Through a :class:`FilteringResolver` it also hears why each hidden address was refused
    (``refusals``), so a connection that finds nothing left can say why.
    """

    def __init__(self) -> None:
        self.addresses: list[IPv4Address | IPv6Address] = []
        self.refusals: list[str] = []
        self.done: defer.Deferred[list[IPv4Address | IPv6Address]] = defer.Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        assert isinstance(address, (IPv4Address, IPv6Address))
        self.addresses.append(address)

    def addressRefused(self, address: IPv4Address | IPv6Address, reason: str) -> None:
        self.refusals.append(reason)

    def resolutionComplete(self) -> None:
        if not self.done.called:  # a wait that was cancelled has failed already
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
    resolved = _Resolved()
    resolver.resolveHostName(resolved, host, port)
    addresses = await resolved.done
    if not addresses:
        raise CallbackRefused(f"callback host {host!r} does not resolve")
    for address in addresses:
        reason = policy.refusal(address.host)
        if reason is not None:
            raise CallbackRefused(f"callback host {host!r}: {reason}")


@implementer(IResolutionReceiver)
class _FilteringReceiver:
    log = Logger()

    def __init__(
        self, receiver: IResolutionReceiver, policy: AddressPolicy, host: str, refused: dict[str, str]
    ) -> None:
        self._receiver = receiver
        self._policy = policy
        self._host = host
        self._refused = refused
        self._passed = 0
        self._reasons: list[str] = []

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address: IAddress) -> None:
        assert isinstance(address, (IPv4Address, IPv6Address))
        reason = self._policy.refusal(address.host)
        if reason is None:
            self._passed += 1
            self._receiver.addressResolved(address)
        else:
            self._reasons.append(reason)
            self.log.warn(
                "refusing {host} -> {address}: {reason}", host=self._host, address=address.host, reason=reason
            )
            refused = getattr(self._receiver, "addressRefused", None)
            if refused is not None:
                refused(address, reason)

    def resolutionComplete(self) -> None:
        if self._reasons and not self._passed:
            if len(self._refused) >= 1024:
                self._refused.clear()
            self._refused[self._host] = "; ".join(self._reasons[:3]) + (
                "; ..." if len(self._reasons) > 3 else ""
            )
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class FilteringResolver:
    """A name resolver that hides every address the policy refuses (so no connection is made).

    A receiver with an ``addressRefused(address, reason)`` method is told of each hidden address;
    :meth:`why_nothing` says why a name was last left with no address at all.
    """

    def __init__(self, resolver: IHostnameResolver, policy: AddressPolicy) -> None:
        self._resolver = resolver
        self._policy = policy
        self._refused: dict[str, str] = {}

    def why_nothing(self, host: str) -> str | None:
        """Why ``host``'s last resolution left nothing to connect to, if addresses were refused."""
        return self._refused.pop(host, None)

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
            receiver = _FilteringReceiver(resolutionReceiver, self._policy, hostName, self._refused)
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

    Twisted's default resolver sends every host, addresses included, through ``getaddrinfo``
    in a thread pool: for an address that is a thread hop per new connection for nothing.
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
    """The reactor, seen through another name resolver (give it to an ``Agent``: its
    ``HostnameEndpoint``s resolve through ``resolver``)."""

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


@implementer(IHostResolution)
class _Remembered:
    """The resolution of a name answered from :class:`CachingResolver`'s memory (already over)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass  # complete before anyone could cancel it


@implementer(IResolutionReceiver)
class _Remembering:
    """Hands a resolution on to its receiver, and gives its addresses to the cache at the end."""

    def __init__(self, receiver: IResolutionReceiver, keep: Any) -> None:
        self._receiver = receiver
        self._keep = keep
        self._addresses: list[IPv4Address | IPv6Address] = []

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address: IAddress) -> None:
        assert isinstance(address, (IPv4Address, IPv6Address))
        self._addresses.append(address)
        self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        if self._addresses:  # a name that resolved to nothing is asked again next time
            self._keep(tuple(self._addresses))
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class CachingResolver:
    """Remembers what each name resolved to for ``ttl`` seconds (at most ``limit`` names).

    For the gateway's check of ``X-Callback-Url`` when it accepts a call, which would otherwise
    cost a ``getaddrinfo`` in the thread pool on every call.  Remembering is safe for that check: the worker resolves the host again, through the address policy,
    when it connects to deliver the callback.  A name that resolved to nothing, or failed,
    is not remembered.
    """

    def __init__(self, resolver: IHostnameResolver, clock: Any, ttl: float = 5.0, limit: int = 1024) -> None:
        self._resolver = resolver
        self._clock = clock
        self._ttl = ttl
        self._limit = limit
        self._known: dict[tuple, tuple[float, tuple[IPv4Address | IPv6Address, ...]]] = {}

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        key = (hostName, portNumber, tuple(addressTypes) if addressTypes else None, transportSemantics)
        known = self._known.get(key)
        if known is not None and known[0] > self._clock.seconds():
            resolution = _Remembered(hostName)
            resolutionReceiver.resolutionBegan(resolution)
            for address in known[1]:
                resolutionReceiver.addressResolved(address)
            resolutionReceiver.resolutionComplete()
            return resolution

        def keep(addresses: tuple[IPv4Address | IPv6Address, ...]) -> None:
            self._known.pop(key, None)
            while len(self._known) >= self._limit:
                del self._known[next(iter(self._known))]  # the oldest
            self._known[key] = (self._clock.seconds() + self._ttl, addresses)

        return self._resolver.resolveHostName(
            _Remembering(resolutionReceiver, keep), hostName, portNumber, addressTypes, transportSemantics
        )


def literal_first(reactor: Any) -> ResolverReactor:
    """The reactor with IP addresses resolved at once (names still through its resolver)."""
    return ResolverReactor(reactor, LiteralResolver(reactor.nameResolver))


def blocklisting_reactor(reactor: Any, policy: AddressPolicy) -> ResolverReactor:
    """The reactor with every name resolved through ``policy``: connections made through it
    (by an ``Agent``'s ``HostnameEndpoint``) only reach addresses the policy allows."""
    return ResolverReactor(reactor, FilteringResolver(LiteralResolver(reactor.nameResolver), policy))


@implementer(IAgent)
class BlocklistingAgent:
    """An ``Agent`` for callback URLs: an IP-literal host the policy refuses fails at once, and a
    name that resolved only to refused addresses fails saying why (``DNSLookupError`` both).

    ``resolver`` is the :class:`FilteringResolver` under ``agent`` (see :func:`blocklisting_reactor`).
    """

    def __init__(self, agent: IAgent, policy: AddressPolicy, resolver: FilteringResolver) -> None:
        self._agent = agent
        self._policy = policy
        self._resolver = resolver

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        try:
            parts = urlsplit(uri.decode("ascii"))
            host = parts.hostname or ""
        except ValueError as e:
            return defer.fail(e)
        if not parts.path:  # ``http://host?q``: the target is ``/?q`` (Agent would send ``?q``)
            uri = parts._replace(path="/").geturl().encode("ascii")
        if _literal(host) is not None and not self._policy.host_allowed(host):
            reason = self._policy.refusal(host)
            if reason is not None:
                return defer.fail(DNSLookupError(f"callback host {host}: {reason}"))
        d = self._agent.request(method, uri, headers, bodyProducer)
        return d.addErrback(self._explain, host)

    def _explain(self, failure: Failure, host: str) -> Failure:
        if failure.check(DNSLookupError):
            why = self._resolver.why_nothing(host)
            if why is not None:
                return Failure(DNSLookupError(f"callback host {host}: {why}"))
        return failure


def callback_agent(
    reactor: Any, pool: Any, policy: AddressPolicy, *, connect_timeout: float, tls: Any = None
) -> BlocklistingAgent:
    """A stock ``Agent`` over ``pool`` that connects only where ``policy`` allows; ``tls`` is the
    ``contextFactory`` for https (browser-like verification by default)."""
    resolver = FilteringResolver(LiteralResolver(reactor.nameResolver), policy)
    agent = Agent(
        ResolverReactor(reactor, resolver),
        contextFactory=tls or BrowserLikePolicyForHTTPS(),
        connectTimeout=connect_timeout,
        pool=pool,
    )
    return BlocklistingAgent(agent, policy, resolver)
