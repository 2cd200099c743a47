"""The one-write publish (``txfaas._accel.pika_publish``) against pika's own ``basic_publish``.

Both run on a real pika ``TwistedProtocolConnection`` over a ``StringTransport`` (the accel
module's ``StubBroker``): the bytes written and pika's counters must be the same for any body,
routing key, message id, timestamp, headers and frame size, and pika's own confirm handling
(acks, nacks, returns, closed channels) must resolve what the fast path returns.
"""

from __future__ import annotations

import struct

import pika
import pika.exceptions
import pika.frame
import pika.spec as spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txfaas import _accel
from txfaas._accel import pika_publish
from txfaas._accel.pika_publish import FramePublisher, StubBroker, content_header
from txfaas.model import Call
from txfaas.queue.amqp import CALL_HEADER
from txfaas.queue.amqp.publisher import Publisher


def call(body: bytes = b'{"x": 1}', call_id: str = "c-1", **kw) -> Call:
    return Call(call_id=call_id, function="echo", body=body, accepted_at=1_700_000_000.7, queue="q", **kw)


def stock_publish(broker: StubBroker, exchange, routing_key, body, message_id, timestamp, headers):
    properties = pika.BasicProperties(
        delivery_mode=2, message_id=message_id, timestamp=timestamp, headers=dict(headers)
    )
    return broker.channel.basic_publish(exchange, routing_key, body, properties=properties, mandatory=True)


def fast(broker: StubBroker) -> FramePublisher:
    publisher = FramePublisher.for_channel(broker.channel)
    assert publisher is not None, "pika's TwistedChannel no longer has what FramePublisher needs"
    return publisher


def fast_publish(broker: StubBroker, c: Call, exchange: str = "", routing_key: str = "q"):
    headers = ((CALL_HEADER.encode(), c.encode_meta()),)
    return fast(broker).publish(exchange, routing_key, c.body, c.call_id, int(c.accepted_at), headers)


def call_bytes(broker: StubBroker, c: Call, exchange: str = "", routing_key: str = "q") -> bytes:
    headers = [(CALL_HEADER, c.encode_meta().decode())]
    stock_publish(broker, exchange, routing_key, c.body, c.call_id, int(c.accepted_at), headers)
    return broker.written()


# --- differential: any message --------------------------------------------------------------------

short = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
message = st.fixed_dictionaries(
    {
        "exchange": st.sampled_from(["", "txfaas.delay.1000", "x" * 127]),
        "routing_key": short,
        "body": st.binary(max_size=9000),
        "message_id": short,
        "timestamp": st.integers(min_value=0, max_value=2**64 - 1),
        # Header names are unique (a table), values any string.
        "headers": st.dictionaries(short, st.text(max_size=300), max_size=4).map(lambda d: list(d.items())),
        "frame_max": st.sampled_from([4096, 4097, 8192, 131072]),
    }
)


@settings(max_examples=120, deadline=None)
@given(message)
def test_any_message_is_written_as_pika_writes_it(m: dict) -> None:
    """Same bytes, same bytes_sent/frames_sent, for bodies split over any frame size."""
    broker = StubBroker(frame_max=m["frame_max"])
    args = (m["exchange"], m["routing_key"], m["body"], m["message_id"], m["timestamp"])
    before = broker.counters()
    stock_publish(broker, *args, m["headers"])
    expected, middle = broker.written(), broker.counters()
    pairs = [(k.encode(), v.encode()) for k, v in m["headers"]]
    fast(broker).publish(*args, pairs)
    assert broker.written() == expected
    after = broker.counters()
    assert [a - b for a, b in zip(after, middle, strict=True)] == [
        b - a for a, b in zip(before, middle, strict=True)
    ]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=8), st.integers(min_value=0, max_value=7))
def test_pikas_acks_and_nacks_resolve_mixed_publishes_alike(fast_ones: list[bool], acked: int) -> None:
    """Fast and stock publishes share pika's delivery tags; a multiple ack then a nack settle
    each as pika settles its own."""
    broker = StubBroker()
    confirms = []
    for i, use_fast in enumerate(fast_ones):
        if use_fast:
            confirms.append(fast(broker).publish("", "q", b"b", f"m-{i}", 0, ()))
        else:
            confirms.append(stock_publish(broker, "", "q", b"b", f"m-{i}", 0, []))
    acked = min(acked, len(confirms))
    outcomes: list = [[] for _ in confirms]
    for d, out in zip(confirms, outcomes, strict=True):
        d.addBoth(out.append)
    if acked:
        broker.feed(1, spec.Basic.Ack(delivery_tag=acked, multiple=True))
    assert [bool(o) for o in outcomes] == [i < acked for i in range(len(confirms))]
    for tag in range(acked + 1, len(confirms) + 1):
        broker.feed(1, spec.Basic.Nack(delivery_tag=tag))
    assert all(len(o) == 1 for o in outcomes)
    for i, (out,) in enumerate(outcomes):
        if i < acked:
            assert isinstance(out, spec.Basic.Ack)
        else:
            assert out.check(pika.exceptions.NackError)
            out.trap(pika.exceptions.NackError)


# --- the call's own shapes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "callback_url": "http://h\u00e9:8080/cb",
            "headers": [("X-A", "\u2603" * 300)],
            "path": "/a/b",
            "query": "q=1",
        },
    ],
    ids=["plain", "unicode-and-long"],
)
def test_a_call_is_written_as_pika_writes_it(extra: dict) -> None:
    broker = StubBroker()
    c = call(bytes(range(256)) * 40, **extra)
    expected = call_bytes(broker, c)
    fast_publish(broker, c)
    assert broker.written() == expected
    fast_publish(broker, c)  # the kept method frame
    assert broker.written() == expected


