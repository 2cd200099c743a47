"""A call published on pika's Twisted channel in one write, with the frames pika would send.

pika's ``TwistedChannel.basic_publish`` builds a ``Basic.Publish`` method object and marshals it
(the same bytes for every message to a queue), marshals ``BasicProperties`` by walking its
fourteen properties, and hands the method, content-header and body frames to the transport in
three writes.  For the gateway's accepted call that was 48k of its 675k instructions
(callgrind, ``bench/instructions.py --route async`` on the real RabbitMQ and Redis).

:class:`FramePublisher` sends the same bytes for the properties a call has (``delivery_mode``,
``message_id``, ``timestamp`` and a ``headers`` table of strings): the method frame is
marshalled by pika once per (exchange, routing key) and kept, the content header is packed
here, and the frames go out in one ``_adapter_emit_data`` (pika's own adapter hook).  The
confirm is registered exactly as ``TwistedChannel.basic_publish`` does, so pika's
``Basic.Ack`` / ``Basic.Nack`` / ``Basic.Return`` handling resolves it unchanged.

It reads pika's private state (``TwistedChannel._channel``, ``_deliveries``, the connection's
``_body_max_length``): :meth:`FramePublisher.for_channel` checks that every piece is there and
returns None otherwise (the caller then publishes through ``basic_publish``), and
``tests/unit/test_amqp_frames.py`` compares the bytes with pika's on a real pika connection,
so a pika release that changes them fails a test rather than the broker's parser.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import pika.frame
import pika.spec
from twisted.internet import defer

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
_HEADERS = pika.spec.BasicProperties.FLAG_HEADERS
_DELIVERY_MODE = pika.spec.BasicProperties.FLAG_DELIVERY_MODE
_MESSAGE_ID = pika.spec.BasicProperties.FLAG_MESSAGE_ID
_TIMESTAMP_FLAG = pika.spec.BasicProperties.FLAG_TIMESTAMP
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
            _CONTENT(_BASIC, 0, body_size, _HEADERS | _DELIVERY_MODE | _MESSAGE_ID | _TIMESTAMP_FLAG),
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
        connection = getattr(impl, "connection", None)
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
