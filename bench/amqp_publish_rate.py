"""Publishes/s of AMQPQueue.publish with N in flight vs raw pika confirmed publishes, same broker.

Not a test: run it by hand against a broker nobody is loading::

    .venv/bin/python bench/amqp_publish_rate.py [--url amqp://guest:guest@127.0.0.1:5672/%2F]
        [--messages 20000] [--in-flight 200] [--size 256] [--queue-type quorum]

Each run uses a fresh uniquely named queue and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import pika
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from txfaas.config import parse_amqp_url
from txfaas.model import Call
from txfaas.queue.amqp import CALL_HEADER, AMQPQueue


async def windowed(total: int, in_flight: int, one) -> float:
    """Run ``one(i)`` for i < total with at most ``in_flight`` pending; returns the rate per second."""
    counter = iter(range(total))

    async def lane() -> None:
        for i in counter:
            await one(i)

    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(lane()) for _ in range(in_flight)])
    return total / (time.perf_counter() - started)


async def raw_pika(reactor, url, queue: str, args, encode: bool) -> float:
    """Confirmed publishes straight on pika; ``encode``: build each message's txfaas header
    (a Call and its JSON metadata) as any txfaas publisher must, else reuse one."""
    from pika.adapters.twisted_connection import TwistedProtocolConnection

    params = pika.ConnectionParameters(
        virtual_host=url.vhost, credentials=pika.PlainCredentials(url.username, url.password)
    )
    conn = await connectProtocol(
        TCP4ClientEndpoint(reactor, url.host, url.port), TwistedProtocolConnection(params, reactor)
    )
    await conn.ready
    channel = await conn.channel()
    await channel.confirm_delivery()
    body = b"x" * args.size
    meta = Call(call_id="raw", function="f", queue=queue).encode_meta().decode()

    async def one(i: int) -> None:
        header = meta
        if encode:
            call = Call(call_id=f"c{i}", function="f", body=body, queue=queue, accepted_at=time.time())
            header = call.encode_meta().decode()
        properties = pika.BasicProperties(delivery_mode=2, message_id=str(i), headers={CALL_HEADER: header})
        await channel.basic_publish("", queue, body, properties=properties, mandatory=True)

    try:
        return await windowed(args.messages, args.in_flight, one)
    finally:
        closed = conn.closed
        conn.close()
        await closed


async def ours(q: AMQPQueue, queue: str, args) -> float:
    body = b"x" * args.size

    async def one(i: int) -> None:
        await q.publish(Call(call_id=f"c{i}", function="f", body=body, queue=queue, accepted_at=time.time()))

    return await windowed(args.messages, args.in_flight, one)


async def main(reactor, argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--queue-type", default="quorum", choices=["quorum", "classic"])
    args = parser.parse_args(argv)
    url = parse_amqp_url(args.url)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    q = AMQPQueue(reactor, url, declare=(queue,), queue_type=args.queue_type, confirm_timeout=30)
    await q.start()
    await q.ready(10)
    try:
        runs = [
            ("raw pika, one header", lambda: raw_pika(reactor, url, queue, args, False)),
            ("raw pika, Call+meta each", lambda: raw_pika(reactor, url, queue, args, True)),
            ("AMQPQueue", lambda: ours(q, queue, args)),
        ]
        for name, run in runs * 2:
            cpu = time.process_time()
            rate = await run()
            cpu = (time.process_time() - cpu) / args.messages * 1e6
            sys.stdout.write(
                f"{name:26s} {args.messages} x {args.size} B, {args.in_flight} in flight, "
                f"{args.queue_type}: {rate:6.0f} msg/s, client CPU {cpu:4.1f} us/msg\n"
            )
            # Between runs, empty the queue so each starts alike.
            channel = await q._conn.channel()
            await channel.queue_purge(queue)
            channel.close()
    finally:
        channel = await q._conn.channel()
        await channel.queue_delete(queue)
        channel.close()
        await q.close()


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
