"""Raw pika publish-with-confirms rate on one existing queue, as JSON (the async benchmark's baseline).

Run by ``bench/async_bench.py`` in its own process::

    python bench/pika_baseline.py --queue Q [--messages 30000] [--in-flight 200] [--size 256]

It reuses ``raw_pika`` of ``bench/amqp_publish_rate.py`` (one pika channel in confirm
mode, ``--in-flight`` publishes outstanding, persistent messages with ``mandatory``,
one txfaas call header reused) and prints ``{"rate": msgs_per_s, "cpu_us_per_msg": x}``.
The queue must exist; it is not purged here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from amqp_publish_rate import raw_pika
from twisted.internet import defer, task

from txfaas.config import parse_amqp_url


async def main(reactor: Any, argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    p.add_argument("--queue", required=True)
    p.add_argument("--messages", type=int, default=30000)
    p.add_argument("--in-flight", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    cpu = time.process_time()
    rate = await raw_pika(reactor, parse_amqp_url(args.url), args.queue, args, False)
    cpu_us = (time.process_time() - cpu) / args.messages * 1e6
    sys.stdout.write(json.dumps({"rate": round(rate, 1), "cpu_us_per_msg": round(cpu_us, 2)}) + "\n")


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