def test_one_write_per_message() -> None:
    broker = StubBroker()
    writes: list[bytes] = []
    broker.transport.write = writes.append  # type: ignore[method-assign]
    fast_publish(broker, call(b"z" * 10))
    assert len(writes) == 1


def test_a_closed_channel_fails_as_pika_does() -> None:
    broker = StubBroker()
    broker.feed(1, spec.Channel.Close(reply_code=404, reply_text="NOT_FOUND", class_id=60, method_id=40))
    broker.written()
    d = fast_publish(broker, call())
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        StubBroker.result(d)
    assert broker.written() == b""


def test_a_pending_confirm_fails_when_the_broker_closes_the_channel() -> None:
    broker = StubBroker()
    d = fast_publish(broker, call())
    broker.feed(
        1, spec.Channel.Close(reply_code=406, reply_text="PRECONDITION_FAILED", class_id=60, method_id=40)
    )
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        StubBroker.result(d)


def test_a_channel_that_is_not_open_raises_as_pika_does() -> None:
    broker = StubBroker()
    impl = broker.channel._channel
    impl._set_state(impl.CLOSING)  # closing, not closed yet
    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        fast_publish(broker, call())
    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        call_bytes(broker, call())
    assert broker.written() == b""


def test_a_short_string_over_255_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="255"):
        content_header(0, 2, b"i" * 256, 0, ())
    with pytest.raises(ValueError, match="255"):
        content_header(0, 2, b"i", 0, ((b"n" * 256, b"v"),))
    # At the limit: what pika packs.
    props = pika.BasicProperties(delivery_mode=2, message_id="i" * 255, timestamp=7, headers={"n" * 255: "v"})
    expected = pika.frame.Header(1, 3, props).marshal()
    payload = content_header(3, 2, b"i" * 255, 7, ((b"n" * 255, b"v"),))
    assert struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce" == expected


def test_anything_else_is_not_its_business() -> None:
    assert FramePublisher.for_channel(object()) is None

    class Lookalike:
        _channel = object()

    assert FramePublisher.for_channel(Lookalike()) is None


# --- returns --------------------------------------------------------------------------------------


def returned(broker: StubBroker, message_id: str, body: bytes = b"") -> None:
    """The broker hands a mandatory message back (Basic.Return, its header and body)."""
    props = pika.BasicProperties(message_id=message_id)
    broker.feed(1, spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q"))
    broker.feed_raw(
        pika.frame.Header(1, len(body), props).marshal(),
        *([pika.frame.Body(1, body).marshal()] if body else []),
    )


def test_a_returned_message_is_known_by_its_id_and_its_confirm_fails_as_pikas() -> None:
    broker = StubBroker()
    publisher = Publisher(broker.channel)
    broker.channel.add_on_return_callback(publisher.on_return)
    c = call(call_id="lost-1")
    d = publisher.publish_call(c, c.encode_meta(), "", "q")
    returned(broker, "lost-1", c.body)
    broker.feed(1, spec.Basic.Ack(delivery_tag=1))
    with pytest.raises(pika.exceptions.UnroutableError):
        StubBroker.result(d)
    assert publisher.take_return("lost-1") and not publisher.take_return("lost-1")


# --- the probe and the switch ---------------------------------------------------------------------


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(pika_publish, "_probed", None)
    yield
    _accel.reset()


def test_the_probe_passes_on_this_pika(fresh_probe) -> None:
    assert pika_publish.probe()


def test_the_probe_fails_when_the_bytes_differ(fresh_probe, monkeypatch) -> None:
    """A pika whose content header differs from ours (here: ours is wrong) fails the probe."""
    real = pika_publish.content_header
    monkeypatch.setattr(pika_publish, "content_header", lambda *a: real(*a)[:-1] + b"\x01")
    assert not pika_publish.probe()


def test_the_probe_fails_when_pika_no_longer_resolves_our_confirms(fresh_probe, monkeypatch) -> None:
    """A pika that keeps its pending confirms elsewhere would never fire ours."""
    original = FramePublisher.publish

    def elsewhere(self, *args, **kwargs):
        original(self, *args, **kwargs)
        return pika_publish.defer.Deferred()

    monkeypatch.setattr(FramePublisher, "publish", elsewhere)
    assert not pika_publish.probe()


def test_the_queue_publishes_in_one_write_when_accelerated(fresh_probe, monkeypatch) -> None:
    monkeypatch.setenv(_accel.ENV, "1")
    _accel.reset()
    broker = StubBroker()
    publisher = Publisher(broker.channel)
    assert publisher._frames is not None
    c = call()
    expected = call_bytes(broker, c)
    publisher.publish_call(c, c.encode_meta(), "", "q")
    assert broker.written() == expected


@pytest.mark.parametrize("why", ["switched off", "probe failed"])
def test_the_queue_uses_basic_publish_otherwise(fresh_probe, monkeypatch, why) -> None:
    if why == "switched off":
        monkeypatch.setenv(_accel.ENV, "0")
    else:
        monkeypatch.setenv(_accel.ENV, "1")
        monkeypatch.setattr(pika_publish, "_probed", False)
    _accel.reset()
    broker = StubBroker()
    publisher = Publisher(broker.channel)
    assert publisher._frames is None
    calls: list = []
    original = broker.channel.basic_publish
    broker.channel.basic_publish = lambda *a, **kw: calls.append(kw) or original(*a, **kw)  # type: ignore[method-assign]
    c = call()
    publisher.publish_call(c, c.encode_meta(), "", "q")
    assert len(calls) == 1 and calls[0]["properties"].message_id == c.call_id
