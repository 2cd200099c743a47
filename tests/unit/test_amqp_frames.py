"""FramePublisher against pika itself: a real ``TwistedProtocolConnection`` over a
``StringTransport``, the broker's side of the handshake fed in as frames.

What it writes must be the bytes ``TwistedChannel.basic_publish`` writes for the same message,
and pika's own confirm handling (acks, nacks, returns) must resolve what it returns.
"""

from __future__ import annotations

import struct

import pika
import pika.exceptions
import pika.frame
import pika.spec as spec
import pytest
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet.testing import MemoryReactorClock, StringTransport

from txfaas.model import Call
from txfaas.queue.amqp import CALL_HEADER, _Publisher
from txfaas.queue.frames import FramePublisher, content_header


def frame(channel: int, method) -> bytes:
    return pika.frame.Method(channel, method).marshal()


class Broker:
    """The broker's half of a pika connection: handshake, one channel, confirm mode."""

    def __init__(self, frame_max: int = 131072) -> None:
        self.transport = StringTransport()
        self.conn = TwistedProtocolConnection(
            pika.ConnectionParameters(heartbeat=0), custom_reactor=MemoryReactorClock()
        )
        self.conn.makeConnection(self.transport)
        self.feed(
            frame(
                0,
                spec.Connection.Start(
                    server_properties={
                        "product": "test",
                        "capabilities": {"publisher_confirms": True, "basic.nack": True},
                    },
                    mechanisms="PLAIN",
                ),
            ),
            frame(0, spec.Connection.Tune(channel_max=16, frame_max=frame_max, heartbeat=0)),
            frame(0, spec.Connection.OpenOk()),
        )
        assert self.conn.is_open
        opened = self.conn.channel()
        self.feed(frame(1, spec.Channel.OpenOk()))
        self.channel = self.result(opened)
        confirming = self.channel.confirm_delivery()
        self.feed(frame(1, spec.Confirm.SelectOk()))
        self.result(confirming)
        self.transport.clear()

    def feed(self, *frames: bytes) -> None:
        for data in frames:
            self.conn.dataReceived(data)

    @staticmethod
    def result(d):
        out = []
        d.addBoth(out.append)
        assert out, "not fired"
        if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def written(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data


def call(body: bytes = b'{"x": 1}', call_id: str = "c-1", **kw) -> Call:
    return Call(call_id=call_id, function="echo", body=body, accepted_at=1_700_000_000.7, queue="q", **kw)


def pika_bytes(broker: Broker, c: Call, exchange: str = "", routing_key: str = "q") -> bytes:
    properties = pika.BasicProperties(
        delivery_mode=2,
        message_id=c.call_id,
        timestamp=int(c.accepted_at),
        headers={CALL_HEADER: c.encode_meta().decode()},
    )
    broker.channel.basic_publish(exchange, routing_key, c.body, properties=properties, mandatory=True)
    return broker.written()


def fast(broker: Broker) -> FramePublisher:
    publisher = FramePublisher.for_channel(broker.channel)
    assert publisher is not None, "pika's TwistedChannel no longer has what FramePublisher needs"
    return publisher


def fast_publish(broker: Broker, c: Call, exchange: str = "", routing_key: str = "q"):
    headers = ((CALL_HEADER.encode(), c.encode_meta()),)
    return fast(broker).publish(exchange, routing_key, c.body, c.call_id, int(c.accepted_at), headers)


@pytest.mark.parametrize(
    "body",
    [b"", b"x", b'{"hello": "w\xc3\xb6rld"}', bytes(range(256)) * 40],
    ids=["empty", "one-byte", "utf8", "10k-binary"],
)
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
def test_bytes_are_pikas(body: bytes, extra: dict) -> None:
    broker = Broker()
    c = call(body, **extra)
    expected = pika_bytes(broker, c)
    fast_publish(broker, c)
    assert broker.written() == expected


def test_a_body_larger_than_a_frame_is_split_as_pika_splits_it() -> None:
    broker = Broker(frame_max=4096)  # the smallest frame_max AMQP allows
    c = call(b"y" * 10000)
    expected = pika_bytes(broker, c)
    assert expected.count(b"\xce\x03\x00\x01") >= 2  # several body frames
    fast_publish(broker, c)
    assert broker.written() == expected


@pytest.mark.parametrize("exchange,routing_key", [("", "q"), ("txfaas.delay.1000", "work")])
def test_method_frame_per_exchange_and_key(exchange: str, routing_key: str) -> None:
    broker = Broker()
    c = call()
    expected = pika_bytes(broker, c, exchange, routing_key)
    fast_publish(broker, c, exchange, routing_key)
    assert broker.written() == expected
    fast_publish(broker, c, exchange, routing_key)  # the kept method frame
    assert broker.written() == expected


def test_one_write_per_message_and_pikas_counters() -> None:
    broker = Broker()
    writes: list[bytes] = []
    broker.transport.write = writes.append  # type: ignore[method-assign]
    sent, frames = broker.conn._impl.bytes_sent, broker.conn._impl.frames_sent
    fast_publish(broker, call(b"z" * 10))
    assert len(writes) == 1
    assert broker.conn._impl.bytes_sent == sent + len(writes[0])
    assert broker.conn._impl.frames_sent == frames + 3


def test_pika_acks_resolve_the_confirms_in_order() -> None:
    broker = Broker()
    confirms = [fast_publish(broker, call(call_id=f"c-{i}")) for i in range(3)]
    # pika's own publishes share the same delivery tags.
    mixed = broker.channel.basic_publish("", "q", b"", properties=pika.BasicProperties(), mandatory=True)
    broker.feed(frame(1, spec.Basic.Ack(delivery_tag=2, multiple=True)))
    assert [d.called for d in confirms] == [True, True, False]
    broker.feed(frame(1, spec.Basic.Ack(delivery_tag=4, multiple=True)))
    assert confirms[2].called and mixed.called


def test_a_nack_fails_the_confirm() -> None:
    broker = Broker()
    d = fast_publish(broker, call())
    broker.feed(frame(1, spec.Basic.Nack(delivery_tag=1)))
    with pytest.raises(pika.exceptions.NackError):
        Broker.result(d)


def test_a_closed_channel_fails_as_pika_does() -> None:
    broker = Broker()
    broker.feed(
        frame(1, spec.Channel.Close(reply_code=404, reply_text="NOT_FOUND", class_id=60, method_id=40))
    )
    broker.written()
    d = fast_publish(broker, call())
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        Broker.result(d)
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


def test_the_queue_publisher_uses_it_on_pikas_channel() -> None:
    broker = Broker()
    publisher = _Publisher(broker.channel)
    c = call()
    expected = pika_bytes(broker, c)
    publisher.publish_call(c, c.encode_meta(), "", "q")
    assert broker.written() == expected
    assert publisher._frames is not None


def test_anything_else_is_not_its_business() -> None:
    assert FramePublisher.for_channel(object()) is None

    class Lookalike:
        _channel = object()

    assert FramePublisher.for_channel(Lookalike()) is None


def returned(broker: Broker, message_id: str, body: bytes = b"") -> None:
    """The broker hands a mandatory message back (Basic.Return, its header and body)."""
    props = pika.BasicProperties(message_id=message_id)
    broker.feed(
        frame(1, spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q")),
        pika.frame.Header(1, len(body), props).marshal(),
        *([pika.frame.Body(1, body).marshal()] if body else []),
    )


def test_a_returned_message_is_known_by_its_id_and_its_confirm_fails_as_pikas() -> None:
    broker = Broker()
    publisher = _Publisher(broker.channel)
    broker.channel.add_on_return_callback(publisher.on_return)
    c = call(call_id="lost-1")
    d = publisher.publish_call(c, c.encode_meta(), "", "q")
    returned(broker, "lost-1", c.body)
    broker.feed(frame(1, spec.Basic.Ack(delivery_tag=1)))
    with pytest.raises(pika.exceptions.UnroutableError):
        Broker.result(d)
    assert publisher.take_return("lost-1") and not publisher.take_return("lost-1")


def test_a_pending_confirm_fails_when_the_broker_closes_the_channel() -> None:
    broker = Broker()
    d = fast_publish(broker, call())
    broker.feed(
        frame(
            1, spec.Channel.Close(reply_code=406, reply_text="PRECONDITION_FAILED", class_id=60, method_id=40)
        )
    )
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        Broker.result(d)


def test_a_channel_that_is_not_open_raises_as_pika_does() -> None:
    broker = Broker()
    broker.channel._channel._set_state(broker.channel._channel.CLOSING)  # closing, not closed yet
    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        fast_publish(broker, call())
    assert broker.written() == b""
