"""A message published on pika's ``TwistedChannel`` in one write, with the bytes pika would send.

``TwistedChannel.basic_publish`` marshals the ``Basic.Publish`` method (the same bytes for every
message to a queue) and walks all fourteen ``BasicProperties``, then writes three frames.
:class:`FramePublisher` keeps the method frame per (exchange, routing key), packs the content
header for the properties a call has (``delivery_mode``, ``message_id``, ``timestamp``, a
``headers`` table of strings) and hands all frames to pika's ``_adapter_emit_data`` at once.
The confirm is registered in ``TwistedChannel._deliveries`` as ``basic_publish`` does, so pika's
own ``Basic.Ack``/``Nack``/``Return`` handling resolves it.

:func:`probe` runs both on a pika connection over a ``StringTransport`` and checks the bytes,
pika's counters and the confirms; ``tests/unit/test_accel_pika_publish.py`` is the differential
test.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import pika
import pika.frame
import pika.spec
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# Frame: type, channel, payload size; payload; frame end (AMQP 0-9-1, section 4.2.3).
_FRAME = struct.Struct(">BHI").pack
_FRAME_END = bytes((pika.spec.FRAME_END,))
_FRAME_HEADER = pika.spec.FRAME_HEADER
_FRAME_BODY = pika.spec.FRAME_BODY
# Content header payload: class id, weight (0), body size, property flags.
_CONTENT = struct.Struct(">HHQH").pack
_BASIC = pika.spec.BasicProperties.INDEX
_LONG = struct.Struct(">I").pack
_TIMESTAMP = struct.Struct(">Q").pack
# Basic's property flags for the ones a call has, in their order on the wire.
_FLAGS = (
    pika.spec.BasicProperties.FLAG_HEADERS
    | pika.spec.BasicProperties.FLAG_DELIVERY_MODE
    | pika.spec.BasicProperties.FLAG_MESSAGE_ID
    | pika.spec.BasicProperties.FLAG_TIMESTAMP
)
_SHORTSTR_MAX = 255


def content_header(
    body_size: int,
    delivery_mode: int,
    message_id: bytes,
    timestamp: int,
    headers: Sequence[tuple[bytes, bytes]],
) -> bytes:
    """The content header frame's payload for these properties (headers: long strings, 'S').

    Names and ``message_id`` are short strings: at most 255 bytes (:class:`ValueError`)."""
    if len(message_id) > _SHORTSTR_MAX or any(len(name) > _SHORTSTR_MAX for name, _ in headers):
        raise ValueError("a short string is longer than 255 bytes")
    table = b"".join(b"%c%sS%s%s" % (len(name), name, _LONG(len(value)), value) for name, value in headers)
    return b"".join(
        (
            _CONTENT(_BASIC, 0, body_size, _FLAGS),
            _LONG(len(table)),
            table,
            b"%c%c%s" % (delivery_mode, len(message_id), message_id),
            _TIMESTAMP(timestamp),
        )
    )


class FramePublisher:
    """Publishes on one confirm-mode ``TwistedChannel`` (see the module's documentation)."""

    def __init__(self, channel: Any, impl: Any, connection: Any) -> None:
        self._channel = channel  # pika's TwistedChannel
        self._impl = impl  # its pika.channel.Channel
        self._connection = connection  # the pika connection (Twisted adapter)
        self._number = impl.channel_number
        self._methods: dict[tuple[str, str, bool], bytes] = {}

    @classmethod
    def for_channel(cls, channel: Any) -> FramePublisher | None:
        """A publisher for pika's ``TwistedChannel`` ``channel``; None for anything else, or a
        pika whose adapter no longer has the state this relies on."""
        impl = getattr(channel, "_channel", None)
        connection: Any = getattr(impl, "connection", None)
        needed = (
            (channel, ("_closed", "_delivery_confirmation", "_delivery_message_id", "_deliveries")),
            (impl, ("channel_number", "is_open", "_raise_if_not_open")),
            (connection, ("_body_max_length", "_adapter_emit_data", "bytes_sent", "frames_sent")),
        )
        if not all(hasattr(obj, name) for obj, names in needed for name in names):
            return None
        if not isinstance(channel._deliveries, dict) or not isinstance(connection._body_max_length, int):
            return None
        return cls(channel, impl, connection)

    def _method_frame(self, exchange: str, routing_key: str, mandatory: bool) -> bytes:
        key = (exchange, routing_key, mandatory)
        marshalled = self._methods.get(key)
        if marshalled is None:
            method = pika.spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
            marshalled = self._methods[key] = pika.frame.Method(self._number, method).marshal()
        return marshalled

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        timestamp: int,
        headers: Sequence[tuple[bytes, bytes]],
        mandatory: bool = True,
        delivery_mode: int = 2,
    ) -> defer.Deferred:
        """What ``channel.basic_publish(...)`` with those properties does, in one write.

        Returns the confirm's Deferred (a failed one if the channel is closed); raises what
        pika raises when the channel is not open, and :class:`ValueError` for a short string
        over 255 bytes."""
        channel = self._channel
        if channel._closed:
            return defer.fail(channel._closed)
        if not self._impl.is_open:
            self._impl._raise_if_not_open()
        number = self._number
        size = len(body)
        header = content_header(size, delivery_mode, message_id.encode(), timestamp, headers)
        frames = [
            self._method_frame(exchange, routing_key, mandatory),
            _FRAME(_FRAME_HEADER, number, len(header)),
            header,
            _FRAME_END,
        ]
        connection = self._connection
        step = connection._body_max_length
        for start in range(0, size, step):
            chunk = body[start : start + step]
            frames += (_FRAME(_FRAME_BODY, number, len(chunk)), chunk, _FRAME_END)
        data = b"".join(frames)
        connection.bytes_sent += len(data)
        connection.frames_sent += 2 + -(-size // step)
        connection._adapter_emit_data(data)
        if not channel._delivery_confirmation:
            return defer.succeed(None)
        channel._delivery_message_id += 1
        confirm: defer.Deferred = defer.Deferred()
        channel._deliveries[channel._delivery_message_id] = confirm
        return confirm


class StubBroker:
    """The broker's half of a pika ``TwistedProtocolConnection`` over a ``StringTransport``:
    the handshake, channel 1 in confirm mode, then frames fed in by hand."""

    def __init__(self, frame_max: int = 131072) -> None:
        from pika.adapters.twisted_connection import TwistedProtocolConnection
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        self.transport = StringTransport()
        self.protocol = TwistedProtocolConnection(
            pika.ConnectionParameters(heartbeat=0), custom_reactor=MemoryReactorClock()
        )
        self.protocol.makeConnection(self.transport)
        capabilities = {"publisher_confirms": True, "basic.nack": True}
        self.feed(
            0,
            pika.spec.Connection.Start(
                server_properties={"product": "stub", "capabilities": capabilities}, mechanisms="PLAIN"
            ),
            pika.spec.Connection.Tune(channel_max=16, frame_max=frame_max, heartbeat=0),
            pika.spec.Connection.OpenOk(),
        )
        opened = self.protocol.channel()
        self.feed(1, pika.spec.Channel.OpenOk())
        self.channel = self.result(opened)
        confirming = self.channel.confirm_delivery()
        self.feed(1, pika.spec.Confirm.SelectOk())
        self.result(confirming)
        self.transport.clear()

    def feed(self, channel: int, *methods: Any) -> None:
        """The broker sends these methods on ``channel``."""
        for method in methods:
            self.protocol.dataReceived(pika.frame.Method(channel, method).marshal())

    def feed_raw(self, *frames: bytes) -> None:
        for data in frames:
            self.protocol.dataReceived(data)

    @staticmethod
    def result(d: defer.Deferred) -> Any:
        """What ``d`` fired with (raised if it failed); AssertionError if it has not fired."""
        out: list[Any] = []
        d.addBoth(out.append)
        if not out:
            raise AssertionError(f"{d!r} has not fired")
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def written(self) -> bytes:
        """What the client wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def counters(self) -> tuple[int, int]:
        """pika's bytes_sent and frames_sent."""
        impl = self.protocol._impl
        return impl.bytes_sent, impl.frames_sent


_probed: bool | None = None


def probe() -> bool:
    """True when :class:`FramePublisher` behaves as pika's ``basic_publish`` (checked once).

    On a :class:`StubBroker`: the same bytes and counters for a body split over two frames
    and headers that are not ASCII, and pika's own handling of the broker's ``Basic.Ack``
    (multiple) and ``Basic.Nack`` resolves the confirms it returns."""
    global _probed
    if _probed is None:
        try:
            _probed = _check()
        except Exception:
            log.failure("the pika publish acceleration's probe crashed")
            _probed = False
        if not _probed:
            log.info("publishing with pika's basic_publish: the one-write publish does not match it")
    return _probed


def _check() -> bool:
    import pika.exceptions

    broker = StubBroker(frame_max=4096)  # the smallest frame_max AMQP allows
    fast = FramePublisher.for_channel(broker.channel)
    if fast is None:
        return False
    body = bytes(range(256)) * 20
    meta = '{"probe": "\u00e9"}'
    properties = pika.spec.BasicProperties(
        delivery_mode=2, message_id="m-1", timestamp=7, headers={"txfaas-call": meta}
    )
    before = broker.counters()
    stock = broker.channel.basic_publish("", "q", body, properties=properties, mandatory=True)
    expected, middle = broker.written(), broker.counters()
    ours = fast.publish("", "q", body, "m-1", 7, ((b"txfaas-call", meta.encode()),))
    got, after = broker.written(), broker.counters()
    nacked = fast.publish("", "q", b"", "m-2", 7, ())
    stock_counts = (middle[0] - before[0], middle[1] - before[1])
    if got != expected or (after[0] - middle[0], after[1] - middle[1]) != stock_counts:
        return False
    outcomes: list[Any] = []
    for d in (stock, ours, nacked):
        d.addBoth(outcomes.append)
    broker.feed(1, pika.spec.Basic.Ack(delivery_tag=2, multiple=True))
    if len(outcomes) != 2 or any(isinstance(o, Failure) for o in outcomes):
        return False
    broker.feed(1, pika.spec.Basic.Nack(delivery_tag=3))
    return (
        len(outcomes) == 3
        and isinstance(outcomes[2], Failure)
        and bool(outcomes[2].check(pika.exceptions.NackError))
    )
