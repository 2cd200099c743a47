"""The async benchmark's load client: raw HTTP/1.1 over asyncio, one connection per lane.

Run by ``bench/async_bench.py`` as a child process (so its CPU is its own)::

    python bench/async_client.py post URL --count N [--concurrency C] [--batch B]
        [--header "Name: value" ...] [--body-bytes S] [--interval SECONDS]
    python bench/async_client.py hold URL --count N

``post`` sends ``N`` POSTs over ``C`` keep-alive connections (lanes); request ``i`` carries
``X-Call-Id: <batch>.<i>`` so callbacks can be matched to posts.  With ``--interval``,
request ``i`` is not sent before ``start + i * interval``.  It prints one JSON object:
``{"started": t0, "results": [[call_id, sent, answered, status], ...], "errors": [...]}``
(wall-clock ``time.time()`` seconds, the clock of the worker's records and the receiver).

``hold`` opens ``N`` connections, sends one POST on each, prints ``sent`` and then waits
for a line on stdin; it then counts the answers that came (for a second at most), closes
every connection and prints ``{"answered": k, "errors": [...]}``.

Why not Twisted's Agent or treq: a request costs them ~0.3 ms of CPU; this client spends
a small fraction of that, so on a 2-core machine the load driver takes less from the
gateway it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit


class HTTPError(Exception):
    pass


def build_request(host: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and (lower-cased) headers of a response head ending in a blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HTTPError(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers, up to the blank line
                break
            chunks.append((await reader.readexactly(size + 2))[:-2])
        body = b"".join(chunks)
    else:
        body = await reader.read()
        headers["connection"] = "close"
    return status, headers, body


def _target(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise SystemExit(f"not an http URL: {url}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


async def post(args: argparse.Namespace) -> dict[str, Any]:
    host, port, path = _target(args.url)
    body = b"x" * args.body_bytes
    extra = [tuple(h.split(":", 1)) for h in args.header]
    extra = [(name.strip(), value.strip()) for name, value in extra]
    extra.append(("Content-Type", "application/octet-stream"))
    counter = iter(range(args.count))
    results: list[list[Any]] = []
    errors: list[str] = []
    started = time.time()

    async def lane() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for i in counter:
            call_id = f"{args.batch}.{i}"
            if args.interval:
                delay = started + i * args.interval - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            request = build_request(f"{host}:{port}", path, [*extra, ("X-Call-Id", call_id)], body)
            sent = time.time()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                writer.write(request)
                status, headers, _ = await read_response(reader)
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HTTPError) as e:
                errors.append(f"{call_id}: {type(e).__name__}: {e}")
                results.append([call_id, sent, time.time(), 0])
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            results.append([call_id, sent, time.time(), status])
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(lane() for _ in range(min(args.concurrency, args.count))))
    return {"started": started, "results": results, "errors": errors[:20], "error_count": len(errors)}


async def hold(args: argparse.Namespace) -> dict[str, Any]:
    host, port, path = _target(args.url)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []

    async def open_one(i: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            errors.append(f"{i}: {e}")
            return
        writer.write(build_request(f"{host}:{port}", path, [("X-Call-Id", f"{args.batch}.{i}")], b"held"))
        conns.append((reader, writer))

    await asyncio.gather(*(open_one(i) for i in range(args.count)))
    await asyncio.gather(*(w.drain() for _, w in conns))
    sys.stdout.write("sent\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def answer(reader: asyncio.StreamReader) -> bool:
        try:
            status, _, _ = await read_response(reader)
            return status == 200
        except (OSError, asyncio.IncompleteReadError, HTTPError):
            return False

    tasks = [asyncio.ensure_future(answer(r)) for r, _ in conns]
    done, pending = await asyncio.wait(tasks, timeout=5.0) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    for _, writer in conns:
        writer.close()
    return {
        "answered": sum(1 for t in done if t.result()),
        "held": len(conns),
        "errors": errors[:20],
        "error_count": len(errors),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["post", "hold"])
    p.add_argument("url")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--batch", default="b")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--body-bytes", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.0)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = asyncio.run(post(args) if args.mode == "post" else hold(args))
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
