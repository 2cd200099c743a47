"""twistd plugins for txfaas: one lazy ServiceMaker per process.

Nothing of txfaas is imported here, so ``twistd --help`` stays cheap.
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

faasGateway = ServiceMaker(
    "txfaas gateway",
    "txfaas.gateway.tap",
    "OpenFaaS-compatible function gateway (sync proxy, async queueing, /system API).",
    "faas-gateway",
)

faasWorker = ServiceMaker(
    "txfaas worker",
    "txfaas.worker.tap",
    "Consumes queued calls, invokes functions, records outcomes, delivers callbacks.",
    "faas-worker",
)

faasWatchdog = ServiceMaker(
    "txfaas watchdog",
    "txfaas.watchdog.tap",
    "Runs any program as an OpenFaaS-style function over HTTP.",
    "faas-watchdog",
)

faasLocal = ServiceMaker(
    "txfaas local",
    "txfaas.local.tap",
    "Gateway and worker in one process on an in-memory queue and store (nothing durable).",
    "faas-local",
)

# ``twistd --reactor=txfaas-epoll``: the reactor every txfaas process installs by default
# when accelerations are on (txfaas._accel.reactor); ``--reactor=epoll`` gives Twisted's own.
txfaasEpoll = Reactor(
    "txfaas-epoll",
    "txfaas._accel.reactor",
    "epoll, dispatching events without a per-event legacy log context (txfaas's default).",
)
