"""Callback delivery: headers, Standard Webhooks signing, timeouts, and the address check at delivery."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import HTTPConnectionPool

from tests.fakes import FakeResolver
from tests.support import Recorder, never_answer
from txfaas.config import parse_networks
from txfaas.http.ssrf import AddressPolicy, callback_agent
from txfaas.worker.callback import (
    Callback,
    CallbackDelivery,
    parse_signing_secret,
    sign,
    verify,
)

URL = "http://receiver.test:9000/hook?x=1"


def callback(**kwargs: Any) -> Callback:
    fields = {
        "url": URL,
        "call_id": "call-1",
        "function": "echo",
        "status_code": 200,
        "headers": [(b"Content-Type", b"application/json")],
        "body": b'{"ok": true}',
        "duration": 0.25,
    }
    fields.update(kwargs)
    return Callback(**fields)


def deliver(delivery: CallbackDelivery, cb: Callback) -> Any:
    d = defer.Deferred.fromCoroutine(delivery.deliver(cb))
    return d


def test_standard_webhooks_signature_matches_the_spec_example():
    """``sign`` reproduces the Standard Webhooks reference vector (whsec_ secret, id, timestamp, body)."""
    key = parse_signing_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signing_secret_forms():
    """``whsec_`` + base64 is decoded; other text is its UTF-8 bytes; empty or bad base64 is refused."""
    assert parse_signing_secret("whsec_" + base64.b64encode(b"\x00key").decode()) == b"\x00key"
    assert parse_signing_secret("plain text s\u00e9cret") == "plain text s\u00e9cret".encode()
    for bad in ("", "   ", "whsec_", "whsec_not base64!"):
        with pytest.raises(ValueError):
            parse_signing_secret(bad)


def test_verify_accepts_genuine_and_refuses_tampered_stale_or_unsigned():
    """The receiver-side check: right key and body pass; another body, key or an old timestamp fail."""
    key = b"k"
    headers = {
        "webhook-id": "c1",
        "webhook-timestamp": "1000",
        "webhook-signature": sign(key, "c1", 1000, b"b"),
    }
    assert verify(key, headers, b"b", now=1010) == "c1"
    assert verify(
        key, {**headers, "webhook-signature": "v1,bogus " + headers["webhook-signature"]}, b"b", 1000
    )
    with pytest.raises(ValueError):
        verify(key, headers, b"other body", now=1000)
    with pytest.raises(ValueError):
        verify(b"other key", headers, b"b", now=1000)
    with pytest.raises(ValueError):
        verify(key, headers, b"b", now=1000 + 301)
    with pytest.raises(ValueError):
        verify(key, {"webhook-id": "c1"}, b"b", now=1000)


def test_delivery_posts_the_body_with_the_function_headers_and_ours():
    """POST of the exact body; function headers kept; X-Call-Id/-Function-*/Duration set by the worker."""
    receiver = Recorder()
    delivery = CallbackDelivery(Clock(), RequestTraversalAgent(receiver))
    d = deliver(
        delivery,
        callback(
            headers=[
                (b"Content-Type", b"application/json"),
                (b"Content-Encoding", b"gzip"),
                (b"X-Duration-Seconds", b"99"),  # the function's own (watchdog) value: replaced
                (b"X-Call-Id", b"other"),
                (b"Connection", b"X-Private"),
                (b"X-Private", b"hop"),
                (b"Content-Length", b"5"),
            ]
        ),
    )
    outcome = d.result
    assert (outcome.state, outcome.status, outcome.delivered) == ("delivered", 200, True)
    [req] = receiver.requests
    assert (req["method"], req["uri"], req["body"]) == ("POST", "/hook?x=1", b'{"ok": true}')
    h = req["headers"]
    assert h["content-type"] == ["application/json"]
    assert h["content-encoding"] == ["gzip"]
    assert h["x-call-id"] == ["call-1"]
    assert h["x-function-name"] == ["echo"]
    assert h["x-function-status"] == ["200"]
    assert h["x-duration-seconds"] == ["0.250000"]
    assert h["content-length"] == [str(len(b'{"ok": true}'))]
    assert "x-private" not in h
    assert "webhook-signature" not in h


def test_signed_delivery_carries_standard_webhooks_headers_that_verify():
    """With a key: webhook-id = call id, webhook-timestamp = clock seconds, a signature over the body."""
    clock = Clock()
    clock.advance(1_700_000_000.7)
    receiver = Recorder()
    delivery = CallbackDelivery(clock, RequestTraversalAgent(receiver), signing_key=b"secret")
    assert deliver(delivery, callback()).result.delivered
    [req] = receiver.requests
    headers = {name: values[0] for name, values in req["headers"].items()}
    assert headers["webhook-id"] == "call-1"
    assert headers["webhook-timestamp"] == "1700000000"
    assert verify(b"secret", headers, req["body"], now=1_700_000_000) == "call-1"


@pytest.mark.parametrize("status", [200, 202, 204, 299])
def test_any_2xx_is_delivered(status):
    """Success is any 2xx answer."""
    delivery = CallbackDelivery(Clock(), RequestTraversalAgent(Recorder(lambda r: (status, {}, b""))))
    outcome = deliver(delivery, callback()).result
    assert (outcome.delivered, outcome.status) == (True, status)


@pytest.mark.parametrize("status", [301, 302, 400, 410, 500, 503])
def test_non_2xx_is_failed_with_the_status_and_redirects_are_not_followed(status):
    """3xx, 4xx, 5xx are failures; the status is kept; a Location is never requested."""
    receiver = Recorder(lambda r: (status, {"Location": "http://receiver.test:9000/elsewhere"}, b""))
    delivery = CallbackDelivery(Clock(), RequestTraversalAgent(receiver))
    outcome = deliver(delivery, callback()).result
    assert (outcome.state, outcome.status) == ("failed", status)
    assert len(receiver.requests) == 1


def test_callback_timeout_aborts_the_connection_and_fails():
    """A receiver that never answers is cut off at the callback timeout."""
    clock = Clock()
    receiver = Recorder(never_answer)
    agent = RequestTraversalAgent(receiver)
    delivery = CallbackDelivery(clock, agent, timeout=10.0)
    d = deliver(delivery, callback())
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)
    agent.flush()
    outcome = d.result
    assert outcome.state == "failed" and "10s" in outcome.error
    assert receiver.disconnected == ["/hook?x=1"]


def test_bad_callback_url_fails_without_a_request():
    """A URL that is not absolute http(s) fails the delivery; nothing is sent."""
    receiver = Recorder()
    delivery = CallbackDelivery(Clock(), RequestTraversalAgent(receiver))
    for url in ("ftp://x/y", "/relative", "http://user:pw@host/", "http://h\u00e9st/"):
        outcome = deliver(delivery, callback(url=url)).result
        assert outcome.state == "failed"
    assert receiver.requests == []


def test_cancelling_a_delivery_is_a_cancellation_not_a_failure():
    """The worker stopping mid-callback surfaces as CancelledError (so the message is requeued)."""
    delivery = CallbackDelivery(Clock(), RequestTraversalAgent(Recorder(never_answer)))
    d = deliver(delivery, callback())
    d.cancel()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(defer.CancelledError)


def filtered_delivery(addresses: list[str], allow: str = "") -> tuple[CallbackDelivery, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    reactor.nameResolver = FakeResolver(default=addresses)
    nets, hosts = parse_networks(allow)
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = callback_agent(
        reactor, pool, AddressPolicy(nets, hosts), connect_timeout=30
    )  # as tap.py builds it
    return CallbackDelivery(reactor, agent, timeout=10.0), reactor


def test_callback_host_resolving_to_a_private_address_at_delivery_is_refused():
    """DNS that now points the callback host at 10.0.0.5 gets no connection, and the delivery fails."""
    delivery, reactor = filtered_delivery(["10.0.0.5"])
    d = deliver(delivery, callback(url="http://hooks.example.com/cb"))
    reactor.advance(0)
    outcome = d.result
    assert outcome.state == "failed"
    assert outcome.retryable  # DNS may point elsewhere later
    assert "hooks.example.com" in outcome.error
    assert "address 10.0.0.5 is not a public address" in outcome.error
    assert reactor.tcpClients == []


def test_callback_to_a_literal_private_address_is_never_connected():
    """No --callback-allow: a callback to 127.0.0.1 gets no connection at all."""
    delivery, reactor = filtered_delivery([])
    d = deliver(delivery, callback(url="http://127.0.0.1:9000/cb"))
    reactor.advance(0)
    outcome = d.result
    assert outcome.state == "failed"
    assert "127.0.0.1" in outcome.error
    assert reactor.tcpClients == []


def test_callback_host_resolving_to_a_public_or_allowed_address_is_connected():
    """A public address, or one in --callback-allow, gets its connection."""
    delivery, reactor = filtered_delivery(["93.184.216.34"])
    deliver(delivery, callback(url="http://hooks.example.com/cb"))
    reactor.advance(0)
    assert [c[0] for c in reactor.tcpClients] == ["93.184.216.34"]

    delivery, reactor = filtered_delivery(["127.0.0.1"], allow="127.0.0.0/8")
    deliver(delivery, callback(url="http://localhost:9/cb"))
    reactor.advance(0)
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.1"]


def test_delivery_sends_the_path_and_query_but_never_the_fragment():
    """The agent sends the rest of the URL as the request target: the fragment must be cut first."""
    delivery, reactor = filtered_delivery(["93.184.216.34"])
    deliver(delivery, callback(url="http://hooks.example.com:9000/cb?x=1#frag"))
    reactor.advance(0)
    [(host, port, factory, _timeout, _bind)] = reactor.tcpClients
    assert (host, port) == ("93.184.216.34", 9000)
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    head = transport.value().split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0] == b"POST /cb?x=1 HTTP/1.1"
    assert head.count(b"Host: hooks.example.com:9000") == 1
