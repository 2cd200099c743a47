#!/usr/bin/env python3
"""An HTTP-mode function: a small server the watchdog starts once and proxies to.

Run it as ``fprocess="python3 http_echo.py" mode=http upstream_url=http://127.0.0.1:5000``.
It answers every request with its body, and with the method, path and the
``X-Call-Id`` it saw in headers; ``/sleep?seconds=N`` waits N seconds first.
Listens on 127.0.0.1:$PORT (5000 by default), or on the port given as its argument.
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the watchdog's connection pool is used
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        if url.path == "/sleep":
            time.sleep(float(parse_qs(url.query).get("seconds", ["1"])[0]))
        self.send_response(200)
        self.send_header("Content-Type", self.headers.get("Content-Type") or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Method", self.command)
        self.send_header("X-Path", self.path)
        self.send_header("X-Seen-Call-Id", self.headers.get("X-Call-Id", ""))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("http_echo: " + (format % args) + "\n")


if __name__ == "__main__":
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "5000"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"http_echo listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()
