"""A callback receiver for the compose stack: logs each callback and keeps it in memory.

POST/PUT any path: recorded, answered 200.  GET /received: every callback so far as JSON
(call id, function status, path, body length).  GET /healthz: 200.  Standard library only.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

received = []
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, status, body=b"", content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        entry = {
            "path": self.path,
            "callId": self.headers.get("X-Call-Id"),
            "status": self.headers.get("X-Function-Status"),
            "bytes": len(body),
            "body": body[:200].decode("utf-8", "replace"),
        }
        with lock:
            received.append(entry)
        self._answer(200, b"ok\n")

    do_PUT = do_POST

    def do_GET(self):
        if self.path == "/healthz":
            self._answer(200, b"ok\n")
        elif self.path == "/received":
            with lock:
                body = json.dumps(received).encode()
            self._answer(200, body, "application/json")
        else:
            self._answer(404, b"not found\n")

    def log_message(self, format, *args):
        sys.stdout.write(f"receiver: {self.address_string()} {format % args}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
