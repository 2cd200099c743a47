"""txfaas._accel.agent against Twisted's ``Agent``: for the URLs the gateway and the worker send
(absolute http/https, a host name or an IPv4/IPv6 address, any port, a path and query, no
fragment or user info), both ask the pool for the same key and write the same request."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.web.client import URI, Agent
from twisted.web.http_headers import Headers

from txfaas._accel import agent


class Endpoints:
    def __init__(self) -> None:
        self.asked: list[tuple[bytes, bytes, int]] = []

    def endpointForURI(self, uri: URI) -> Any:
        self.asked.append((uri.scheme, uri.host, uri.port))
        return None


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_HOST = st.one_of(
    st.lists(_LABEL, min_size=1, max_size=3).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
# No ``;``: ``URI.fromBytes`` drops an empty ``;`` parameter from the last segment, which the
# origin agent sends as given.
_PATH_CHARS = "abcXYZ019-._~!$&'()*+,=:@%/"
_PATH = st.text(alphabet=_PATH_CHARS, max_size=20).map(lambda p: "/" + p)
_QUERY = st.text(alphabet=_PATH_CHARS + "?", max_size=20)


@st.composite
def urls(draw: Any) -> bytes:
    scheme = draw(st.sampled_from(["http", "https"]))
    host = draw(_HOST)
    port = draw(st.sampled_from(["", ":80", ":443", ":8080", ":1"]))
    path = draw(st.one_of(st.just(""), _PATH))
    query = draw(st.one_of(st.just(""), _QUERY.map(lambda q: "?" + q)))
    if not path and query:
        path = "/"  # (``http://h?q``: Agent sends ``?q`` as the target; callers always give a path)
    return f"{scheme}://{host}{port}{path}{query}".encode("ascii")


_HEADERS = st.lists(
    st.tuples(st.sampled_from([b"x-a", b"Content-Type", b"host", b"X-Call-Id"]), st.binary(max_size=8)),
    max_size=4,
).map(lambda pairs: [(n, v.replace(b"\r", b"").replace(b"\n", b"")) for n, v in pairs])


def _headers(pairs: list[tuple[bytes, bytes]]) -> Headers:
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


@settings(max_examples=400, deadline=None)
@given(urls(), _HEADERS, st.sampled_from([b"GET", b"POST", b"HEAD", b"DELETE"]))
def test_the_origin_agent_writes_what_twisteds_agent_writes(url: bytes, pairs: Any, method: bytes) -> None:
    ours_endpoints, stock_endpoints = Endpoints(), Endpoints()
    ours = agent.written(agent.OriginAgent(None, ours_endpoints), method, url, _headers(pairs))
    stock = agent.written(Agent.usingEndpointFactory(Clock(), stock_endpoints), method, url, _headers(pairs))
    assert ours == stock
    assert set(ours_endpoints.asked) == set(stock_endpoints.asked)


def test_the_origin_is_looked_up_once_per_origin() -> None:
    endpoints = Endpoints()
    origin = agent.OriginAgent(None, endpoints)
    for url in (b"http://fn.local:8080/a", b"http://fn.local:8080/b?c", b"http://fn.local:8081/a"):
        agent.written(origin, b"GET", url, Headers())
    assert endpoints.asked == [(b"http", b"fn.local", 8080), (b"http", b"fn.local", 8081)]


def test_the_probe_passes_here_and_fails_when_the_target_is_written_differently(monkeypatch) -> None:
    assert agent.probe()
    monkeypatch.setattr(agent, "_DEFAULT_PORTS", {})
    assert not agent.probe()
