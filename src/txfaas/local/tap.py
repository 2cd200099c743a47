"""``twistd faas-local``: one process, the gateway and a worker sharing an in-memory queue and store.

This module composes the two processes' builders (it is the only place that
imports both); they still never import each other.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from txfaas.cli import CommandOptions
from txfaas.config import ConfigError
from txfaas.gateway import tap as gateway_tap
from txfaas.worker import tap as worker_tap

log = Logger()

# The gateway's flags, less those that pick the store and queue (always in memory here).
_GATEWAY_FLAGS = gateway_tap.FLAGS.opt_parameters(
    leave_out=("redis", "amqp", "redis-prefix", "confirm-timeout", "default-queue")
)
_WORKER_FLAGS = ["max-inflight", "exec-timeout", "callback-secret", "callback-timeout", "max-result-size"]


class Options(CommandOptions):
    synopsis = "[options]"
    longdesc = (
        "Gateway and worker in ONE process on an in-memory queue and store, for trying txfaas without "
        "RabbitMQ and Redis. NOTHING IS DURABLE: a restart forgets functions, calls and queued work. "
        "Gateway flags as for faas-gateway; worker flags as for faas-worker."
    )
    optParameters = [
        *_GATEWAY_FLAGS,
        *[[flag, None, None, worker_tap.FLAGS[flag].usage()] for flag in _WORKER_FLAGS],
    ]

    def postOptions(self) -> None:
        environ = os.environ
        gateway_opts = {k: v for k, v in self.items() if k not in _WORKER_FLAGS}
        gateway_opts.update({"redis": "memory:", "amqp": "memory:"})
        worker_opts: dict[str, Any] = {k: self.get(k) for k in _WORKER_FLAGS}
        worker_opts.update(
            {
                "redis": "memory:",
                "amqp": "memory:",
                "callback-allow": self.get("callback-allow"),
                "function-url-template": self.get("function-url-template"),
                # The worker's own /healthz and /metrics: any free loopback port.
                "listen": "tcp:0:interface=127.0.0.1",
                "queue": [],
            }
        )
        try:
            self["gateway"] = gateway_tap.build_config(gateway_opts, environ)
            self["worker"] = worker_tap.settings_from(worker_opts, environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> service.IService:
    from txfaas.queue.memory import MemoryQueue
    from txfaas.reactor import global_reactor
    from txfaas.service import settle_gc
    from txfaas.store.memory import MemoryStore

    reactor = global_reactor()
    settle_gc(reactor)
    store = MemoryStore()
    queues = list(options["worker"].worker.queues)
    queue = MemoryQueue(queues)
    log.warn(
        "faas-local: gateway and worker in one process on an in-memory queue and store; "
        "NOTHING IS DURABLE (a restart forgets functions, calls and queued work)"
    )
    top = service.MultiService()
    # The worker first, so it stops after the gateway's listener closed.
    worker_tap.build(reactor, options["worker"], store=store, queue=queue).setServiceParent(top)
    gateway_tap.build_gateway(reactor, options["gateway"], store=store, queue=queue).setServiceParent(top)
    return top
