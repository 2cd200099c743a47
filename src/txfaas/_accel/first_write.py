"""A response's first write as one transport write: its head and first bytes together.

Twisted's ``Request.write`` writes the head through ``writeSequence`` (four pieces a header)
and the bytes after it.  :func:`write_first` makes the same head -- default Content-Type,
chunked when HTTP/1.1 has no Content-Length, nothing after the head for HEAD or a code
without a body -- and hands it to ``LimitedChannel.writeHead`` with the first bytes.  It reads
``server.Request``'s private ``_inFakeHead`` and ``_encoder`` to leave those cases to Twisted;
:func:`probe` checks that both paths give the same bytes on the Twisted in use.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import NO_BODY_CODES, NO_CONTENT, NOT_MODIFIED, toChunk

_probed: bool | None = None


def _drop(data: bytes) -> None:
    """A response's ``write`` once nothing more may follow its head (HEAD, 204, 304)."""


def plain(request: Any) -> bool:
    """True unless Twisted is rendering HEAD as GET or an encoder wraps the body."""
    return not request._inFakeHead and request._encoder is None


def write_first(request: Any, data: bytes) -> bool:
    """Write the head and ``data`` as Twisted's first ``write`` would, in one transport write;
    False, having done nothing, when Twisted must do it."""
    if not plain(request) or not probe():
        return False
    headers = request.responseHeaders
    code = request.code
    if code != NOT_MODIFIED and code != NO_CONTENT and request.defaultContentType is not None:
        length = headers.getRawHeaders(b"Content-Length")
        if not headers.hasHeader(b"Content-Type") and not (length and length[0] == b"0"):
            headers.setRawHeaders(b"Content-Type", [request.defaultContentType])
    request.startedWriting = 1
    version = request.clientproto
    silent = request.method == b"HEAD" or code in NO_BODY_CODES
    if version == b"HTTP/1.1" and not silent and not headers.hasHeader(b"Content-Length"):
        headers.setRawHeaders(b"Transfer-Encoding", [b"chunked"])
        request.chunked = 1
    if silent:
        request.channel.writeHead(version, b"%d" % code, request.code_message, headers, b"")
        request.write = _drop  # as Twisted does
        return True
    request.sentLength += len(data)
    if data and request.chunked:
        data = b"".join(toChunk(data))
    request.channel.writeHead(version, b"%d" % code, request.code_message, headers, data)
    return True


def probe() -> bool:
    """True if a GET, a HEAD and a 204 answered through :func:`write_first` give the client the
    bytes Twisted's own ``write`` gives."""
    global _probed
    if _probed is None:
        _probed = True  # write_first calls probe(): taken as passing while it runs
        try:
            _probed = _same_bytes()
        except Exception:
            _probed = False
    return _probed


def _same_bytes() -> bool:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.web import resource, server

    from txfaas.web.server import LimitedRequest, LimitedSite

    class Stock(LimitedRequest):
        def write(self, data: bytes) -> None:
            server.Request.write(self, data)

    class Fast(LimitedRequest):
        def write(self, data: bytes) -> None:
            if self.startedWriting or not write_first(self, data):
                server.Request.write(self, data)

    class Answer(resource.Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            if request.uri == b"/empty":
                request.setResponseCode(204)
            request.setHeader(b"X-A", b"1")
            return b"hello"

    def serve(factory: Any) -> bytes:
        site = LimitedSite(Answer(), Clock())
        site.requestFactory = factory
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /a HTTP/1.1\r\n\r\n"
            b"GET /empty HTTP/1.1\r\n\r\nGET /a HTTP/1.0\r\n\r\n"
        )
        out = transport.value()
        return b"".join(line for line in out.splitlines(True) if not line.startswith(b"Date:"))

    return serve(Fast) == serve(Stock) and serve(Stock).count(b"HTTP/1.") == 4
